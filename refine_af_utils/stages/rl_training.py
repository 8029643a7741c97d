"""Stage 3: RL from automated feedback on the instance generator, with a held-out evaluation.

The policy is the backbone with a LoRA adapter; its prompts are stage 2's instance prompts over
a seeded training subset of stage 1's instructions (the rest is held out); its rollouts decode
with stage 4's settings (``instance_generation``: temperature, top_p, new tokens, stop strings)
and are turned into instances by the one extraction rule of stages 2-4
(:func:`refine_af_utils.instances.extract_instances`), then scored with stage 2's reward.
``rl.algorithm`` picks the trainer from :data:`TRAINERS`:

* ``ppo`` (the paper's): trl's ``trl.experimental.ppo.PPOTrainer`` with a value model and the
  adapter-disabled backbone as the KL reference. trl's PPO asks for the reward as a
  sequence-classification model; :class:`~refine_af_utils.rl_reward.RefineAFRewardModel` gives it that interface.
* ``grpo`` / ``rloo``: trl's ``GRPOTrainer`` / ``RLOOTrainer`` with the same reward as one
  reward function.

The reward of a completion is its content reward (the mean Eq. 1 reward of its kept instances)
or, when it yields no instance, stage 2's mean content reward minus
``rl.parse_penalty_sd`` of its standard deviations (:func:`refine_af_utils.reward.unparsed_reward`).

Training runs in segments of ``rl.checkpoint_every`` updates; after each segment the adapter,
the value model (PPO) and the metrics rows are saved, and a rerun resumes after the last saved
segment. Each segment starts a fresh optimiser (constant learning rates) from a seed derived
from the run's seed and the segment, so the same seed gives the same adapter.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from refine_af_utils.figures import components_figure, heldout_figure, reward_kl_figure
from refine_af_utils.generation import Generation
from refine_af_utils.files import atomic_write_text, read_whole_csv, whole_csv_rows
from refine_af_utils.layout import RL_CHECKPOINT, RL_CHECKPOINT_COMPLETE, RunLayout, stage_of_module
from refine_af_utils.run_folder import StageResult, stage_entry
from refine_af_utils.params import Params
from refine_af_utils.processes import is_main_process, wait_for_every_process
from refine_af_utils.reward import COMPONENTS, unparsed_reward
from refine_af_utils.prompts import INSTANCE_STOP_STRINGS
from refine_af_utils.rl_reward import (CompletionScorer, OptimiserView, RefineAFRewardModel, exploiting_probes,
                                      group_reward_function, reward_probe)
from refine_af_utils.scorers import Scorer
from refine_af_utils import trl_bridge
from refine_af_utils.seeding import derive_seed
from refine_af_utils.stats import paired_summary
from refine_af_utils.library_noise import quiet_known_noise
from refine_af_utils.progress import use_text_progress

# PPO lives in trl.experimental in the pinned trl (1.9.2, the last release that ships it); we
# use it on purpose, so its "experimental API" warning is silenced.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

GENERATORS = ("base", "trained")
METRIC_COLUMNS = ["update", "reward", "parsed_share", "content_reward", "unparsed_reward", "kl", "kl_penalty",
                  "policy_loss", "value_loss", "entropy", *COMPONENTS]

_STAGE = stage_of_module(__name__)  # this module's stage in the registry


class MetricsLogger:
    """Appends one ``metrics.csv`` row per update: the parse and content terms apart, KL and losses.

    Only the main process writes (under ``accelerate``, each process has its own copy).
    """

    def __init__(self, path: Path, scorer: CompletionScorer, offset: int, kl_coef: float) -> None:
        self.path = path
        self.scorer = scorer
        self.offset = offset
        self.kl_coef = kl_coef
        self._seen = len(scorer.history)

    def row(self, step: int, logs: dict[str, float]) -> dict[str, float]:
        """One metrics row from the completions scored since the last row and trl's log dict."""
        recent = self.scorer.history[self._seen:]
        self._seen = len(self.scorer.history)
        parsed = [r for r in recent if r.parsed]
        out: dict[str, float] = {"update": self.offset + step}
        out["reward"] = float(np.mean([r.reward for r in recent])) if recent else float("nan")
        out["parsed_share"] = len(parsed) / len(recent) if recent else float("nan")
        out["content_reward"] = float(np.mean([r.content for r in parsed])) if parsed else float("nan")
        out["unparsed_reward"] = self.scorer.unparsed_reward
        theirs = {"kl": ("objective/kl", "kl"), "policy_loss": ("loss/policy_avg", "loss"),
                  "value_loss": ("loss/value_avg",), "entropy": ("objective/entropy", "entropy")}
        for ours, keys in theirs.items():
            out[ours] = next((float(logs[k]) for k in keys if k in logs), float("nan"))
        out["kl_penalty"] = self.kl_coef * out["kl"]
        for name in COMPONENTS:
            out[name] = float(np.mean([r.components[name] for r in parsed])) if parsed else float("nan")
        return {key: out[key] for key in METRIC_COLUMNS}

    def append(self, row: dict[str, float]) -> None:
        """Append a row (header first when the file is new), flushed to disk."""
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())


def metrics_callback(logger: MetricsLogger) -> Any:
    """A transformers callback that logs each update's row, on the main process only."""
    from transformers import TrainerCallback

    class _LogToCsv(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102 (trl's hook)
            if not state.is_world_process_zero:
                return
            if logs and any(k in logs for k in ("objective/scores", "reward", "loss")):
                logger.append(logger.row(state.global_step, logs))

    return _LogToCsv()


def _dtype(params: Params) -> torch.dtype:
    """The torch dtype the backbone loads in, for trl's bf16 / fp16 flags."""
    from refine_af_utils.models import torch_dtype

    return torch_dtype(params.model.dtype, params.model.device)


@dataclass
class Segment:
    """What one training segment needs: the policy, its prompts, the scorer and where to log."""

    params: Params
    policy: Any
    tokenizer: Any
    rows: list[dict[str, Any]]
    scorer: CompletionScorer
    logger: MetricsLogger
    output_dir: Path
    seed: int
    updates: int
    last_checkpoint: Optional[Path]


@dataclass
class SegmentResult:
    """The trained policy, the value model (PPO only) and the trainer's accelerator-aware save guard."""

    policy: Any
    value_model: Any
    is_main_process: bool


def train_ppo_segment(segment: Segment) -> SegmentResult:
    """PPO (trl experimental) for ``segment.updates`` updates; the critic (``rl.critic``) has its own learning rate."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from refine_af_utils.models import encode_prompts
    from refine_af_utils.ppo_critic import build_critic, checkpoint_activations

    params, cfg, tokenizer = segment.params, segment.params.rl, segment.tokenizer
    decoding = params.instance_generation
    saved = None if segment.last_checkpoint is None else segment.last_checkpoint / "value_model"
    value_model = build_critic(cfg.critic, segment.policy, params.model, tokenizer, saved)
    encoded = [{"input_ids": encode_prompts(tokenizer, r["prompt"])["input_ids"]} for r in segment.rows]
    reward_model = RefineAFRewardModel(tokenizer, segment.scorer, [(e["input_ids"], r) for e, r in zip(encoded, segment.rows)],
                                       decoding.max_new_tokens)
    policy_parameters = [p for p in segment.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": policy_parameters, "lr": cfg.learning_rate},
        {"params": [p for p in value_model.parameters() if p.requires_grad], "lr": cfg.value_learning_rate},
    ])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = PPOConfig(**trl_bridge.ppo_config_args(params, segment.output_dir, segment.seed, segment.updates,
                                                  _dtype(params)))
    if params.rl.activation_checkpointing:  # as in the config's field (trl_bridge)
        checkpoint_activations(segment.policy, value_model)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=segment.policy, ref_model=None,
                         reward_model=reward_model, train_dataset=Dataset.from_list(encoded),
                         eval_dataset=Dataset.from_list(encoded[: cfg.batch_size]), value_model=value_model,
                         peft_config=None, optimizers=(optimizer, scheduler),
                         callbacks=[metrics_callback(segment.logger)])
    trl_bridge.expose_ppo_models(trainer)  # several processes: trl reads .policy on the DDP-wrapped model
    # trl cycles its dataloader; at the end of an epoch accelerate would step on every micro-batch of that update
    trainer.accelerator.gradient_state.plugin_kwargs["sync_with_dataloader"] = False
    use_text_progress(trainer, "stage 3: PPO updates")
    ends = (trl_bridge.ppo_rollouts_end_at_stop_strings(tokenizer, INSTANCE_STOP_STRINGS)
            if cfg.stop_at_stop_strings else contextlib.nullcontext())
    with quiet_known_noise(), trl_bridge.ppo_logprobs_from_forward(), ends:  # KL 0 at update 1: see trl_bridge
        trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    return SegmentResult(unwrapped.policy, unwrapped.value_model, trainer.accelerator.is_main_process)


def _train_group_segment(segment: Segment, algorithm: str) -> SegmentResult:
    from datasets import Dataset

    if algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    params = segment.params
    config = Config(**trl_bridge.group_config_args(params, segment.output_dir, segment.seed, segment.updates,
                                                   _dtype(params)))
    reward = group_reward_function(segment.scorer, segment.tokenizer, params.instance_generation.max_new_tokens)
    trainer = Trainer(model=segment.policy, reward_funcs=[reward], args=config,
                      train_dataset=Dataset.from_list(segment.rows), processing_class=segment.tokenizer,
                      callbacks=[metrics_callback(segment.logger)])
    trl_bridge.reference_is_the_base(trainer)  # a resumed segment's KL is to the base, not to its own start
    use_text_progress(trainer, f"stage 3: {algorithm.upper()} updates")
    ends = (trl_bridge.group_rollouts_end_at_stop_strings(trainer, segment.tokenizer, INSTANCE_STOP_STRINGS)
            if params.rl.stop_at_stop_strings else contextlib.nullcontext())
    with ends:
        trainer.train()
    return SegmentResult(trainer.accelerator.unwrap_model(trainer.model), None, trainer.accelerator.is_main_process)


def train_grpo_segment(segment: Segment) -> SegmentResult:
    """trl's GRPO: ``rl.num_generations`` completions per prompt, group-relative advantages."""
    return _train_group_segment(segment, "grpo")


def train_rloo_segment(segment: Segment) -> SegmentResult:
    """trl's RLOO: ``rl.num_generations`` completions per prompt, leave-one-out baselines."""
    return _train_group_segment(segment, "rloo")


TRAINERS: dict[str, Callable[[Segment], SegmentResult]] = {
    "ppo": train_ppo_segment, "grpo": train_grpo_segment, "rloo": train_rloo_segment,
}


def split_instructions(records: Sequence[dict[str, Any]], heldout: int, num_prompts: int,
                       random_seed: int) -> list[dict[str, Any]]:
    """Each stage 1 record with ``split``: ``heldout``, ``train`` or ``unused``; a seeded, content-keyed split.

    Instructions are ordered by a seed derived from their text, so the split does not depend on
    their order in the file: the first ``heldout`` are held out, the next ``num_prompts`` train.
    """
    if heldout >= len(records):
        raise ValueError(f"rl.heldout_instructions ({heldout}) leaves no training prompt: "
                         f"stage 1 made {len(records)} instructions")
    ordered = sorted(records, key=lambda r: (derive_seed(random_seed, _STAGE.id, "split", r["instruction"]), r["instruction"]))
    splits = {r["instruction"]: ("heldout" if n < heldout else "train" if n < heldout + num_prompts else "unused")
              for n, r in enumerate(ordered)}
    return [{**r, "split": splits[r["instruction"]]} for r in records]


def rl_prompts(params: Params, run_dir: Path) -> list[dict[str, Any]]:
    """Stage 1 instructions with their split and instance prompt (stage 2's); written to ``rl_training/prompts.jsonl``."""
    from refine_af_utils.instances import instance_prompts

    layout = RunLayout(run_dir)
    records = split_instructions(layout.instructions(), params.rl.heldout_instructions,
                                 params.rl.num_prompts, params.random_seed)
    prompts = instance_prompts(records, layout.seed_tasks(), params.instance_generation, params.random_seed)
    rows = [{"instruction_id": r["id"], "instruction": r["instruction"], "is_classification": r["is_classification"],
             "split": r["split"], "prompt": p} for p, r in zip(prompts, records)]
    if is_main_process():  # every process computes the same rows; one writes them
        atomic_write_text(layout.rl_prompts_file, "".join(
            json.dumps({k: r[k] for k in ("instruction", "is_classification", "split")}, ensure_ascii=False) + "\n"
            for r in rows))
    return rows


def _last_saved_update(checkpoints: Path) -> tuple[int, Optional[Path]]:
    done = sorted((int(p.name.split("-")[1]), p) for p in checkpoints.glob(RL_CHECKPOINT.format(update="*"))
                  if (p / RL_CHECKPOINT_COMPLETE).is_file())
    return done[-1] if done else (0, None)


def truncate_metrics(path: Path, updates_done: int) -> None:
    """Keep only whole ``metrics.csv`` rows of updates up to the last checkpoint.

    A row torn by a crash (no final newline, or a wrong number of fields) is cut off, and rows
    of updates after the last checkpoint go: those updates are trained again.
    """
    if not path.is_file():
        return
    header, rows = whole_csv_rows(path)
    kept = [line for line in rows if float(line.split(",")[0]) <= updates_done]
    if not kept:
        path.unlink()
    elif path.read_text(encoding="utf-8") != "\n".join([header, *kept]) + "\n":
        atomic_write_text(path, "\n".join([header, *kept]) + "\n")


@dataclass
class HeldoutResult:
    """The held-out evaluation: one row per instruction, the paired differences with CIs, the figure."""

    per_instruction: pd.DataFrame
    summary: pd.DataFrame
    figure: Path


@dataclass
class RLTrainingResult(StageResult):
    """What stage 3 made: the metrics table, the adapter folder, the held-out evaluation, the reward probe
    and the figures."""

    metrics: pd.DataFrame
    adapter_dir: Path
    heldout: Optional[HeldoutResult]
    probe: Optional[pd.DataFrame] = None


def _stage_scorer(params: Params, run_dir: Path, scorers: Optional[dict[str, Scorer]]) -> CompletionScorer:
    from refine_af_utils.reward import build_scorers, check_scorers

    unparsed = unparsed_reward(run_dir, params)  # stage 2's scores first, then the scorers' devices
    if scorers is None:
        check_scorers(params.reward)
    cache = RunLayout(run_dir).score_cache if is_main_process() else None  # one writer of the score cache
    scorers = scorers or build_scorers(params.reward, cache)
    return CompletionScorer(scorers, params.reward, unparsed,
                            params.instance_generation.max_instances_per_task)


def optimiser_view(params: Params, run_dir: Path, segment_seed: int) -> OptimiserView:
    """What RL optimises in place of Eq. 1 (``rl.standardise_reward``, ``rl.placebo``); the placebo's shuffles
    are seeded per segment, so a resumed run shuffles as an uninterrupted one."""
    from refine_af_utils.reward import content_reward_scale

    shift, scale = 0.0, 1.0
    if params.rl.standardise_reward:
        shift, scale, _ = content_reward_scale(run_dir, params.reward)
    return OptimiserView(shift, scale, derive_seed(segment_seed, "placebo") if params.rl.placebo else None)


def train_generator(params: Params, run_dir: str | Path, scorers: Optional[dict[str, Scorer]] = None,
                    scorer: Optional[CompletionScorer] = None) -> tuple[pd.DataFrame, Path]:
    """Train the LoRA instance generator with ``rl.algorithm``, resuming from checkpoints.

    Returns the metrics table and the final adapter folder.
    """
    from peft import PeftModel, get_peft_model
    from transformers import set_seed

    from refine_af_utils.models import check_lora_targets, check_model_params, load_causal_lm, lora_config
    from refine_af_utils.run_folder import open_stage

    cfg = params.rl
    stage = open_stage(__name__, params, run_dir)
    run_dir, layout = stage.run_dir, stage.layout
    layout.seed_tasks(), layout.instructions()  # inputs, device and model first: a failed run leaves no config
    check_model_params(params.model)
    check_lora_targets(params.model, params.rl.lora, "rl.lora")
    scorer = scorer or _stage_scorer(params, run_dir, scorers)  # checks stage 2's outputs and the scorers
    checkpoints = layout.rl_checkpoints
    stage.check_config()  # rl.updates may grow: training continues
    rows = [r for r in rl_prompts(params, run_dir) if r["split"] == "train"]
    done, last = _last_saved_update(checkpoints)
    if is_main_process():  # under a launch, rank 0 alone writes the run's files
        truncate_metrics(layout.rl_metrics_file, done)
    while done < cfg.updates:
        updates = min(cfg.checkpoint_every, cfg.updates - done)
        seed = stage.derive_seed("segment", done)
        set_seed(seed)  # LoRA and value-head initialisation, dropout and sampling: the same on every run
        base, tokenizer = load_causal_lm(params.model)  # left padding, pad token distinct from eos
        if last is not None:
            policy = PeftModel.from_pretrained(base, last / "adapter", is_trainable=True)
        else:
            policy = get_peft_model(base, lora_config(params.rl.lora))
        segment_dir = checkpoints / RL_CHECKPOINT.format(update=done + updates)
        if is_main_process():
            shutil.rmtree(segment_dir, ignore_errors=True)
        scorer.optimiser_view = optimiser_view(params, run_dir, seed)
        segment = Segment(params, policy, tokenizer, rows, scorer,  # KL penalty logged in Eq. 1 units
                          MetricsLogger(layout.rl_metrics_file, scorer, done, cfg.kl_coef * scorer.optimiser_view.scale),
                          segment_dir, seed, updates, last)
        result = TRAINERS[cfg.algorithm](segment)
        if result.is_main_process:  # under accelerate, one process writes the checkpoint
            segment_dir.mkdir(parents=True, exist_ok=True)
            result.policy.save_pretrained(segment_dir / "adapter")
            if result.value_model is not None:
                result.value_model.save_pretrained(segment_dir / "value_model")
            atomic_write_text(segment_dir / RL_CHECKPOINT_COMPLETE, json.dumps({"updates": done + updates}) + "\n")
            if last is not None:
                shutil.rmtree(last, ignore_errors=True)  # keep only the newest checkpoint
        wait_for_every_process(params.model.device)  # no rank reads the checkpoint before it is whole
        done, last = done + updates, segment_dir
        del result, segment, policy, base  # free this segment's models before the next one loads its own
        gc.collect()
    adapter_dir = layout.adapter
    if is_main_process() and last is not None and (last / RL_CHECKPOINT_COMPLETE).is_file():
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.copytree(last / "adapter", adapter_dir)
    wait_for_every_process(params.model.device)
    return read_whole_csv(layout.rl_metrics_file), adapter_dir


def heldout_samples(params: Params, run_dir: Path, adapter_dir: Path) -> list[dict[str, Any]]:
    """K completions per held-out instruction from the base and the trained generator, resumable.

    Both generators decode with stage 4's settings and draw the same noise: each batch is seeded
    by (sample number, its first instruction), the same for both. Rows are appended batch by
    batch to ``rl_training/heldout_samples.jsonl``; a rerun regenerates a half-written batch whole and
    appends only the missing rows.
    """
    from refine_af_utils.engines import load_engine
    from refine_af_utils.instances import generate_instances
    from refine_af_utils.resumable import resume_batches

    cfg, decoding = params.rl, params.instance_generation
    records = [r for r in rl_prompts(params, run_dir) if r["split"] == "heldout"]
    # One job per (generator, sample, instruction), in batches of one generator and sample, so both
    # generators see the same batches and the same noise.
    jobs = [(generator, sample, r) for generator in GENERATORS for sample in range(cfg.heldout_samples) for r in records]

    def load(generator: str) -> Any:
        if params.model.engine != "static":  # the trained generator merged, as stage 4 loads it
            return load_engine(params.model, adapter_dir if generator == "trained" else None, params.random_seed)
        # static: the adapter applied unmerged and switched off for the base, as trl's rollouts decode
        from peft import PeftModel

        from refine_af_utils.engines import StaticEngine
        from refine_af_utils.models import load_causal_lm

        base, tokenizer = load_causal_lm(params.model)
        return StaticEngine(PeftModel.from_pretrained(base, adapter_dir), tokenizer,
                            adapter_disabled=generator == "base")

    engines = HeldoutEngines(load)

    def generate(context: HeldoutEngines, batch: list[tuple[str, int, dict[str, Any]]],
                 seed: Optional[int]) -> list[dict[str, Any]]:
        generator, sample = batch[0][0], batch[0][1]
        prompts = [r["prompt"] for _, _, r in batch]
        generations = generate_instances(context.engine(generator), prompts, decoding, seed)
        return [{"generator": generator, "instruction": r["instruction"], "is_classification": r["is_classification"],
                 "sample": sample, "text": g.text, "truncated": g.truncated} for (_, _, r), g in zip(batch, generations)]

    return resume_batches(
        RunLayout(run_dir).heldout_samples_file, jobs, job_key=lambda job: (job[0], job[2]["instruction"], job[1]),
        record_key=lambda r: (r["generator"], r["instruction"], r["sample"]), batch_size=decoding.batch_size,
        load=lambda: engines, generate=generate, desc="held-out samples", group=lambda job: job[:2],
        seed=lambda batch: derive_seed(params.random_seed, _STAGE.id, "heldout", batch[0][1], batch[0][2]["instruction"]))


class HeldoutEngines:
    """One engine at a time for the held-out generators (base, then trained: the jobs' order), each loaded on
    first use; the trained one has stage 3's adapter merged."""

    def __init__(self, load: Callable[[str], Any]) -> None:
        self.load, self.current, self.generator = load, None, None

    def engine(self, generator: str) -> Any:
        """The engine of ``generator``, closing the other one first."""
        if generator != self.generator:
            self.close()
            self.current, self.generator = self.load(generator), generator
        return self.current

    def close(self) -> None:
        """Close the engine held, if any."""
        if self.current is not None:
            self.current.close()
        self.current, self.generator = None, None


# The held-out endpoints: the full reward (primary), the parsed share and the content reward, then each reward
# component of the parsed samples, the kept outputs' length in words and their copy rate (ROUGE-L F of the
# output against the instruction and input): secondary, and like the content reward undefined where nothing parsed;
# last the KL to the base (kl_to_base_logratios), defined for every sample.
HELDOUT_MEASURES = ("reward", "parsed", "content", *COMPONENTS, "output_words", "copy_rouge_l", "kl_to_base")


def kl_to_base_logratios(params: Params, run_dir: Path, adapter_dir: Path,
                         samples: Sequence[dict[str, Any]]) -> list[float]:
    """Per held-out sample, its KL-to-the-base term: 0 for the base generator's (the base against itself); for the
    trained generator's, log p_trained(y | x) - log p_base(y | x) summed over the tokens of its kept text y
    (re-tokenised after the prompt x), so the mean over an instruction's samples estimates the trained generator's
    KL from the base per completion, in nats, on instructions RL never saw."""
    from peft import PeftModel

    from refine_af_utils.models import encode_prompts, load_causal_lm
    from refine_af_utils.progress import tqdm

    prompts = {r["instruction"]: r["prompt"] for r in rl_prompts(params, run_dir) if r["split"] == "heldout"}
    ratios = [0.0] * len(samples)
    trained = [i for i, s in enumerate(samples) if s["generator"] == "trained"]
    if not trained:
        return ratios
    base, tokenizer = load_causal_lm(params.model)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()

    def completion_logprobs(ids: torch.Tensor, start: int) -> torch.Tensor:
        logits = model(input_ids=ids).logits[0, start - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[0, start:].unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        for i in tqdm(trained, desc="held-out KL to the base", unit="sample"):
            prompt_ids = encode_prompts(tokenizer, prompts[samples[i]["instruction"]])["input_ids"]
            completion_ids = tokenizer(samples[i]["text"], add_special_tokens=False)["input_ids"]
            if not completion_ids:
                continue  # an empty completion: the same under both
            ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
            trained_logprobs = completion_logprobs(ids, len(prompt_ids))
            with model.disable_adapter():
                base_logprobs = completion_logprobs(ids, len(prompt_ids))
            ratios[i] = float((trained_logprobs - base_logprobs).sum())
    return ratios


def output_shape(instances: Sequence[Any]) -> dict[str, float]:
    """The mean output length in words and copy rate (ROUGE-L F of the output against the instruction and
    its input) of one completion's kept instances; NaN for both when it kept none."""
    from refine_af_utils.rouge import rouge_l

    if not instances:
        return {"output_words": float("nan"), "copy_rouge_l": float("nan")}
    return {"output_words": float(np.mean([len(i.output.split()) for i in instances])),
            "copy_rouge_l": float(np.mean([rouge_l(i.output, [f"{i.instruction}\n{i.input}".strip()])[0]
                                           for i in instances]))}


def heldout_table(samples: Sequence[dict[str, Any]], scorer: CompletionScorer,
                  kl_to_base: Optional[Sequence[float]] = None) -> pd.DataFrame:
    """One row per held-out instruction: each generator's mean reward, parsed share, content reward and components.

    ``*_reward`` is the mean full reward over the K samples (the parse penalty included),
    ``*_parsed`` the share of samples that yielded an instance, ``*_content`` the mean content
    reward over those (empty when none did), and likewise each component and :func:`output_shape`;
    ``*_kl_to_base``: the mean of each sample's :func:`kl_to_base_logratios` term (NaN where not given).
    """
    results = scorer.score(samples, [Generation(s["text"], s["truncated"], 0) for s in samples], progress=True)
    kl = list(kl_to_base) if kl_to_base is not None else [float("nan")] * len(samples)
    table = pd.DataFrame([{"generator": s["generator"], "instruction": s["instruction"], "reward": r.reward,
                           "parsed": float(r.parsed), "content": r.content, **r.components, **output_shape(r.instances),
                           "kl_to_base": k}
                          for s, r, k in zip(samples, results, kl)])
    per = table.groupby(["instruction", "generator"], sort=False)[list(HELDOUT_MEASURES)].mean().unstack("generator")
    per.columns = [f"{generator}_{measure}" for measure, generator in per.columns]
    order = [f"{g}_{m}" for m in HELDOUT_MEASURES for g in GENERATORS]
    return per[order].reset_index()


def evaluate_heldout(params: Params, run_dir: str | Path, adapter_dir: Path,
                     scorer: CompletionScorer) -> HeldoutResult:
    """Stage 3's held-out evaluation: base vs trained generator on instructions RL never saw."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    samples = heldout_samples(params, run_dir, adapter_dir)
    table = heldout_table(samples, scorer, kl_to_base_logratios(params, run_dir, adapter_dir, samples))
    table.to_csv(layout.heldout_eval_file, index=False)
    summary = paired_summary(table, {m: (f"base_{m}", f"trained_{m}") for m in HELDOUT_MEASURES},
                             derive_seed(params.random_seed, _STAGE.id, "heldout-ci"))
    summary.to_csv(layout.heldout_summary_file, index=False)
    figure = heldout_figure(summary, layout.file(_STAGE.id, "fig_heldout"),
                            f"Held-out instructions (n={len(table)}): trained minus base generator, 95% CI")
    return HeldoutResult(table, summary, figure)


def probe_reward(params: Params, run_dir: Path, scorer: CompletionScorer) -> pd.DataFrame:
    """The judge-exploitation probe (:func:`refine_af_utils.rl_reward.reward_probe`) on the held-out
    instructions' base samples, against stage 2's mean content reward; written to ``reward_probe.csv``."""
    from refine_af_utils.files import read_jsonl
    from refine_af_utils.reward import content_reward_scale

    layout = RunLayout(run_dir)
    reference, _, _ = content_reward_scale(run_dir, params.reward)
    probe = reward_probe(scorer, read_jsonl(layout.file(_STAGE.id, "heldout_samples")), reference)
    probe.to_csv(layout.file(_STAGE.id, "reward_probe"), index=False)
    return probe


@stage_entry
def run(params: Params, run_dir: str | Path) -> RLTrainingResult:
    """Stage 3 for the notebook: train (or resume), evaluate on held-out instructions, record headlines."""
    from refine_af_utils.run_folder import open_stage

    stage = open_stage(__name__, params, run_dir)
    scorer = _stage_scorer(params, stage.run_dir, None)
    metrics, adapter_dir = train_generator(params, stage.run_dir, scorer=scorer)
    heldout = evaluate_heldout(params, stage.run_dir, adapter_dir, scorer)
    probe = probe_reward(params, stage.run_dir, scorer)
    figures = {"reward_kl": reward_kl_figure(metrics, params.rl.algorithm, stage.file("fig_reward_kl")),
               "components": components_figure(metrics, stage.file("fig_components")),
               "heldout": heldout.figure}
    gain = heldout.summary.set_index("measure")
    half = max(1, len(metrics) // 2)
    stage.record_metrics({
        "algorithm": params.rl.algorithm, "updates": int(len(metrics)),
        "unparsed_reward": scorer.unparsed_reward,
        "first_half_reward": float(metrics["reward"].iloc[:half].mean()),
        "second_half_reward": float(metrics["reward"].iloc[half:].mean()) if len(metrics) > 1 else None,
        "first_kl": float(metrics["kl"].iloc[0]),  # 0 while policy and reference are equal (LoRA B = 0)
        "last_kl": float(metrics["kl"].iloc[-1]),
        "heldout_instructions": int(len(heldout.per_instruction)),
        **{f"heldout_{m}_gain": float(gain.loc[m, "mean_difference"]) for m in gain.index},
        **{f"heldout_{m}_gain_ci_low": float(gain.loc[m, "ci_low"]) for m in gain.index},
        **{f"heldout_{m}_gain_ci_high": float(gain.loc[m, "ci_high"]) for m in gain.index},
        "probe_exploitable": bool(exploiting_probes(probe)),
    })
    return RLTrainingResult(metrics, adapter_dir, heldout, probe, figures=figures)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m refine_af_utils.stages.rl_training PARAMS`` (or under ``accelerate launch``): stage 3's training alone."""
    from refine_af_utils.run_folder import stage_command_line

    with stage_command_line(main.__doc__, argv, __name__) as (params, run_dir):
        metrics, _ = train_generator(params, run_dir)
    print(metrics.to_string())


if __name__ == "__main__":
    main()
