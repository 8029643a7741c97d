"""Stage 3: RL from automated feedback on the instance generator.

The policy is the backbone with a LoRA adapter; its prompts are stage 2's instance
prompts over stage 1 instructions; its completions are parsed into instances and
scored with stage 2's reward. ``rl.algorithm`` picks the trainer:

* ``ppo`` (the paper's): trl's ``trl.experimental.ppo.PPOTrainer`` with a value model
  and the adapter-disabled backbone as the KL reference. trl's PPO asks for the reward
  as a sequence-classification model; :class:`RefineAFRewardModel` is the adapter that
  gives it that interface and computes the REFINE-AF reward from decoded text inside.
* ``grpo`` / ``rloo``: trl's ``GRPOTrainer`` / ``RLOOTrainer`` with one reward function
  per component and the paper's coefficients as ``reward_weights``.

Training runs in segments of ``rl.checkpoint_every`` updates; after each segment the
adapter, the value model (PPO) and the metrics rows are saved, and a rerun resumes after
the last saved segment. Each segment starts a fresh optimiser (constant learning rate).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from refine_af_utils.instances import filter_instances, parse_instances
from refine_af_utils.params import Params, RewardParams
from refine_af_utils.reward import COMPONENTS, component_weights, composite_reward
from refine_af_utils.scorers import InstanceText, Scorer

# PPO lives in trl.experimental in the pinned trl (1.9.2, the last release that ships it); we
# use it on purpose, so its "experimental API" warning is silenced.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

RL_DIR = "rl"
METRICS_FILE = "metrics.csv"


@dataclass
class CompletionReward:
    """The reward of one completion: the composite, its components and whether it parsed."""

    reward: float
    components: dict[str, float]
    parsed: bool


class CompletionScorer:
    """Parses completions into instances and scores them with stage 2's reward.

    A completion's components are the means over its kept instances. A completion that
    parses to no instance is scored as one instance whose output is the whole text, and
    ``invalid_reward`` is added to its composite reward.
    """

    def __init__(self, scorers: dict[str, Scorer], reward: RewardParams, invalid_reward: float,
                 max_instances: int = 5) -> None:
        self.scorers = scorers
        self.reward = reward
        self.weights = component_weights(reward)
        self.invalid_reward = invalid_reward
        self.max_instances = max_instances

    def instances_of(self, instruction: str, is_classification: bool, completion: str) -> tuple[list[InstanceText], bool]:
        """The instances a completion yields, and whether it parsed into any."""
        kept, _ = filter_instances(parse_instances(completion, is_classification), self.max_instances)
        if kept:
            return [InstanceText(instruction, i.input, i.output) for i in kept], True
        fallback = completion.strip() or "(empty)"
        return [InstanceText(instruction, "", fallback)], False

    def score(self, records: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[CompletionReward]:
        """One :class:`CompletionReward` per (instruction record, completion)."""
        flat: list[InstanceText] = []
        owners: list[int] = []
        parsed: list[bool] = []
        for index, (record, completion) in enumerate(zip(records, completions)):
            instances, ok = self.instances_of(record["instruction"], record["is_classification"], completion)
            flat.extend(instances)
            owners.extend([index] * len(instances))
            parsed.append(ok)
        columns = {name: scorer.score(flat, progress=False) for name, scorer in self.scorers.items()}
        owners_array = np.asarray(owners)
        per_completion = {name: np.array([values[owners_array == index].mean() for index in range(len(completions))])
                          for name, values in columns.items()}
        totals = composite_reward(per_completion, self.reward) + np.where(parsed, 0.0, self.invalid_reward)
        return [CompletionReward(float(totals[index]), {name: float(v[index]) for name, v in per_completion.items()},
                                 parsed[index]) for index in range(len(completions))]


class _RewardBackbone(nn.Module):
    """What trl's ``get_reward`` calls as ``getattr(model, model.base_model_prefix)``."""

    def __init__(self, owner: "RefineAFRewardModel") -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        rewards = self._owner[0].rewards_for_rows(input_ids, attention_mask)
        hidden = rewards.to(torch.float32).view(-1, 1, 1).expand(-1, input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=(hidden,))


class RefineAFRewardModel(nn.Module):
    """trl's PPO reward-model interface over the REFINE-AF reward.

    Contract (trl 1.9.2 ``trl.experimental.utils.get_reward``): trl calls
    ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., position_ids=...,
    return_dict=True, output_hidden_states=True, use_cache=False)`` on query + response tokens
    (padding replaced by id 0, mask = tokens != pad), then ``model.score(hidden_states[-1])`` and
    reads the value at the last response token. Here the backbone decodes each row, finds its
    registered prompt by token prefix, scores the response text with the stage 2 reward and
    returns that reward at every position; ``score`` is the identity.
    """

    base_model_prefix = "refine_af_backbone"

    def __init__(self, tokenizer: Any, completion_scorer: CompletionScorer,
                 prompts: Sequence[tuple[Sequence[int], dict[str, Any]]]) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.completion_scorer = completion_scorer
        self.refine_af_backbone = _RewardBackbone(self)
        self.score = nn.Identity()
        self.config = SimpleNamespace(model_type="refine_af_reward")
        self._prompts = {tuple(ids): record for ids, record in prompts}
        self._prompt_lengths = sorted({len(ids) for ids, _ in prompts}, reverse=True)
        self.history: list[CompletionReward] = []

    def split_row(self, tokens: Sequence[int]) -> tuple[dict[str, Any], list[int]]:
        """The registered prompt record a row starts with, and the response tokens after it."""
        for length in self._prompt_lengths:
            record = self._prompts.get(tuple(tokens[:length]))
            if record is not None:
                return record, list(tokens[length:])
        raise KeyError("a PPO row starts with no registered prompt (were the prompts tokenised the same way?)")

    def rewards_for_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The REFINE-AF reward of each row's response."""
        records, completions = [], []
        for row, mask in zip(input_ids.tolist(), attention_mask.bool().tolist()):
            tokens = [t for t, keep in zip(row, mask) if keep]
            record, response = self.split_row(tokens)
            records.append(record)
            completions.append(self.tokenizer.decode(response, skip_special_tokens=True))
        results = self.completion_scorer.score(records, completions)
        self.history.extend(results)
        return torch.tensor([r.reward for r in results], device=input_ids.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rewards as (batch, 1) logits, like a sequence-classification reward model."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.rewards_for_rows(input_ids, attention_mask).view(-1, 1)


def grpo_reward_functions(completion_scorer: CompletionScorer) -> tuple[list[Callable], list[float]]:
    """One trl reward function per component plus a format penalty, and their weights.

    trl calls each as ``f(prompts=..., completions=..., **dataset_columns)``; every function
    reads the same cached scores, so each completion is scored once.
    """
    memo: dict[tuple[str, str], CompletionReward] = {}

    def results(completions: Sequence[str], instruction: Sequence[str], is_classification: Sequence[bool]):
        todo = [(i, c, k) for i, c, k in zip(instruction, completions, is_classification) if (i, c) not in memo]
        if todo:
            scored = completion_scorer.score([{"instruction": i, "is_classification": k} for i, _, k in todo],
                                             [c for _, c, _ in todo])
            memo.update({(i, c): r for (i, c, _), r in zip(todo, scored)})
        return [memo[(i, c)] for i, c in zip(instruction, completions)]

    def component(name: str) -> Callable:
        def reward_function(prompts, completions, instruction, is_classification, **_):
            return [r.components[name] for r in results(completions, instruction, is_classification)]

        reward_function.__name__ = name
        return reward_function

    def parse_penalty(prompts, completions, instruction, is_classification, **_):
        return [0.0 if r.parsed else completion_scorer.invalid_reward
                for r in results(completions, instruction, is_classification)]

    functions = [component(name) for name in COMPONENTS] + [parse_penalty]
    weights = [completion_scorer.weights[name] for name in COMPONENTS] + [1.0]
    return functions, weights


class MetricsLogger:
    """A trl callback that appends one row per logged update to ``metrics.csv``."""

    def __init__(self, path: Path, reward_model: Optional[RefineAFRewardModel], offset: int,
                 invalid_reward: float) -> None:
        self.path = path
        self.reward_model = reward_model
        self.offset = offset
        self.invalid_reward = invalid_reward
        self._seen = 0

    def row(self, step: int, logs: dict[str, float]) -> dict[str, float]:
        """One metrics row in our column names from trl's log dict."""
        keys = {
            "reward": ("objective/scores", "reward"),
            "kl": ("objective/kl", "kl"),
            "policy_loss": ("loss/policy_avg", "loss"),
            "value_loss": ("loss/value_avg",),
            "entropy": ("objective/entropy", "entropy"),
        }
        out: dict[str, float] = {"update": self.offset + step}
        for ours, theirs in keys.items():
            out[ours] = next((float(logs[k]) for k in theirs if k in logs), float("nan"))
        for name in COMPONENTS:
            key = f"rewards/{name}/mean"
            out[name] = float(logs[key]) if key in logs else float("nan")
        out["parsed_share"] = float("nan")
        if self.reward_model is not None and len(self.reward_model.history) > self._seen:
            recent = self.reward_model.history[self._seen:]
            self._seen = len(self.reward_model.history)
            for name in COMPONENTS:
                out[name] = float(np.mean([r.components[name] for r in recent]))
            out["parsed_share"] = float(np.mean([r.parsed for r in recent]))
        elif "rewards/parse_penalty/mean" in logs and self.invalid_reward != 0:
            out["parsed_share"] = 1.0 - float(logs["rewards/parse_penalty/mean"]) / self.invalid_reward
        return out

    def append(self, row: dict[str, float]) -> None:
        """Append a row (header first when the file is new)."""
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def _callback(logger: MetricsLogger) -> Any:
    from transformers import TrainerCallback

    class _LogToCsv(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102 (trl's hook)
            if logs and any(k in logs for k in ("objective/scores", "reward", "loss")):
                logger.append(logger.row(state.global_step, logs))

    return _LogToCsv()


def _lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM", bias="none")


def _common_args(params: Params, output_dir: Path, seed: int, steps_or_episodes: dict[str, int]) -> dict[str, Any]:
    from refine_af_utils.models import torch_dtype

    cfg = params.rl
    dtype = torch_dtype(params.model.dtype, params.model.device)
    return {
        "output_dir": str(output_dir), "learning_rate": cfg.learning_rate, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": cfg.batch_size, "gradient_accumulation_steps": 1,
        "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": seed,
        "use_cpu": params.model.device == "cpu", "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16, "disable_tqdm": False, **steps_or_episodes,
    }


@dataclass
class RLTrainingResult:
    """What stage 3 made: the metrics table, the adapter folder and the figures."""

    metrics: pd.DataFrame
    adapter_dir: Path
    figures: dict[str, Path]


def training_prompts(params: Params, run_dir: Path) -> list[dict[str, Any]]:
    """Stage 1 instructions with their instance prompts (stage 2's), ``rl.num_prompts`` of them."""
    from refine_af_utils.instances import instance_prompts
    from refine_af_utils.instructions import instructions_of_run
    from refine_af_utils.seeds import seed_tasks_of_run

    records = instructions_of_run(run_dir)[: params.rl.num_prompts]
    prompts = instance_prompts(records, seed_tasks_of_run(run_dir), params.instance_generation, params.random_seed)
    return [{"prompt": p, "instruction": r["instruction"], "is_classification": r["is_classification"]}
            for p, r in zip(prompts, records)]


def _last_checkpoint(checkpoints: Path) -> tuple[int, Optional[Path]]:
    done = sorted((int(p.name.split("-")[1]), p) for p in checkpoints.glob("update-*") if (p / "complete").is_file())
    return done[-1] if done else (0, None)


def train_generator(params: Params, run_dir: str | Path, scorers: Optional[dict[str, Scorer]] = None) -> RLTrainingResult:
    """Stage 3: train the LoRA instance generator with ``rl.algorithm``, resuming from checkpoints."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from refine_af_utils.models import load_causal_lm, resolve_model_path, torch_dtype
    from refine_af_utils.reward import build_scorers
    from refine_af_utils.results import check_stage_config, stage_dir

    cfg = params.rl
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, RL_DIR)
    checkpoints = out / "checkpoints"
    settings = params.to_dict()
    check_stage_config(out, {
        "model": settings["model"], "reward": settings["reward"], "random_seed": params.random_seed,
        "instance_generation": settings["instance_generation"],
        # more updates may be asked for later: the run then resumes
        "rl": {k: v for k, v in settings["rl"].items() if k not in ("updates", "checkpoint_every")},
    })
    scorers = scorers or build_scorers(params.reward, run_dir / "reward_analysis" / "cache")
    completion_scorer = CompletionScorer(scorers, params.reward, cfg.invalid_reward,
                                         params.instance_generation.max_instances_per_task)
    rows = training_prompts(params, run_dir)
    done, last = _last_checkpoint(checkpoints)
    _truncate_metrics(out / METRICS_FILE, done)
    base_path = resolve_model_path(params.model.name_or_path)
    dtype = torch_dtype(params.model.dtype, params.model.device)
    while done < cfg.updates:
        segment = min(cfg.checkpoint_every, cfg.updates - done)
        base, tokenizer = load_causal_lm(params.model)  # left padding, pad token distinct from eos
        policy = PeftModel.from_pretrained(base, last / "adapter", is_trainable=True) if last else base
        peft_config = None if last else _lora_config(cfg)
        dataset = Dataset.from_list(rows)
        segment_dir = checkpoints / f"update-{done + segment}"
        shutil.rmtree(segment_dir, ignore_errors=True)
        if cfg.algorithm == "ppo":
            from trl.experimental.ppo import PPOConfig, PPOTrainer

            value_source = last / "value_model" if last else base_path
            value_model = AutoModelForSequenceClassification.from_pretrained(
                value_source, num_labels=1, dtype=dtype, trust_remote_code=params.model.trust_remote_code)
            value_model.config.pad_token_id = tokenizer.pad_token_id
            encoded = [{"input_ids": tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]} for r in rows]
            reward_model = RefineAFRewardModel(tokenizer, completion_scorer,
                                               [(e["input_ids"], r) for e, r in zip(encoded, rows)])
            logger = MetricsLogger(out / METRICS_FILE, reward_model, done, cfg.invalid_reward)
            args = PPOConfig(**_common_args(params, segment_dir, params.random_seed + done, {"total_episodes": segment * cfg.batch_size}),
                             num_ppo_epochs=cfg.ppo_epochs, num_mini_batches=1, kl_coef=cfg.kl_coef,
                             response_length=cfg.response_length, temperature=cfg.temperature, stop_token="eos",
                             local_rollout_forward_batch_size=cfg.batch_size, num_sample_generations=0,
                             per_device_eval_batch_size=cfg.batch_size)
            trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                                 reward_model=reward_model, train_dataset=Dataset.from_list(encoded),
                                 eval_dataset=Dataset.from_list(encoded[: cfg.batch_size]),
                                 value_model=value_model, peft_config=peft_config, callbacks=[_callback(logger)])
            trainer.train()
            trained_policy, trained_value = trainer.model.policy, trainer.model.value_model
        else:
            functions, weights = grpo_reward_functions(completion_scorer)
            logger = MetricsLogger(out / METRICS_FILE, None, done, cfg.invalid_reward)
            common = _common_args(params, segment_dir, params.random_seed + done, {"max_steps": segment})
            common["per_device_train_batch_size"] = cfg.batch_size * cfg.num_generations
            shared = {"num_generations": cfg.num_generations, "max_completion_length": cfg.response_length,
                      "temperature": cfg.temperature, "beta": cfg.kl_coef, "reward_weights": weights}
            if cfg.algorithm == "grpo":
                from trl import GRPOConfig as Config, GRPOTrainer as Trainer
            else:
                from trl import RLOOConfig as Config, RLOOTrainer as Trainer
            trainer = Trainer(model=policy, reward_funcs=functions, args=Config(**common, **shared),
                              train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                              callbacks=[_callback(logger)])
            trainer.train()
            trained_policy, trained_value = trainer.model, None
        segment_dir.mkdir(parents=True, exist_ok=True)
        trained_policy.save_pretrained(segment_dir / "adapter")
        if trained_value is not None:
            trained_value.save_pretrained(segment_dir / "value_model")
        (segment_dir / "complete").write_text(json.dumps({"updates": done + segment}) + "\n")
        if last is not None:
            shutil.rmtree(last, ignore_errors=True)  # keep only the newest checkpoint
        done, last = done + segment, segment_dir
    adapter_dir = out / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    shutil.copytree(last / "adapter", adapter_dir)
    metrics = pd.read_csv(out / METRICS_FILE)
    figures = {"reward_kl": reward_kl_figure(metrics, cfg.algorithm, out / "reward_kl.png"),
               "components": components_figure(metrics, out / "components.png")}
    return RLTrainingResult(metrics, adapter_dir, figures)


def reward_kl_figure(metrics: pd.DataFrame, algorithm: str, path: Path) -> Path:
    """Reward and KL per update (stage 3 and the report draw the same figure)."""
    from refine_af_utils.plots import line_chart, save_figure

    return save_figure(line_chart(metrics, "update", ["reward", "kl"],
                                  f"{algorithm.upper()}: reward and KL to the base model per update"), path)


def components_figure(metrics: pd.DataFrame, path: Path) -> Path:
    """Each reward component's mean over the sampled instances, per update."""
    from refine_af_utils.plots import line_chart, save_figure

    return save_figure(line_chart(metrics, "update", list(COMPONENTS),
                                  "Mean reward components of the sampled instances per update"), path)


def run_rl_stage(params: Params, run_dir: str | Path) -> RLTrainingResult:
    """Stage 3 for the notebook: train (or resume) and record the headline metrics."""
    from refine_af_utils.results import record_metrics

    result = train_generator(params, run_dir)
    first, last = result.metrics.iloc[0], result.metrics.iloc[-1]
    record_metrics(run_dir, "03", {
        "algorithm": params.rl.algorithm, "updates": int(len(result.metrics)),
        "first_reward": float(first["reward"]), "last_reward": float(last["reward"]),
        "last_kl": float(last["kl"]),
    })
    return result


def _truncate_metrics(path: Path, updates_done: int) -> None:
    """Drop metrics rows of updates after the last checkpoint (they will be trained again)."""
    if not path.is_file():
        return
    table = pd.read_csv(path)
    kept = table[table["update"] <= updates_done]
    if len(kept) != len(table):
        if kept.empty:
            path.unlink()
        else:
            kept.to_csv(path, index=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m refine_af_utils.rl PARAMS`` (or under ``accelerate launch``): stage 3 alone."""
    from refine_af_utils.results import stage_command_line

    params, run_dir = stage_command_line(main.__doc__, argv)
    result = train_generator(params, run_dir)
    print(result.metrics.to_string())


if __name__ == "__main__":
    main()
