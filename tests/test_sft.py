"""Stage 5: SFT on a tiny Llama, loss on the output only, resumable after a crash."""

import pandas as pd
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from refine_af_utils.params import LoraParams, ModelParams, SFTParams
from refine_af_utils.prompts import sft_prompt
from refine_af_utils.stages.sft import fine_tune, sft_records

INSTANCES = [{"instruction": "Name a colour.", "input": "", "output": "Blue"},
             {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}] * 4


def _spec(tiny_llama_dir):
    return ModelParams(name_or_path=str(tiny_llama_dir), dtype="float32")


def test_prompt_layout():
    assert sft_prompt("Add the numbers.", "2 and 3") == "Add the numbers.\n\nInput: 2 and 3\n\nOutput:"
    assert sft_prompt("Name a colour.", "  ") == "Name a colour.\n\nOutput:"
    assert sft_records(INSTANCES[:1], "</s>") == [{"prompt": "Name a colour.\n\nOutput:", "completion": " Blue</s>"}]


@pytest.mark.slow
def test_lora_sft_trains_and_the_loss_falls(tmp_path, tiny_llama_dir):
    cfg = SFTParams(epochs=6, learning_rate=5e-3, batch_size=8, lora=LoraParams(r=8, lora_alpha=16), save_steps=100)
    losses = fine_tune(_spec(tiny_llama_dir), INSTANCES, tmp_path / "sft", cfg)
    assert len(losses) == 6 and losses["loss"].notna().all()
    assert losses["loss"].iloc[-1] < losses["loss"].iloc[0]
    assert (tmp_path / "sft" / "model" / "adapter_config.json").is_file()
    assert pd.read_csv(tmp_path / "sft" / "loss.csv")["step"].tolist() == list(range(1, 7))
    assert not list((tmp_path / "sft").glob("checkpoint-*"))  # removed once the arm is complete
    # a completed arm is read back, not trained again
    assert fine_tune(_spec(tiny_llama_dir), [], tmp_path / "sft", cfg).equals(pd.read_csv(tmp_path / "sft" / "loss.csv"))


@pytest.mark.slow
def test_full_fine_tuning_saves_a_whole_model(tmp_path, tiny_llama_dir):
    cfg = SFTParams(full_fine_tuning=True, epochs=1, learning_rate=1e-3, batch_size=4)
    fine_tune(_spec(tiny_llama_dir), INSTANCES, tmp_path / "full", cfg)
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "full" / "model" / "adapter_config.json").exists()


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated crash after step 3")


@pytest.mark.slow
def test_a_crashed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_llama_dir):
    cfg = SFTParams(epochs=3, learning_rate=5e-3, batch_size=2, lora=LoraParams(r=8, lora_alpha=16), save_steps=2)
    reference = fine_tune(_spec(tiny_llama_dir), INSTANCES, tmp_path / "uninterrupted", cfg)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(_spec(tiny_llama_dir), INSTANCES, tmp_path / "crashed", cfg, callbacks=[_Crash()])
    assert [p.name for p in (tmp_path / "crashed").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (tmp_path / "crashed" / "complete").exists()
    resumed = fine_tune(_spec(tiny_llama_dir), INSTANCES, tmp_path / "crashed", cfg)
    assert resumed["step"].tolist() == reference["step"].tolist() == list(range(1, 13))
    # steps 3+ were trained again from checkpoint 2 with its optimiser and data order
    assert resumed["loss"].to_numpy() == pytest.approx(reference["loss"].to_numpy(), rel=1e-4)
    # and the adapter is the uninterrupted run's (float32 on one machine: equal to rounding)
    from safetensors.torch import load_file

    ours, theirs = (load_file(tmp_path / run / "model" / "adapter_model.safetensors")
                    for run in ("crashed", "uninterrupted"))
    assert ours.keys() == theirs.keys() and ours
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5


@pytest.mark.slow
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


def test_a_torn_checkpoint_is_skipped(tmp_path):
    from refine_af_utils.stages.sft import _last_whole_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # a save cut short: no trainer_state.json
    assert _last_whole_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_malformed_arm_records_name_the_file_line_and_key(tmp_path):
    from refine_af_utils.layout import RunLayout

    (tmp_path / "instance_generation").mkdir()
    path = tmp_path / "instance_generation" / "refine_af.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "input": null, "output": "b"}\n')
    with pytest.raises(ValueError, match=r"refine_af.jsonl:2: key 'input' must be a string"):
        RunLayout(tmp_path).arm_instances("refine_af")
    with pytest.raises(FileNotFoundError, match="run stage 04 first"):
        RunLayout(tmp_path).arm_instances("self_instruct")
