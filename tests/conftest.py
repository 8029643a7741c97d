"""Shared fixtures: tiny models built from a config (nothing is downloaded), and one smoke run of the pipeline."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from refine_af_utils.seeds import BUNDLED_SEED_TASKS

REPO_ROOT = Path(__file__).resolve().parents[1]


def _training_text() -> list[str]:
    lines = []
    for line in BUNDLED_SEED_TASKS.read_text().splitlines():
        task = json.loads(line)
        lines.append(task["instruction"])
        lines.extend(i["input"] + " " + i["output"] for i in task["instances"])
    lines += [f"{n}. Come up with a series of tasks:" for n in range(1, 20)]
    return lines


def build_tiny_llama(folder: Path, seed: int = 0, **config_overrides: Any) -> Path:
    """A randomly initialised 2-layer Llama with a byte-level BPE tokenizer trained on the seeds; ``config``
    overrides its sizes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
    )
    torch.manual_seed(seed)
    sizes: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    config = LlamaConfig(
        vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id, **{**sizes, **config_overrides},
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama and its tokenizer (pad == eos, as SmolLM2 ships)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def no_auto_dtype(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test that loads a model with ``dtype: auto``: its numbers would depend on the CPU kind
    (bfloat16 with native bf16, float32 elsewhere). Tests of the resolution itself are marked ``auto_dtype``."""
    if request.node.get_closest_marker("auto_dtype"):
        return
    import refine_af_utils.models as models

    real = models.torch_dtype

    def explicit_only(name: str, device: str = "cpu") -> torch.dtype:
        if name == "auto":
            pytest.fail(f"{request.node.nodeid} loads a model with dtype 'auto', which resolves by CPU kind; "
                        "give the test's params an explicit dtype (float32)", pytrace=False)
        return real(name, device)

    monkeypatch.setattr(models, "torch_dtype", explicit_only)


@dataclass
class SmokeRun:
    """The smoke pipeline (``params/smoke.yaml``) run once through the runner, and how it ended."""

    params_path: Path
    results_root: Path
    run_dir: Path
    seconds: float
    error: Optional[BaseException]  # what run_pipeline raised, if it did

    def marker(self, stage_id: str) -> Path:
        return self.run_dir / "stages" / f"{stage_id}.json"

    def require(self, stage_id: str) -> Path:
        """The run folder once ``stage_id`` completed; otherwise fail (the stage that broke) or skip (a later one)."""
        from refine_af_utils.run import STAGES

        if self.marker(stage_id).is_file():
            return self.run_dir
        first = next(s.id for s in STAGES if not self.marker(s.id).is_file())
        if first != stage_id:
            pytest.skip(f"stage {first} did not complete, so stage {stage_id} never ran")
        why = "".join(traceback.format_exception(self.error)) if self.error else "no error raised, but no marker"
        pytest.fail(f"stage {stage_id} did not complete in the smoke run:\n{why}", pytrace=False)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """One smoke run of every stage for the session; the per-stage tests read it (see tests/test_notebooks.py).

    A stage that raises ends the run: its own test fails with the error and the later stages' tests skip.
    Tests that rerun stages of it must leave their outputs byte-identical.
    """
    from refine_af_utils.run import run_pipeline

    params_path = REPO_ROOT / "params" / "smoke.yaml"
    root = tmp_path_factory.mktemp("smoke-run")
    started = time.perf_counter()
    error: Optional[BaseException] = None
    try:
        run_dir = run_pipeline(params_path, results_root=root)
    except Exception as raised:  # reported by the test of the stage that raised it
        error = raised
        run_dir = root / "smoke"
    return SmokeRun(params_path, root, run_dir, time.perf_counter() - started, error)
