"""Results that say where they ran: CPU kinds, resolved dtypes in params.yaml, markers and fingerprints, the
report's Environment section, and the smoke pins keyed by kind (tests/smoke_pins.py) on a faked CPU kind."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

import refine_af_utils.environment as environment
from refine_af_utils.environment import (
    cpu_kind,
    machine_environment,
    model_dtypes,
    reproduction_key,
    resolve_dtypes,
    resolved_dtype_name,
)
from refine_af_utils.layout import STAGES, stage_config, stage_fingerprint
from refine_af_utils.params import load_params, resolve_params_data
from refine_af_utils.run_folder import stage_command_line, stage_status, write_marker
from smoke_pins import any_kind_band, check_metrics, load_pins, within

from conftest import REPO_ROOT

SMOKE = REPO_ROOT / "params" / "smoke.yaml"
DEFAULT = REPO_ROOT / "params" / "default.yaml"
FLAGS = {
    "avx2": "fpu sse4_2 avx avx2 fma",
    "avx512": "fpu sse4_2 avx avx2 fma avx512f avx512bw",
    "avx512_bf16": "fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16",
    "amx": "fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile",
    "other": "fpu sse4_2",
}


def cpuinfo(kind: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
            f"model name\t: Test CPU {kind}\nflags\t\t: {FLAGS[kind]}\n")


def fake_cpu(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Make this process see a CPU of ``kind`` (its /proc/cpuinfo)."""
    monkeypatch.setattr(environment, "_cpuinfo", lambda text=None: text if text is not None else cpuinfo(kind))


@pytest.mark.parametrize("kind", list(FLAGS))
def test_cpu_kind_is_the_most_capable_instruction_set(kind):
    assert cpu_kind(cpuinfo(kind)) == kind
    assert environment.cpu_model(cpuinfo(kind)) == f"Test CPU {kind}"
    assert environment.cpu_id(cpuinfo(kind)) == "AuthenticAMD family 25 model 1"
    assert environment.cpu_id("flags\t: avx2\n") == "unknown"


@pytest.mark.auto_dtype
def test_auto_resolves_by_cpu_kind_and_explicit_dtypes_stay(monkeypatch):
    expected = {"avx2": "float32", "avx512": "float32", "avx512_bf16": "bfloat16", "amx": "bfloat16", "other": "float32"}
    for kind, dtype in expected.items():
        fake_cpu(monkeypatch, kind)
        assert resolved_dtype_name("auto") == dtype
        assert resolved_dtype_name("float32") == "float32" and resolved_dtype_name("bfloat16") == "bfloat16"
        auto = load_params(DEFAULT, overrides={"model.dtype": "auto"})
        params = resolve_dtypes(auto)
        assert params.model.dtype == dtype and params.reward.coherence.dtype == "float32"
        assert auto.model.dtype == "auto"  # a copy: the loaded params keep what the file says
        assert set(model_dtypes(auto).values()) == {dtype, "float32"}
        assert resolve_dtypes(load_params(DEFAULT)).model.dtype == "float32"  # the default pins float32
    import torch

    if not torch.cuda.is_available():  # an absent GPU: left for the device check to refuse
        assert resolved_dtype_name("auto", "cuda") == "auto"


def test_the_params_files_tests_run_pin_every_dtype():
    """`auto` never reaches a pinned metric: the smoke params name their dtypes before any machine resolves them."""
    data = resolve_params_data(SMOKE)
    assert data["model"]["dtype"] == "float32"
    smoke = load_params(SMOKE)
    assert smoke.model.dtype != "auto"
    assert all(getattr(smoke.reward, c).dtype != "auto" for c in ("reward_model", "understandability",
                                                                  "naturalness", "coherence"))


def test_a_test_that_loads_a_model_in_auto_fails():
    """The autouse guard in conftest.py: loading a model with dtype auto fails the test that does it."""
    from refine_af_utils.models import torch_dtype

    with pytest.raises(pytest.fail.Exception, match="dtype 'auto'"):
        torch_dtype("auto")
    assert str(torch_dtype("float32")) == "torch.float32"


def test_machine_environment_records_what_the_issue_lists(monkeypatch):
    fake_cpu(monkeypatch, "avx512_bf16")
    record = machine_environment(load_params(SMOKE))
    assert record["cpu_model"] == "Test CPU avx512_bf16" and record["cpu_kind"] == "avx512_bf16"
    assert record["cpu_flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}
    assert record["torch_threads"] >= 1 and record["gpu"] is None and record["devices"] == ["cpu"]
    assert set(record["versions"]) == {"torch", "transformers", "trl", "peft", "accelerate"}
    assert record["dtypes"]["backbone (generation, RL, SFT, evaluation)"] == "float32"  # smoke pins float32
    assert set(record["dtypes"]) == {"backbone (generation, RL, SFT, evaluation)", "reward.reward_model",
                                     "reward.understandability", "reward.naturalness", "reward.coherence"}
    assert reproduction_key(record) == "avx512_bf16 AuthenticAMD family 25 model 1/float32"
    assert reproduction_key(record, coarse=True) == "avx512_bf16/float32"
    from refine_af_utils.models import embedded_llm_dir, embedded_weights_record

    # The prepared weights (markers add them to the environment): tells a different preparation from other kernels.
    digest = embedded_weights_record(load_params(SMOKE))["embedded_llm_sha256"]
    if (embedded_llm_dir() / "model.safetensors").is_file():
        assert len(digest) == 64 and digest == embedded_weights_record(load_params(SMOKE))["embedded_llm_sha256"]
    else:
        assert digest is None


def _finished(run_dir: Path, params) -> None:
    for stage in STAGES:
        folder = run_dir / (stage.output_dir or "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ("report.md" if stage.output_dir is None else "out.txt")).write_text(stage.id)
        write_marker(run_dir, stage, params, seconds=1.0)


@pytest.mark.auto_dtype
def test_a_machine_that_resolves_auto_otherwise_reruns_the_stages_from_scratch(tmp_path, monkeypatch):
    """A run begun on an AVX2 machine (auto = float32) and continued on one with native bf16 does not mix dtypes."""
    params = load_params(SMOKE, overrides={"model.dtype": "auto"})
    run_dir = tmp_path / "smoke"
    fake_cpu(monkeypatch, "avx2")
    _finished(run_dir, params)
    assert not any(stage_status(run_dir, s, params).run for s in STAGES)
    marker = json.loads((run_dir / "stages" / "03.json").read_text())
    assert marker["params"]["model"]["dtype"] == "float32"  # the resolved dtype, not auto
    assert marker["environment"]["cpu_kind"] == "avx2"
    before = [stage_fingerprint(s, params) for s in STAGES]

    fake_cpu(monkeypatch, "avx512_bf16")
    assert [stage_fingerprint(s, params) for s in STAGES][0] == before[0]  # stage 0 loads no model
    statuses = {s.id: stage_status(run_dir, s, params) for s in STAGES}
    assert not statuses["00"].run
    assert all(statuses[s].run and statuses[s].from_scratch for s in ("01", "02", "03", "04", "05", "06", "07"))
    assert "model.dtype float32 -> bfloat16" in statuses["01"].reason
    assert stage_config(STAGES[1], params)["model.dtype"] == "bfloat16"
    # explicit dtypes do not depend on the machine
    explicit = load_params(SMOKE)
    fake_cpu(monkeypatch, "avx2")
    avx2 = [stage_fingerprint(s, explicit) for s in STAGES]
    fake_cpu(monkeypatch, "amx")
    assert [stage_fingerprint(s, explicit) for s in STAGES] == avx2


@pytest.mark.auto_dtype
def test_params_yaml_of_a_run_holds_the_resolved_dtypes(tmp_path, monkeypatch):
    for kind, dtype in (("avx2", "float32"), ("avx512_bf16", "bfloat16")):
        fake_cpu(monkeypatch, kind)
        with stage_command_line("test", [str(DEFAULT), "--results-root", str(tmp_path / kind),
                                         "--set", "model.dtype=auto"]) as (params, run_dir):
            pass
        written = yaml.safe_load((run_dir / "params.yaml").read_text())
        assert params.model.dtype == written["model"]["dtype"] == dtype
        assert "auto" not in json.dumps(written)


def test_the_report_opens_with_the_environment_and_names_differing_stages(tmp_path, monkeypatch):
    from refine_af_utils.stages.report import environment_sentence, environment_table

    params = load_params(SMOKE)
    run_dir = tmp_path / "smoke"
    fake_cpu(monkeypatch, "avx2")
    _finished(run_dir, params)
    table = environment_table(run_dir)
    values = dict(zip(table["what"], table["value"]))
    assert values["CPU kind"] == "avx2" and values["dtype: backbone (generation, RL, SFT, evaluation)"] == "float32"
    assert "`avx2` CPU (AuthenticAMD family 25 model 1) in `float32`" in environment_sentence(table)
    fake_cpu(monkeypatch, "avx512_bf16")
    write_marker(run_dir, STAGES[4], params, seconds=1.0)  # stage 04 redone on another machine
    (run_dir / "stages" / "06.json").unlink()
    values = dict(pd.DataFrame(environment_table(run_dir)).itertuples(index=False, name=None))
    assert values["CPU kind"] == "avx2 (stage 00-03, 05); avx512_bf16 (stage 04)"
    assert values["not recorded"].startswith("stage 06 ")
    assert "no exact reproduction" in environment_sentence(environment_table(run_dir))


# The pins keyed by CPU kind and dtype, on faked kinds: the fixture's own recordings of each kind.


def _recorded(pins: dict, stage: str, kind: str) -> dict:
    """The metrics a run of ``kind`` recorded (from the fixture), for the pins that kind has; a metric whose
    recording was dropped as stale (``_kinds`` says which) stands at the middle of its band, which judges it
    on that kind."""
    metrics, dropped = {}, []
    for key, pin in pins[stage].items():
        if "value" in pin:
            metrics[key] = pin["value"]
        elif kind in pin["by_kind"]:
            metrics[key] = pin["by_kind"][kind]
        else:
            dropped.append(key)
            metrics[key] = sum(pin["any_kind"]) / 2
    return {} if len(dropped) == len([p for p in pins[stage].values() if "by_kind" in p]) else metrics


HERE = "avx2 AuthenticAMD family 25 model 1/float32"  # recorded on such a machine on 2026-12-02
OLD_AVX2 = "avx2 unidentified/float32"  # the pins of 1ab5ee4: an AVX2 machine whose identity was not recorded
INTEL = "avx2 GenuineIntel family 6 model 85/float32"  # a machine with no recording


@pytest.mark.parametrize("stage", ["01", "02", "03", "04", "05", "06"])
def test_each_kind_meets_its_own_pins_and_the_bands_of_the_others(stage):
    pins = load_pins()
    kinds = [k for k in pins["_kinds"] if _recorded(pins, stage, k)]
    assert HERE in kinds and OLD_AVX2 in kinds
    for kind in kinds:
        metrics = _recorded(pins, stage, kind)
        check_metrics(metrics, stage, kind, pins)  # exact on its own kind
        check_metrics(metrics, stage, INTEL, pins)  # a machine with no recording: the bands
        for other in kinds:
            if other != kind and any("by_kind" in p and kind in p["by_kind"] and other in p["by_kind"]
                                     and not within(p["by_kind"][kind], p["by_kind"][other], p)
                                     for p in pins[stage].values()):
                with pytest.raises(AssertionError, match="moved outside their pins"):
                    check_metrics(metrics, stage, other, pins)  # the measured cross-machine differences


def test_a_coarse_recording_serves_every_machine_of_its_kind_and_an_unidentified_one_none():
    pins = load_pins()
    avx512 = _recorded(pins, "01", "avx512_bf16/float32")
    check_metrics(avx512, "01", "avx512_bf16 AuthenticAMD family 25 model 17/float32", pins)  # exact, coarse key
    old = _recorded(pins, "01", OLD_AVX2)
    with pytest.raises(AssertionError, match="on avx2 AuthenticAMD family 25 model 1/float32"):
        check_metrics(old, "01", HERE, pins)  # this machine's own recording, not the old one's
    check_metrics(old, "01", INTEL, pins)  # no machine matches "unidentified": bands


def test_the_measured_differences_fail_exact_pins_but_pass_the_bands():
    """The AVX512-BF16 machine with float32 recorded 290 tokens and a classification share of 0.5 in stage 01,
    as the AVX2 machine of family 25 model 1 did; the pins of 1ab5ee4 say 304 and 0.333."""
    pins = load_pins()
    metrics = _recorded(pins, "01", "avx512_bf16/float32")
    assert metrics["generated_tokens"] == 290 and metrics["classification_share"] == 0.5
    assert _recorded(pins, "01", HERE) == metrics
    with pytest.raises(AssertionError, match="generated_tokens"):
        check_metrics(metrics, "01", OLD_AVX2, pins)
    check_metrics(metrics, "01", INTEL, pins)


@pytest.mark.parametrize("stage, key, broken, why", [
    ("02", "mean_reward", 0.633, "the understandability weight's sign flipped (+0.4421 x 0.68 twice)"),
    ("02", "count_kept", 0, "a parser that keeps no instance"),
    ("01", "generated_tokens", 24, "generation that stops after 3 tokens a prompt"),
    ("03", "updates", 1, "RL that skips an update"),
    ("06", "base_rougeL", 0.0, "an evaluation that scores nothing"),
])
def test_a_real_behaviour_change_fails_on_every_kind(stage, key, broken, why):
    pins = load_pins()
    for kind in (HERE, OLD_AVX2, "avx512_bf16/bfloat16", INTEL):
        metrics = _recorded(pins, stage, kind) or _recorded(pins, stage, HERE)
        metrics[key] = broken
        with pytest.raises(AssertionError, match=key):
            check_metrics(metrics, stage, kind, pins)


def test_the_bands_follow_their_rule():
    band = any_kind_band({"by_kind": {"a": 304, "b": 290, "c": 261}})
    assert band == [261 - 76, 304 + 76]  # range 43 < 25% of 304 = 76
    assert any_kind_band({"by_kind": {"a": 0, "b": 0}}) == [0.0, 1.0]  # a count's floor is 1
    assert any_kind_band({"by_kind": {"a": 0.24, "b": -0.57}, "abs": 0.005}) == [-1.38, 1.05]  # its range
