"""Stage 5: supervised fine-tuning of the base backbone on each arm's instances.

The prompt is the instruction, then the input when there is one, then ``Output:``; the loss
covers the output only (trl's prompt/completion format with ``completion_only_loss``).
LoRA by default (``sft.full_fine_tuning`` for all weights). Both arms use the same settings,
seed and order of steps. Each arm trains in ``sft/<arm>/``: checkpoints every
``sft.save_steps`` steps (a rerun resumes from the last one), the final adapter (or model)
in ``sft/<arm>/model`` and the loss per step in ``sft/<arm>/loss.csv``.

Multi-GPU: ``accelerate launch --config_file params/accelerate_configs/multi_gpu.yaml -m
refine_af_utils.stages.sft PARAMS`` trains both arms, then the notebook picks the results up.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from refine_af_utils.figures import sft_loss_figure
from refine_af_utils.external_arms import load_external_arm, records_sha256
from refine_af_utils.layout import ARMS, SFT_COMPLETE, SFT_LOSS, SFT_MODEL, TRAINER_STATE, RunLayout, stage_of_module
from refine_af_utils.run_folder import StageResult, stage_entry
from refine_af_utils.params import ModelParams, Params, SFTParams
from refine_af_utils.prompts import sft_prompt
from refine_af_utils.files import atomic_write_text, sha256_file
from refine_af_utils import trl_bridge
from refine_af_utils.seeding import derive_seed
from refine_af_utils.progress import use_text_progress

_STAGE = stage_of_module(__name__)  # this module's stage in the registry


def sft_records(instances: Sequence[dict[str, Any]], eos_token: str) -> list[dict[str, str]]:
    """trl prompt/completion records; the completion ends with the end token so the model learns to stop."""
    return [{"prompt": sft_prompt(r["instruction"], r.get("input", "")), "completion": f" {r['output'].strip()}{eos_token}"}
            for r in instances]


def _last_whole_checkpoint(folder: Path) -> Optional[Path]:
    # trainer_state.json is written last: a folder without it is a save cut short by a crash
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if (p / TRAINER_STATE).is_file()),
                         key=lambda p: int(p.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


def fine_tune(model_spec: ModelParams, instances: Sequence[dict[str, Any]], output_dir: str | Path,
              cfg: SFTParams, seed: int = 42, callbacks: Sequence[Any] = ()) -> pd.DataFrame:
    """Fine-tune the backbone on ``instances`` with trl's SFTTrainer; return the loss per logged step.

    Resumes from the newest ``output_dir/checkpoint-*``; when done, saves the adapter (or the
    full model) and the tokenizer to ``output_dir/model``, the losses to ``output_dir/loss.csv``,
    writes ``output_dir/complete`` and removes the checkpoints. A completed arm is not retrained.
    ``callbacks`` are extra transformers ``TrainerCallback`` objects.
    """
    output_dir = Path(output_dir)
    if (output_dir / SFT_COMPLETE).is_file():
        return pd.read_csv(output_dir / SFT_LOSS)
    if not instances:
        raise ValueError(f"{output_dir}: no instances to fine-tune on (stage 4 kept none for this arm)")
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from refine_af_utils.models import load_pretrained, lora_config, torch_dtype

    model, tokenizer = load_pretrained(model_spec)  # the trainer places it (one device per process)
    tokenizer.padding_side = "right"
    dtype = torch_dtype(model_spec.dtype, model_spec.device)
    args = SFTConfig(**trl_bridge.sft_config_args(cfg, output_dir, seed, model_spec.device, dtype))
    peft_config = None if cfg.full_fine_tuning else lora_config(cfg.lora)
    set_seed(seed)  # the LoRA initialisation happens in SFTTrainer: the same for both arms and on resume
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_records(instances, tokenizer.eos_token)),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    use_text_progress(trainer, f"stage 5: SFT {output_dir.name}")
    checkpoint = _last_whole_checkpoint(output_dir)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not trainer.is_world_process_zero():
        return pd.DataFrame()
    final = output_dir / SFT_MODEL
    shutil.rmtree(final, ignore_errors=True)
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    losses = pd.DataFrame([{"step": e["step"], "epoch": round(e["epoch"], 4), "loss": e["loss"]}
                           for e in trainer.state.log_history if "loss" in e])
    losses.to_csv(output_dir / SFT_LOSS, index=False)
    atomic_write_text(output_dir / SFT_COMPLETE, json.dumps({"steps": int(trainer.state.global_step)}) + "\n")
    for old in output_dir.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)
    return losses


def training_sets(params: Params, run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Each arm's SFT examples: its stage 4 instances, equalised in number, plus the seed tasks if asked.

    With ``sft.equal_examples`` the larger arm is subsampled (seeded, order kept) to the smaller
    arm's size, so both arms train on as many examples and steps and data quantity is not
    confounded with quality; an ``sft.external_arms`` set is subsampled the same way. ``sft.include_seed_tasks``
    adds every seed task's instances to both arms (not to an external one), as Self-Instruct's fine-tuning
    data did.
    """
    import random

    layout = RunLayout(run_dir)
    data = {arm: layout.arm_instances(arm) for arm in ARMS}
    data.update({name: load_external_arm(name, source) for name, source in params.sft.external_arms.items()})
    if params.sft.equal_examples:  # every set to the smaller arm's size (an external arm too, if larger)
        size = min(len(data[arm]) for arm in ARMS)
        for name, records in data.items():
            rng = random.Random(derive_seed(params.random_seed, _STAGE.id, "equal-examples", name))
            data[name] = [records[i] for i in sorted(rng.sample(range(len(records)), min(size, len(records))))]
    if params.sft.include_seed_tasks:
        seeds = [{"instruction": t.instruction, "input": i.input, "output": i.output}
                 for t in layout.seed_tasks() for i in t.instances]
        data = {arm: records + seeds if arm in ARMS else records for arm, records in data.items()}
    return data


def train_arms(params: Params, run_dir: str | Path,
               data: Optional[dict[str, list[dict[str, Any]]]] = None) -> dict[str, pd.DataFrame]:
    """Fine-tune the base backbone on each arm's training set (``data``, else :func:`training_sets`; resuming);
    the loss table per arm."""
    from refine_af_utils.models import check_lora_targets, check_model_params
    from refine_af_utils.run_folder import open_stage

    stage = open_stage(__name__, params, run_dir)
    layout = stage.layout
    if data is None:
        data = training_sets(params, run_dir)  # reads and checks stage 4's datasets before anything is written
    check_model_params(params.model)
    if not params.sft.full_fine_tuning:
        check_lora_targets(params.model, params.sft.lora, "sft.lora")
    stage.check_config(**{f"{arm}_data_sha256": sha256_file(layout.arm_data(arm))  # each arm's adapter: one dataset
                          for arm in ARMS},
                       **{f"{name}_data_sha256": records_sha256(data[name]) for name in params.sft.external_arms})
    return {arm: fine_tune(params.model, records, layout.sft_arm(arm), params.sft, stage.derive_seed("trainer"))
            for arm, records in data.items()}


@dataclass
class SFTResult(StageResult):
    """Stage 5's loss table (one row per arm and step), the per-arm summary and the figure."""

    losses: pd.DataFrame
    summary: pd.DataFrame


@stage_entry
def run(params: Params, run_dir: str | Path) -> SFTResult:
    """Stage 5 for the notebook: train both arms, write ``sft/loss.csv`` and the loss figure."""
    from refine_af_utils.run_folder import open_stage

    sets = training_sets(params, run_dir)  # read once (an external arm may be large): trained on, then counted
    per_arm = train_arms(params, run_dir, sets)
    losses = pd.concat([table.assign(arm=arm) for arm, table in per_arm.items()], ignore_index=True)
    stage = open_stage(__name__, params, run_dir)
    layout = stage.layout
    losses.to_csv(stage.file("loss"), index=False)
    summary = pd.DataFrame({arm: {
        "stage 4 instances": len(layout.arm_instances(arm)) if arm in ARMS else None,  # an external arm: none
        "training examples": len(sets[arm]),
        "steps": int(table["step"].max()),
        "first loss": round(float(table["loss"].iloc[0]), 4),
        "last loss": round(float(table["loss"].iloc[-1]), 4),
    } for arm, table in per_arm.items()})
    summary.to_csv(stage.file("summary"))
    figure = sft_loss_figure(losses, stage.file("fig_loss"))
    stage.record_metrics({f"{arm}_{key.replace(' ', '_')}": value
                                   for arm, column in summary.items() for key, value in column.items()})
    return SFTResult(losses, summary, figures={"loss": figure})


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m refine_af_utils.stages.sft PARAMS`` (or under ``accelerate launch``): stage 5's training alone."""
    from refine_af_utils.run_folder import stage_command_line

    with stage_command_line(main.__doc__, argv, __name__) as (params, run_dir):
        for arm, table in train_arms(params, run_dir).items():
            print(arm, table.tail(1).to_string(index=False))


if __name__ == "__main__":
    main()
