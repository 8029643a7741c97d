"""The one params schema of the pipeline, validated when a YAML file is loaded.

Every stage reads its settings from a :class:`Params` object. A YAML key that the
schema does not know, a missing required key or a value of the wrong type stops the
load with a :class:`ParamsError` that names the file and the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import yaml

from refine_af_utils.errors import RefineAFError, decode_utf8
from refine_af_utils.prompts import OASST_TEMPLATE, UNIEVAL_QUESTIONS, YES_NO_QUESTIONS  # scorers' templates


class ParamsError(RefineAFError, ValueError):
    """A params file that does not match the schema."""


@dataclass
class ModelParams:
    """The backbone LLM: a hub id, a local folder, or ``embedded:smollm2-135m-instruct``."""

    name_or_path: str = "embedded:smollm2-135m-instruct"
    # float32 by default (results reproduce on more machines, docs/deviations.md); auto: bfloat16 on a GPU
    # or a CPU with native bf16 (AVX512-BF16/AMX), else float32.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    revision: Optional[str] = None


@dataclass
class InstructionGenerationParams:
    """Stage 1, Self-Instruct's instruction bootstrapping."""

    prompt_variant: Literal["all", "classification"] = "all"
    num_prompt_instructions: int = 8
    num_machine_in_prompt: int = 2
    batch_size: int = 32
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.5
    # Self-Instruct used OpenAI's additive presence penalty of 2; see docs/deviations.md.
    presence_penalty: float = 2.0
    novelty_threshold: float = 0.7
    drop_truncated_responses: bool = True
    max_batches: Optional[int] = 40  # safety stop; null: none


@dataclass
class ClassificationParams:
    """Stage 1b, the few-shot yes/no prompt that marks classification instructions."""

    num_examples: int = 12
    batch_size: int = 32
    max_new_tokens: int = 3


UNIEVAL = "MingZhong/unieval-dialog"
OASST_RM = "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"


@dataclass
class ScorerParams:
    """One component of the reward: which scorer kind, on which model, with which template.

    Templates may use {instruction}, {input}, {output} (alias {response}), {prompt} and
    {context} (both: the instruction, then the input when there is one).
    """

    kind: Literal["sequence_classification", "yes_no", "embedding_similarity", "lm_fluency"]
    model: str
    template: str
    weight: float
    pair_template: Optional[str] = None  # second text (embedding_similarity, lm_fluency): default {output}
    max_length: int = 1024
    batch_size: int = 8
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False


# Eq. 1 of the paper. Only the understandability weight is certain (-0.4421, from the abstract
# and public descriptions); the others are our best recollection; the intercept is unknown.
PAPER_WEIGHTS = {"reward_model": 0.0078, "understandability": -0.4421, "naturalness": 0.3212, "coherence": 0.1520}

# The offline stand-ins' models (params/default.yaml): the embedded backbone and sentence encoder.
EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
EMBEDDED_ENCODER = "embedded:all-minilm-l6-v2"


def _offline_yes_no(name: str) -> ScorerParams:
    return ScorerParams(kind="yes_no", model=EMBEDDED_LLM, template=YES_NO_QUESTIONS[name],
                        weight=PAPER_WEIGHTS[name], max_length=512, batch_size=16)


def _offline_coherence() -> ScorerParams:
    return ScorerParams(kind="embedding_similarity", model=EMBEDDED_ENCODER, template="{context}",
                        pair_template="{output}", weight=PAPER_WEIGHTS["coherence"], max_length=256, batch_size=32)


@dataclass
class RewardParams:
    """The REFINE-AF reward: intercept + sum of weight * score over the four components.

    The defaults are ``params/default.yaml``'s offline stand-ins (the paper's questions and
    weights on the embedded models), so the schema has no defaults of its own;
    :func:`paper_reward_params` gives the paper's scorers.
    """

    reward_model: ScorerParams = field(default_factory=lambda: _offline_yes_no("reward_model"))
    understandability: ScorerParams = field(default_factory=lambda: _offline_yes_no("understandability"))
    naturalness: ScorerParams = field(default_factory=lambda: _offline_yes_no("naturalness"))
    coherence: ScorerParams = field(default_factory=_offline_coherence)
    intercept: float = 0.0


def _paper_scorer(name: str) -> ScorerParams:
    return ScorerParams(kind="yes_no", model=UNIEVAL, template=UNIEVAL_QUESTIONS[name],
                        weight=PAPER_WEIGHTS[name])


def paper_reward_params() -> RewardParams:
    """The paper's scorers with Eq. 1's weights and intercept 0, on the CPU in float32.

    OpenAssistant's Pythia reward model (a logit) and UniEval's dialogue questions: the schema's
    reward defaults before they followed ``params/default.yaml``.
    ``params/recipes/llama2-7b/paper.yaml`` spells the same scorers out, on a GPU.
    """
    return RewardParams(
        reward_model=ScorerParams(kind="sequence_classification", model=OASST_RM, template=OASST_TEMPLATE,
                                  weight=PAPER_WEIGHTS["reward_model"]),
        understandability=_paper_scorer("understandability"),
        naturalness=_paper_scorer("naturalness"),
        coherence=_paper_scorer("coherence"),
        intercept=0.0,
    )


@dataclass
class InstanceGenerationParams:
    """Self-Instruct's instance generation prompts and decoding (stage 2 samples, stage 3 trains, stage 4 writes)."""

    batch_size: int = 16
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0               # PPO in trl samples with top_p 1; RL rollouts and stage 4 decode alike
    num_demonstrations: int = 1
    max_instances_per_task: int = 5


@dataclass
class RewardAnalysisParams:
    """Stage 2's analysis: how many instructions to sample and candidates per instruction."""

    num_instructions: int = 16
    candidates_per_instruction: int = 2
    num_examples_shown: int = 5


@dataclass
class LoraParams:
    """A LoRA adapter: peft's ``LoraConfig`` fields under their peft names (one builder: ``models.lora_config``).

    These are stage 5's defaults (``sft.lora``); :class:`RLLoraParams` has stage 3's. A section given
    in part takes the rest from its own class, so ``rl: {lora: {r: 8}}`` keeps stage 3's modules.
    """

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # "all-linear" (peft's shorthand) or a list of module names
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class RLLoraParams(LoraParams):
    """Stage 3's LoRA defaults (``rl.lora``): the attention projections, no dropout."""

    lora_dropout: float = 0.0
    target_modules: Union[str, list[str]] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


# trl config fields that the package sets from its own keys (or needs as they are) and that
# ``trainer_args`` may therefore not set: field -> where its value comes from. Stages 3 and 5 set
# the seed, device and precision fields alike.
_SEED_DEVICE_DTYPE_OWNED: dict[str, str] = {
    "seed": "random_seed", "data_seed": "random_seed", "use_cpu": "model.device", "bf16": "model.dtype",
    "fp16": "model.dtype",
}
SFT_CONFIG_OWNED: dict[str, str] = {
    **_SEED_DEVICE_DTYPE_OWNED,
    "output_dir": "the run layout (sft/<arm>)", "num_train_epochs": "sft.epochs", "learning_rate": "sft.learning_rate",
    "per_device_train_batch_size": "sft.batch_size", "gradient_accumulation_steps": "sft.gradient_accumulation_steps",
    "max_length": "sft.max_length", "gradient_checkpointing": "sft.gradient_checkpointing",
    "save_steps": "sft.save_steps", "save_strategy": "sft.save_steps (checkpoints every save_steps)",
    "save_total_limit": "resume (the last whole checkpoint is kept)",
    "completion_only_loss": "the method (loss on the output only)", "logging_steps": "loss.csv (one row per step)",
    "logging_strategy": "loss.csv (one row per step)", "max_steps": "sft.epochs",
    "save_only_model": "resume (a checkpoint keeps its optimiser and data position)",
    "ignore_data_skip": "resume (a resumed run equals an uninterrupted one)",
    "resume_from_checkpoint": "resume (the runner resumes from the last whole checkpoint)",
    "eval_strategy": "stage 6 (SFT has no evaluation set)", "load_best_model_at_end": "stage 6 (SFT has no evaluation set)",
}
RL_CONFIG_OWNED: dict[str, str] = {
    **_SEED_DEVICE_DTYPE_OWNED,
    "output_dir": "the run layout (rl/checkpoints)", "learning_rate": "rl.learning_rate",
    "lr_scheduler_type": "resume (constant: each segment starts a fresh optimiser)",
    "per_device_train_batch_size": "rl.batch_size", "gradient_accumulation_steps": "rl.batch_size",
    "logging_steps": "metrics.csv (one row per update)", "save_strategy": "rl.checkpoint_every",
    "total_episodes": "rl.updates", "max_steps": "rl.updates", "num_ppo_epochs": "rl.ppo_epochs",
    "num_mini_batches": "rl.batch_size", "kl_coef": "rl.kl_coef", "beta": "rl.kl_coef",
    "response_length": "instance_generation.max_new_tokens", "max_completion_length": "instance_generation.max_new_tokens",
    "temperature": "instance_generation.temperature", "top_p": "instance_generation.top_p",
    "stop_token": "the method (rollouts stop at the end token)", "missing_eos_penalty": "rl.missing_eos_penalty",
    "num_generations": "rl.num_generations", "whiten_rewards": "rl.batch_size (on from 8 prompts per update)",
    "local_rollout_forward_batch_size": "rl.batch_size", "per_device_eval_batch_size": "rl.batch_size",
    "num_sample_generations": "the held-out evaluation (stage 3's own)", "stop_token_id": "the method (rollouts stop at the end token)",
    "logging_strategy": "metrics.csv (one row per update)",
    "warmup_steps": "resume (constant learning rate: each segment starts a fresh optimiser)",
    "lr_scheduler_kwargs": "resume (constant learning rate: each segment starts a fresh optimiser)",
    "steps_per_generation": "rl.batch_size (one generation per update)", "generation_batch_size": "rl.batch_size",
    "num_iterations": "rl.ppo_epochs (one pass per generation with GRPO/RLOO)",
    **{key: "instance_generation (RL rollouts and stage 4 decode alike)"
       for key in ("top_k", "min_p", "repetition_penalty", "generation_kwargs", "use_vllm")},
}
# PPO runs on stage 3's own AdamW (the policy's and the critic's learning rates) and trl's PPO does not
# clip gradients, so these fields would do nothing there.
PPO_CONFIG_OWNED: dict[str, str] = {
    key: "stage 3's own AdamW for PPO (rl.learning_rate, rl.value_learning_rate)"
    for key in ("optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")
}


@dataclass
class RLParams:
    """Stage 3: RL from automated feedback on the instance generator (LoRA on the backbone)."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    # Rollouts decode with instance_generation's temperature, top_p, max_new_tokens and stop strings.
    num_prompts: int = 64            # at most this many training prompts (after the held-out split)
    heldout_instructions: int = 24   # stage 1 instructions held out of training (seeded split)
    heldout_samples: int = 2         # completions per held-out instruction, base and trained generator
    updates: int = 4                 # PPO updates (GRPO/RLOO optimiser steps)
    batch_size: int = 4              # prompts per update
    num_generations: int = 4         # GRPO/RLOO: completions per prompt
    ppo_epochs: int = 2
    learning_rate: float = 3.0e-4
    value_learning_rate: float = 1.0e-5  # PPO: the critic's own learning rate (full copy, zero-initialised head)
    kl_coef: float = 0.05
    missing_eos_penalty: Optional[float] = None  # trl: subtracted when a completion has no end token
    lora: RLLoraParams = field(default_factory=RLLoraParams)
    # A completion that yields no instance gets the reward (mean - parse_penalty_sd * sd) of stage 2's
    # parsed candidates' content reward: the penalty is measured in the content signal's own spread.
    parse_penalty_sd: float = 2.0
    checkpoint_every: int = 4        # updates between checkpoints (a rerun resumes from the last)
    # Any other field of trl's config class for the algorithm (PPOConfig, GRPOConfig, RLOOConfig), passed
    # through as given, e.g. PPO's {cliprange: 0.1, vf_coef: 0.5}; RL_CONFIG_OWNED's fields are refused.
    trainer_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SFTParams:
    """Stage 5: supervised fine-tuning of the base backbone on each arm's dataset (same settings for both)."""

    full_fine_tuning: bool = False   # false: LoRA
    epochs: float = 2.0
    learning_rate: float = 2.0e-4
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 256            # prompt + output tokens; longer examples are truncated
    lora: LoraParams = field(default_factory=LoraParams)
    save_steps: int = 20             # optimiser steps between checkpoints (a rerun resumes from the last)
    gradient_checkpointing: bool = False  # saves GPU memory on 7B+ models at about 30% more time
    equal_examples: bool = True      # subsample the larger arm (seeded) to the smaller arm's size
    include_seed_tasks: bool = False  # add the seed tasks' instances to both arms (Self-Instruct did)
    # Any other field of trl's SFTConfig, passed through as given, e.g. {warmup_steps: 100, weight_decay: 0.01,
    # report_to: [wandb]}; SFT_CONFIG_OWNED's fields are refused.
    trainer_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationParams:
    """Stage 6: zero-shot Super-NaturalInstructions evaluation (Tk-Instruct / Self-Instruct protocol)."""

    # "bundled" (our 12-task offline set, not Super-NI numbers) or a natural-instructions checkout
    superni_dir: str = "bundled"
    max_instances: int = 100         # the first instances of each test task
    max_new_tokens: int = 32         # greedy decoding, stops at the end token
    batch_size: int = 16
    max_prompt_tokens: int = 1024    # longer prompts keep their end (the input and "Output:")


@dataclass
class Params:
    """All settings of one pipeline run."""

    run_name: str
    seed_tasks: str = "bundled"
    num_instructions: int = 80
    random_seed: int = 42
    model: ModelParams = field(default_factory=ModelParams)
    instruction_generation: InstructionGenerationParams = field(
        default_factory=InstructionGenerationParams
    )
    classification: ClassificationParams = field(default_factory=ClassificationParams)
    instance_generation: InstanceGenerationParams = field(default_factory=InstanceGenerationParams)
    reward: RewardParams = field(default_factory=RewardParams)
    reward_analysis: RewardAnalysisParams = field(default_factory=RewardAnalysisParams)
    rl: RLParams = field(default_factory=RLParams)
    sft: SFTParams = field(default_factory=SFTParams)
    evaluation: EvaluationParams = field(default_factory=EvaluationParams)

    def to_dict(self) -> dict[str, Any]:
        """The params as plain nested dicts (what YAML holds)."""
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named top-level sections (all of them when none are named)."""
        data = self.to_dict()
        if sections:
            data = {key: data[key] for key in sections}
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is list:
        return "a list of " + _type_name(typing.get_args(annotation)[0])
    if origin is dict:
        return "a mapping of names to values"
    return getattr(annotation, "__name__", str(annotation))


def _accepts_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts_float(a) for a in typing.get_args(annotation))
    return False


def _convert(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check ``value`` against ``annotation``; return it (ints widen to floats; NaN and inf are refused)."""
    origin = typing.get_origin(annotation)
    if isinstance(value, float) and not math.isfinite(value) and _accepts_float(annotation):
        raise ParamsError(f"{source}: key '{key}' must be a finite number, got {value}")
    wrong = ParamsError(
        f"{source}: key '{key}' must be {_type_name(annotation)}, got {value!r} "
        f"({type(value).__name__})"
    )
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key, source)
            except ParamsError:
                continue
        raise wrong
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise wrong
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise wrong
        try:  # plain YAML values only: they go into the fingerprint and config.json
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ParamsError(f"{source}: key '{key}' must hold plain values (numbers, strings, lists, "
                              f"mappings), got {value!r} ({error})") from error
        return dict(value)
    if annotation is type(None):
        if value is None:
            return None
        raise wrong
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise wrong
        return _build(annotation, value, key + ".", source)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong
    if annotation is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"unsupported annotation {annotation!r} for key {key}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ParamsError(
                f"{source}: unknown key '{prefix}{key}' (known keys here: {', '.join(sorted(known))})"
            )
    kwargs = {}
    for name, spec in known.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, source)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{source}: required key '{prefix}{name}' is missing")
    params = cls(**kwargs)
    _check_values(params, prefix, source)
    return params


# Ranges of keys, wherever they occur (both temperatures, both top_p, both lora_dropout).
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: v >= 0, "at least 0 (0 decodes greedily)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "novelty_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "kl_coef": (lambda v: v >= 0, "at least 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),  # LoraParams
}

RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def check_run_name(name: str, source: str = "<params>") -> None:
    """Refuse a run name that is not a plain folder name: letters, digits, ``-``, ``_``, ``.``; not ``.`` or ``..``."""
    if not RUN_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ParamsError(
            f"{source}: key 'run_name' must be a folder name of letters, digits, '-', '_' and '.' "
            f"(not '.' or '..'), got {name!r}"
        )


def _check_values(params: Any, prefix: str, source: str) -> None:
    """Range checks that types alone cannot express."""
    positive = {
        "num_instructions", "num_prompt_instructions", "batch_size", "max_new_tokens",
        "num_examples", "max_batches", "max_length", "num_demonstrations", "max_instances_per_task",
        "candidates_per_instruction", "num_examples_shown", "num_prompts", "updates", "num_generations",
        "ppo_epochs", "heldout_instructions", "heldout_samples", "value_learning_rate", "parse_penalty_sd", "r", "lora_alpha", "checkpoint_every",
        "epochs", "learning_rate", "gradient_accumulation_steps", "save_steps", "max_instances",
        "max_prompt_tokens",
    }
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.name in positive and value is not None and value <= 0:
            raise ParamsError(f"{source}: key '{prefix}{f.name}' must be positive, got {value}")
        if f.name in _RANGES and value is not None and not _RANGES[f.name][0](value):
            raise ParamsError(f"{source}: key '{prefix}{f.name}' must be {_RANGES[f.name][1]}, got {value}")
    if isinstance(params, InstructionGenerationParams):
        if not 0 <= params.num_machine_in_prompt < params.num_prompt_instructions:
            raise ParamsError(
                f"{source}: key '{prefix}num_machine_in_prompt' must be at least 0 and below "
                f"num_prompt_instructions ({params.num_prompt_instructions})"
            )
    if isinstance(params, ScorerParams):
        for template_key in ("template", "pair_template"):
            template = getattr(params, template_key)
            if template is None:
                continue
            try:
                template.format(instruction="", input="", output="", response="", prompt="", context="")
            except (KeyError, IndexError, ValueError) as error:
                raise ParamsError(
                    f"{source}: key '{prefix}{template_key}' has an unknown placeholder or a stray brace ({error}); "
                    "use {instruction}, {input}, {output}, {response}, {prompt} or {context}"
                ) from error
    if isinstance(params, Params):
        check_run_name(params.run_name, source)
        _check_trainer_args(params, source)
    if isinstance(params, Params) and params.rl.algorithm == "ppo" and params.instance_generation.top_p != 1.0:
        # trl 1.9.2's PPO samples with top_p=1 and computes its log-probabilities on the full
        # distribution; RL rollouts and stage 4 must decode alike, so stage 4 cannot use another top_p.
        raise ParamsError(
            f"{source}: key 'instance_generation.top_p' must be 1.0 with rl.algorithm 'ppo' "
            f"(got {params.instance_generation.top_p}): trl's PPO samples from the full distribution, "
            "and RL and stage 4 decode alike; use grpo or rloo for nucleus sampling"
        )


def trl_config_class(section: str, algorithm: str = "ppo") -> type:
    """trl's config class that ``<section>.trainer_args`` pass through to: SFTConfig, or the RL algorithm's."""
    if section == "sft":
        from trl import SFTConfig
        return SFTConfig
    if algorithm == "ppo":
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # as stage 3 does: PPO lives in trl.experimental
        from trl.experimental.ppo import PPOConfig
        return PPOConfig
    from trl import GRPOConfig, RLOOConfig
    return GRPOConfig if algorithm == "grpo" else RLOOConfig


def _check_trainer_args(params: Params, source: str) -> None:
    """Refuse a ``trainer_args`` key that trl's config class does not have, or that the package sets itself."""
    import tempfile

    ppo = params.rl.algorithm == "ppo"
    for section, owned in (("rl", {**RL_CONFIG_OWNED, **(PPO_CONFIG_OWNED if ppo else {})}), ("sft", SFT_CONFIG_OWNED)):
        extra = getattr(params, section).trainer_args
        if not extra:
            continue  # trl is imported only when there is something to check
        config = trl_config_class(section, params.rl.algorithm)
        fields = {f.name for f in dataclasses.fields(config)}
        for key in extra:
            if key in owned:
                raise ParamsError(f"{source}: key '{section}.trainer_args.{key}' is set by the package from "
                                  f"{owned[key]}; set that instead")
            if key not in fields:
                raise ParamsError(f"{source}: key '{section}.trainer_args.{key}' is not a field of trl's "
                                  f"{config.__name__}")
        with tempfile.TemporaryDirectory() as scratch:  # trl checks the values now, not hours into the run
            try:
                config(**{"report_to": [], **extra, "output_dir": scratch, "use_cpu": True})
            except (TypeError, ValueError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ParamsError(f"{source}: key '{section}.trainer_args' is refused by trl's {config.__name__}: "
                                  f"{first}") from error


def params_from_dict(data: dict[str, Any], source: str = "<params>") -> Params:
    """Validate a nested dict against the schema and build :class:`Params`."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    return _build(Params, data, "", source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key given twice in one mapping is an error (not: the last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges keys that later keys may override
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark)
            except TypeError:  # an unhashable key: yaml's own constructor reports it
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(path: Path, error: yaml.YAMLError) -> str:
    """A YAML error as one line: ``file:line: not valid YAML (problem)``."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error)
    if problem.startswith("duplicate key"):
        return f"{where}: {problem}"
    if getattr(error, "context", None):
        context_mark = getattr(error, "context_mark", None)
        opened = f" (line {context_mark.line + 1})" if context_mark is not None and context_mark != mark else ""
        problem = f"{error.context}{opened}: {problem}"
    return f"{where}: not valid YAML ({' '.join(problem.split())})"


def _read_params_yaml(path: Path) -> dict[str, Any]:
    """One params file's own mapping (its ``extends`` not yet followed)."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    text = decode_utf8(path.read_bytes(), str(path), ParamsError)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ParamsError(_yaml_error_line(path, error)) from error
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``delta`` over ``base``: mappings are merged key by key, any other value (lists too) replaces."""
    merged = copy.deepcopy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_extends(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file's mapping with its ``extends:`` chain applied (not yet validated).

    ``extends: other.yaml`` names a params file relative to this one; this file's keys are merged
    over it (:func:`deep_merge`). A chain that comes back to a file it already passed is refused.
    """
    path = Path(path)
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(here):], here))
        raise ParamsError(f"{path}: 'extends' makes a cycle ({cycle})")
    data = _read_params_yaml(path)
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise ParamsError(f"{path}: key 'extends' must be the path of a params file (relative to this one), "
                          f"got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ParamsError(f"{path}: key 'extends': {parent_path}: params file not found")
    return deep_merge(resolve_extends(parent_path, (*_chain, here)), data)


def parse_overrides(items: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """``["key.sub=value", ...]`` (the command line's ``--set``) as dotted keys; values parsed by YAML.

    ``--set evaluation.max_new_tokens=64`` gives the int 64, ``--set model.device=cuda`` the string,
    ``--set rl.lora.target_modules=[q_proj,v_proj]`` a list; the schema types and checks them later.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ParamsError(f"{source} {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                              "evaluation.max_new_tokens=64")
        try:
            overrides[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            problem = " ".join(str(getattr(error, "problem", None) or error).split())
            raise ParamsError(f"{source} {item!r}: the value is not valid YAML ({problem})") from error
    return overrides


def _check_override_key(dotted: str, source: str) -> None:
    """Refuse an override whose dotted key the schema does not have, naming the whole key."""
    cls: Any = Params
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(cls):
            raise ParamsError(f"{source}: key '{'.'.join(parts[:i])}' is a value, not a section: "
                              f"cannot set '{dotted}'")
        known = {f.name for f in dataclasses.fields(cls)}
        if part not in known:
            raise ParamsError(f"{source}: unknown key '{here}' (known keys here: {', '.join(sorted(known))})")
        cls = typing.get_type_hints(cls)[part]
        if typing.get_origin(cls) is dict:
            return  # a free mapping (trainer_args): its keys are checked with the whole params


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with each dotted key of ``overrides`` set (sections created as needed); checked by name."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        _check_override_key(dotted, source)
        node = data
        *parents, last = dotted.split(".")
        for i, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise ParamsError(f"{source}: key '{'.'.join(parents[: i + 1])}' must be a section to set "
                                  f"'{dotted}', got {node[part]!r}")
            node = node[part]
        node[last] = value
    return data


def resolve_params_data(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The mapping :func:`load_params` validates: the file, its ``extends`` chain, then ``overrides``."""
    data = resolve_extends(path)
    return apply_overrides(data, overrides or {}, str(path))


def load_params(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Params:
    """Load and validate a params YAML file; ``overrides`` are dotted keys applied on top.

    The file may name a parent with ``extends:`` (a path relative to it); its keys are deep-merged
    over the parent's (:func:`resolve_extends`). ``overrides`` (e.g. from ``--set``, see
    :func:`parse_overrides`) go on last and are typed and checked by the schema like the file's keys.

    Raises :class:`ParamsError` with one line naming the file and the line (bad YAML, a duplicate
    key, a byte that is not UTF-8) or the dotted key (unknown, missing, wrong type or out of range).
    """
    path = Path(path)
    return params_from_dict(resolve_params_data(path, overrides), str(path))


def params_yaml(params: Params, header: str = "") -> str:
    """``params`` as a complete YAML file (no ``extends``) that :func:`load_params` reads back equal."""
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    body = yaml.safe_dump(params.to_dict(), sort_keys=False, allow_unicode=True, width=1_000_000,
                          default_flow_style=False)
    return lines + body
