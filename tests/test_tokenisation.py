"""One tokenisation rule: the prompts the backbone generates from, is rolled out on and is evaluated on start as
trl's SFT examples start, with the tokenizer's own special tokens (BOS for a LLaMA-style tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tokenizers.processors import TemplateProcessing

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def bos_llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a tokenizer that adds BOS, as LLaMA-2's, Mistral's and Gemma's do."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bos-llama")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(folder)
    return folder


def test_generation_sft_and_rollouts_agree_on_bos(bos_llama, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from refine_af_utils.generation import generate_batch
    from refine_af_utils.models import encode_prompts
    from refine_af_utils.prompts import sft_prompt
    from refine_af_utils.stages.sft import sft_records

    tokenizer = AutoTokenizer.from_pretrained(bos_llama)
    model = AutoModelForCausalLM.from_pretrained(bos_llama)
    bos = tokenizer.bos_token_id
    prompt = sft_prompt("Name a colour.", "")
    assert encode_prompts(tokenizer, prompt)["input_ids"][0] == bos

    # SFT (stage 5) trains on examples that start with BOS, through trl itself
    records = sft_records([{"instruction": "Name a colour.", "input": "", "output": "Blue."}], tokenizer.eos_token)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(records),
                         args=SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True, max_steps=1,
                                        completion_only_loss=True, activation_checkpointing=False))
    trained_on = trainer.train_dataset[0]["input_ids"]
    encoded = encode_prompts(tokenizer, prompt)["input_ids"]
    assert trained_on[: len(encoded)] == encoded  # the same prompt ids, BOS first

    # generation (stages 1, 2, 4, 6 and the held-out check) feeds the same ids to the real model
    seen = []
    real_generate = model.generate

    def recording_generate(**kwargs):
        seen.append(kwargs["input_ids"])
        return real_generate(**kwargs)

    model.generate = recording_generate
    tokenizer.padding_side = "left"
    generate_batch(model, tokenizer, [prompt, "Write a longer instruction than that."], max_new_tokens=2)
    first = seen[0][0].tolist()
    assert first[-len(encoded):] == encoded and first[first.index(bos)] == bos  # left-padded, then BOS


def test_no_backbone_prompt_is_encoded_without_special_tokens():
    """Stage code encodes prompts through models.encode_prompts; add_special_tokens=False stays only where
    text is counted or cut, not fed to the backbone (stage 6's prompt clipping), where a completion continues a
    prompt encoded by that rule (stage 3's held-out KL), and in the scorers' own rules."""
    lines = [(p.relative_to(REPO_ROOT).as_posix(), line.strip())
             for p in sorted((REPO_ROOT / "refine_af_utils").rglob("*.py")) if p.name != "scorers.py"
             for line in p.read_text().splitlines() if "add_special_tokens=False" in line]
    assert lines == [("refine_af_utils/stages/rl_training.py",
                      'completion_ids = tokenizer(samples[i]["text"], add_special_tokens=False)["input_ids"]'),
                     ("refine_af_utils/stages/superni_evaluation.py",
                      'ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]')]
