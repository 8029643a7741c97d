"""Stage 5 groundwork: SFT on a tiny Llama, loss on the output only."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from refine_af_utils.sft import fine_tune, sft_prompt, sft_records

INSTANCES = [{"instruction": "Name a colour.", "input": "", "output": "Blue"},
             {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}] * 4


def test_prompt_layout():
    assert sft_prompt("Add the numbers.", "2 and 3") == "Add the numbers.\n\nInput: 2 and 3\n\nOutput:"
    assert sft_prompt("Name a colour.", "  ") == "Name a colour.\n\nOutput:"
    assert sft_records(INSTANCES[:1], "</s>") == [{"prompt": "Name a colour.\n\nOutput:", "completion": " Blue</s>"}]


def test_lora_sft_trains_and_the_loss_falls(tmp_path, tiny_llama_dir):
    losses = fine_tune(str(tiny_llama_dir), INSTANCES, tmp_path / "sft", epochs=6, learning_rate=5e-3,
                       batch_size=8, lora_r=8, lora_alpha=16)
    assert len(losses) == 6 and losses["loss"].notna().all()
    assert losses["loss"].iloc[-1] < losses["loss"].iloc[0]
    assert (tmp_path / "sft" / "adapter_config.json").is_file() and (tmp_path / "sft" / "loss.csv").is_file()


def test_only_the_output_is_in_the_loss(tmp_path, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = "<|endoftext|>"
    records = sft_records(INSTANCES[:2], tokenizer.eos_token)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         args=SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to=[],
                                        use_cpu=True, max_length=128),
                         train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, record in enumerate(records):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        assert labelled.tolist() == completion  # prompt tokens carry no loss
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == -100)
