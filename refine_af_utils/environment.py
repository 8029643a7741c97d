"""Where a run ran: the CPU kind, the resolved dtypes, the library versions; recorded by every stage.

Results depend on the machine as well as on the params: ``dtype: auto`` resolves to bfloat16 on a
CPU with native bf16 (AVX512-BF16 or AMX) and to float32 elsewhere, and even in float32 the kernels
chosen for an instruction set round differently (measured: the smoke run's stage 01 generated 304
tokens on an AVX2 machine and 290 on an AVX512-BF16 one, both float32). So:

- :func:`resolve_dtypes` turns every ``auto`` into the dtype this machine uses. The runner writes the
  resolved params to ``<run>/params.yaml`` and the stage fingerprints hash them, so a run continued on
  a machine that resolves ``auto`` differently reruns its stages instead of mixing float32 and bf16.
- :func:`machine_environment` is what each stage marker records and the report's "Environment"
  section shows: CPU model, kind and flags, torch threads, versions, GPU name, resolved dtypes.
- :func:`reproduction_key` names the class of machine whose results are expected to be identical:
  the instruction-set kind, the CPU's identity (vendor, family, model) and the dtype. The kind alone is
  not enough: measured on 2026-12-02, an AVX2-only AMD EPYC of family 25 model 1 gave the smoke run's
  float32 stages 01-02 exactly as an AVX512-BF16 machine did (290 tokens), and differently from the AVX2
  machine the earlier pins came from (304 tokens). The smoke test's exact pins are keyed by it.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from refine_af_utils.params import Params

# The flags that choose the kernels torch and MKL/oneDNN run (and so the rounding of every result).
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# From the most capable down; the first kind whose flag the CPU has is its kind.
CPU_KINDS = (("amx_bf16", "amx"), ("avx512_bf16", "avx512_bf16"), ("avx512f", "avx512"), ("avx2", "avx2"))
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate")
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def _cpuinfo(text: Optional[str] = None) -> str:
    if text is not None:
        return text
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: Optional[str] = None) -> dict[str, bool]:
    """``{flag: present}`` for :data:`RELEVANT_FLAGS`, from ``/proc/cpuinfo`` (or the given text)."""
    flags: set[str] = set()
    for line in _cpuinfo(cpuinfo).splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return {flag: flag in flags for flag in RELEVANT_FLAGS}


def cpu_kind(cpuinfo: Optional[str] = None) -> str:
    """``amx``, ``avx512_bf16``, ``avx512``, ``avx2`` or ``other``: the most capable instruction set present."""
    flags = cpu_flags(cpuinfo)
    return next((kind for flag, kind in CPU_KINDS if flags[flag]), "other")


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    for line in _cpuinfo(cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_id(cpuinfo: Optional[str] = None) -> str:
    """``<vendor> family <f> model <m>`` from ``/proc/cpuinfo`` (``unknown`` where it says nothing)."""
    fields: dict[str, str] = {}
    for line in _cpuinfo(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "cpu family", "model") and key not in fields:
            fields[key] = value.strip()
    if not fields:
        return "unknown"
    return (f"{fields.get('vendor_id', 'unknown')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}")


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); else bf16 is emulated and slow."""
    flags = cpu_flags(cpuinfo)
    return flags["avx512_bf16"] or flags["amx_bf16"]


def resolved_dtype_name(name: str, device: str = "cpu") -> str:
    """The dtype ``name`` stands for on this machine: ``auto`` picks by hardware, others are themselves.

    ``auto`` is bfloat16 on a CUDA device that supports it (else float16) and on a CPU with native
    bf16; float32 on other CPUs (measured on an AVX2-only CPU: bf16 prefill 5x slower than float32).
    On a CUDA device this machine lacks, ``auto`` stays ``auto`` (the stage's device check refuses it).
    """
    if name != "auto":
        return name
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "auto"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def scorer_params(params: "Params") -> dict[str, Any]:
    """``{component: ScorerParams}`` of the reward section (every field but the intercept)."""
    return {f.name: getattr(params.reward, f.name) for f in dataclasses.fields(params.reward)
            if hasattr(getattr(params.reward, f.name), "dtype")}


def resolve_dtypes(params: "Params") -> "Params":
    """A copy of ``params`` with every ``dtype: auto`` (the backbone's and each scorer's) resolved here."""
    resolved = copy.deepcopy(params)
    resolved.model.dtype = resolved_dtype_name(resolved.model.dtype, resolved.model.device)
    for scorer in scorer_params(resolved).values():
        scorer.dtype = resolved_dtype_name(scorer.dtype, scorer.device)
    return resolved


def model_dtypes(params: "Params") -> dict[str, str]:
    """The dtype each model of a run computes in, resolved on this machine.

    The backbone's dtype is also the RL policy's, reference's and value model's (stage 3) and the
    SFT models' (stage 5); each reward scorer has its own.
    """
    resolved = resolve_dtypes(params)
    dtypes = {"backbone (generation, RL, SFT, evaluation)": resolved.model.dtype}
    for name, scorer in scorer_params(resolved).items():
        dtypes[f"reward.{name}"] = scorer.dtype
    return dtypes


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_environment(params: Optional["Params"] = None) -> dict[str, Any]:
    """What a stage marker records about the machine (and, given ``params``, the run's dtypes and devices)."""
    import torch

    environment: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_kind": cpu_kind(),
        "cpu_id": cpu_id(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {package: _version(package) for package in LIBRARIES},
    }
    devices = ["cpu"]
    if params is not None:
        environment["dtypes"] = model_dtypes(params)
        devices = sorted({params.model.device, *(scorer.device for scorer in scorer_params(params).values())})
        environment["devices"] = devices
    gpus = sorted({torch.cuda.get_device_name(torch.device(d)) for d in devices
                   if d.startswith("cuda") and torch.cuda.is_available()})
    environment["gpu"] = ", ".join(gpus) if gpus else None
    return environment


def reproduction_key(environment: dict[str, Any], coarse: bool = False) -> str:
    """``<cpu kind> <cpu id>/<backbone dtype>`` (e.g. ``avx2 AuthenticAMD family 25 model 1/float32``):
    runs with equal keys are expected to agree exactly, others only within noise (see
    :mod:`refine_af_utils.compare`). ``coarse``: without the CPU identity (``avx2/float32``)."""
    dtypes = environment.get("dtypes") or {}
    backbone = next(iter(dtypes.values()), "unknown")
    kind = environment.get("cpu_kind", "unknown")
    return f"{kind}/{backbone}" if coarse else f"{kind} {environment.get('cpu_id', 'unknown')}/{backbone}"


def environment_lines(environment: dict[str, Any]) -> list[tuple[str, str]]:
    """``(what, value)`` rows of an environment record, for tables."""
    flags = environment.get("cpu_flags", {})
    rows = [
        ("CPU", str(environment.get("cpu_model", "unknown"))),
        ("CPU kind", str(environment.get("cpu_kind", "unknown"))),
        ("CPU identity", str(environment.get("cpu_id", "unknown (not recorded)"))),
        ("CPU flags", ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in flags.items())),
        ("torch threads", str(environment.get("torch_threads", "unknown"))),
        ("GPU", str(environment.get("gpu") or "none")),
        ("devices", ", ".join(environment.get("devices", [])) or "unknown"),
    ]
    rows += [(f"dtype: {model}", dtype) for model, dtype in (environment.get("dtypes") or {}).items()]
    if "embedded_llm_sha256" in environment:
        rows.append(("embedded LLM weights (sha256)", str(environment["embedded_llm_sha256"])))
    rows.append(("Python", str(environment.get("python", "unknown"))))
    rows += [(package, str(v)) for package, v in (environment.get("versions") or {}).items()]
    return rows
