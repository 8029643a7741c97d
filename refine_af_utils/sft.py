"""Stage 5 groundwork: supervised fine-tuning of the base backbone on one arm's instances.

The prompt is the instruction, then the input when there is one, then ``Output:``; the loss
covers the output only (trl's prompt/completion format with ``completion_only_loss``).
LoRA by default. Both arms use the same settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd


def sft_prompt(instruction: str, input_text: str) -> str:
    """The instruction, the input on its own lines when there is one, then ``Output:``."""
    text = instruction.strip()
    if input_text.strip():
        text += f"\n\nInput: {input_text.strip()}"
    return text + "\n\nOutput:"


def sft_records(instances: Sequence[dict[str, Any]], eos_token: str) -> list[dict[str, str]]:
    """trl prompt/completion records; the completion ends with the end token so the model learns to stop."""
    return [{"prompt": sft_prompt(r["instruction"], r.get("input", "")), "completion": f" {r['output'].strip()}{eos_token}"}
            for r in instances]


def fine_tune(model_path: str, instances: Sequence[dict[str, Any]], output_dir: str | Path, *,
              epochs: float = 2.0, learning_rate: float = 2e-4, batch_size: int = 8, max_length: int = 512,
              lora_r: int = 16, lora_alpha: int = 32, full_fine_tuning: bool = False, use_cpu: bool = True,
              seed: int = 42, tokenizer: Optional[Any] = None) -> pd.DataFrame:
    """Fine-tune ``model_path`` on ``instances`` with trl's SFTTrainer; return the loss per logged step.

    Saves the adapter (or the full model) and the tokenizer in ``output_dir``; the loss
    curve goes to ``output_dir/loss.csv``.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from refine_af_utils.models import ensure_distinct_pad_token

    output_dir = Path(output_dir)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    ensure_distinct_pad_token(tokenizer, model)
    tokenizer.padding_side = "right"
    dataset = Dataset.from_list(sft_records(instances, tokenizer.eos_token))
    args = SFTConfig(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, max_length=max_length, completion_only_loss=True,
        logging_steps=1, save_strategy="no", report_to=[], seed=seed, use_cpu=use_cpu, disable_tqdm=False,
    )
    peft_config = None if full_fine_tuning else LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(output_dir)
    losses = pd.DataFrame([{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e])
    losses.to_csv(output_dir / "loss.csv", index=False)
    return losses
