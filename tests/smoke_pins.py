"""The smoke run's pinned metrics (``tests/fixtures/smoke_metrics.json``), keyed by CPU kind and dtype.

Results are identical only on the same CPU kind in the same dtype (``refine_af_utils.environment``):
kernels chosen by instruction set round differently, and a sampled token that flips changes every later
draw. So a pin is one of:

- ``{"value": v}`` (with optional ``rel``/``abs``): the same on every kind, because rounding cannot move
  it (seed-task counts, the number of instructions asked for, updates, the bootstrap seed, names);
- ``{"by_kind": {"<kind>/<dtype>": v, ...}, "any_kind": [low, high]}`` (optional ``rel``/``abs``): exact
  (or within ``rel``/``abs``) on a kind that has a recording, and inside ``any_kind`` on any other kind.

A kind is ``<cpu kind> <cpu identity>/<dtype>`` (``refine_af_utils.environment.reproduction_key``), e.g.
``avx2 AuthenticAMD family 25 model 1/float32``; a recording whose CPU identity was not known is keyed by
the coarse ``<cpu kind>/<dtype>`` and serves every machine of that kind, or, where a machine of that kind
is known not to reproduce it, by ``<cpu kind> unidentified/<dtype>``, which serves none (bands only).

``any_kind`` follows one rule (:func:`any_kind_band`), from the recordings of every kind: their envelope,
widened on each side by the larger of their cross-kind range and a floor (25% of the largest magnitude,
1 for counts, twice the within-kind tolerance). 25% is about the largest relative spread measured between
kinds on a well-populated metric (stage 2's mean naturalness 0.687 vs 0.560, 18%; stage 1's generated
tokens 304 vs 261, 14%); sparse ones (wins among 12 mostly-tied tasks, a KL of two updates) spread wider
and their bands follow that range. The kind of a run is read from its stage markers, not from the machine
that runs the test, so a run made elsewhere is judged by its own kind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import pytest

PINNED_METRICS = Path(__file__).parent / "fixtures" / "smoke_metrics.json"
RECORD_ENV = "REFINE_AF_RECORD_METRICS"
FLOOR_SHARE = 0.25
COMMENT = [
    "Metrics of the smoke run (params/smoke.yaml, the embedded SmolLM2-135M-Instruct on CPU, float32) that",
    "tests/test_notebooks.py compares with <run>/metrics/NN.json; see tests/smoke_pins.py for the rules.",
    "value: the same on every machine. by_kind: exact (or within rel/abs) on the kind ('<cpu kind> <cpu",
    "identity>/<dtype>' from the run's stage marker, or the coarse '<cpu kind>/<dtype>') it was recorded on;",
    "any_kind: the band on a kind without a recording.",
    "Re-record after an intended change, on each kind you can reach: REFINE_AF_RECORD_METRICS=1 python -m",
    "pytest tests/test_notebooks.py -m slow (it rewrites this kind's values and every band, keeping the keys",
    "and tolerances; other kinds' values are then stale: say so in _kinds), review the diff and commit it.",
]
KINDS = {
    "avx2/float32": "2-core AMD EPYC, AVX2 only, torch 2.13.0 CPU: recorded at 1ab5ee4 (make test, 340 passed)",
    "avx512_bf16/float32": "2-core AMD EPYC with AVX-512 and avx512_bf16, torch 2.13.0: recorded at 533daaf with "
                           "model.dtype float32, stages 00-02 only (shared/reference/cpu-kinds)",
    "avx512_bf16/bfloat16": "the same machine at 533daaf with model.dtype auto, which resolved to bfloat16 "
                            "there, all stages (shared/reference/cpu-kinds)",
}


def load_pins() -> dict[str, Any]:
    """The fixture."""
    return json.loads(PINNED_METRICS.read_text())


def dump_pins(pins: dict[str, Any]) -> str:
    """The fixture's layout: one line per pinned metric."""
    blocks = []
    for key, entries in pins.items():
        if isinstance(entries, list):  # the comment: a list of lines
            blocks.append(f"  {json.dumps(key)}: [\n" + ",\n".join(f"    {json.dumps(line)}" for line in entries)
                          + "\n  ]")
        else:
            rows = [f"    {json.dumps(name)}: {json.dumps(pin)}" for name, pin in entries.items()]
            blocks.append(f"  {json.dumps(key)}: {{\n" + ",\n".join(rows) + "\n  }")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def tolerant(pin: dict[str, Any]) -> bool:
    """True when the pin carries a ``rel`` or ``abs`` tolerance."""
    return "rel" in pin or "abs" in pin


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def any_kind_band(pin: dict[str, Any]) -> list[float]:
    """The band a kind without a recording must fall in (the rule in this module's docstring)."""
    values = [float(v) for v in pin["by_kind"].values()]
    low, high = min(values), max(values)
    magnitude = max(abs(low), abs(high))
    counts = not tolerant(pin) and all(float(v).is_integer() for v in values)
    tolerance = max(pin.get("abs", 0.0), pin.get("rel", 0.0) * magnitude)
    floor = max(FLOOR_SHARE * magnitude, 1.0 if counts else 0.0, 2 * tolerance)
    widen = max(high - low, floor)
    band = [low - widen, high + widen]
    if low >= 0:  # counts, shares, scores and losses that cannot be negative
        band[0] = max(band[0], 0.0)
    return [round(b, 6) for b in band]


def within(value: Any, expected: Any, pin: dict[str, Any]) -> bool:
    """``value`` equals ``expected`` (exactly, or within the pin's ``rel``/``abs``)."""
    if not tolerant(pin):
        return value == expected
    if not _number(value) or not math.isfinite(value):
        return False
    return value == pytest.approx(expected, rel=pin.get("rel", 0.0), abs=pin.get("abs", 0.0))


def coarse(kind: str) -> str:
    """``avx2 AuthenticAMD family 25 model 1/float32`` -> ``avx2/float32``."""
    machine, _, dtype = kind.rpartition("/")
    return f"{machine.split(' ')[0]}/{dtype}"


def recorded_kind(pin: dict[str, Any], kind: str) -> Optional[str]:
    """The recording that applies to a run of ``kind``: its own, else its CPU kind's coarse one, else None."""
    for key in (kind, coarse(kind)):
        if key in pin["by_kind"]:
            return key
    return None


def judge(key: str, value: Any, pin: dict[str, Any], kind: str) -> Optional[str]:
    """None when ``value`` meets the pin on ``kind``; else why not."""
    if "value" in pin:
        return None if within(value, pin["value"], pin) else f"recorded {value!r}, pinned {pin['value']!r} (any kind)"
    recorded = recorded_kind(pin, kind)
    if recorded is not None:
        expected = pin["by_kind"][recorded]
        return None if within(value, expected, pin) else f"recorded {value!r}, pinned {expected!r} on {recorded}"
    low, high = pin["any_kind"]
    if _number(value) and low <= value <= high:
        return None
    return f"recorded {value!r}, outside the any-kind band [{low}, {high}] ({kind} has no recording)"


def check_metrics(metrics: dict[str, Any], stage: str, kind: str, pins: Optional[dict[str, Any]] = None,
                  record: bool = False) -> dict[str, Any]:
    """Compare a stage's recorded ``metrics`` with the pins for ``kind`` (``<cpu kind>/<dtype>``).

    With ``record``, write this kind's values (and the bands they imply) into the fixture instead.
    """
    pins = load_pins() if pins is None else pins
    pinned = pins.get(stage, {})
    assert pinned, f"no metrics of stage {stage} are pinned in {PINNED_METRICS.name}"
    missing = sorted(set(pinned) - set(metrics))
    assert not missing, f"stage {stage} no longer records the pinned metrics {missing}"
    if record:
        for key, pin in pinned.items():
            value = metrics[key]
            if not tolerant(pin) and isinstance(value, float) and value.is_integer():
                value = int(value)
            if "value" in pin:
                pin["value"] = value
            else:
                pin["by_kind"][kind] = value
                pin["any_kind"] = any_kind_band(pin)
        PINNED_METRICS.write_text(dump_pins(pins))
        return metrics
    off = {key: why for key, pin in pinned.items() if (why := judge(key, metrics[key], pin, kind))}
    assert not off, (f"stage {stage}'s metrics ({kind}) moved outside their pins: {off}; if the change is "
                     f"intended, re-record with {RECORD_ENV}=1 (see tests/smoke_pins.py)")
    return metrics
