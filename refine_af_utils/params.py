"""The one params schema of the pipeline, validated when a YAML file is loaded.

Every stage reads its settings from a :class:`Params` object. A YAML key that the
schema does not know, a missing required key or a value of the wrong type stops the
load with a :class:`ParamsError` that names the file and the dotted key.

A numeric field declares its own range (:func:`~refine_af_utils.params_validation.positive` and
siblings); checks across fields are the sections' ``validate`` methods. The generic validator is
:mod:`refine_af_utils.params_validation`, YAML reading (``extends``, ``--set``) is
:mod:`refine_af_utils.params_loading` and the ``trainer_args`` check against trl is
:mod:`refine_af_utils.trl_bridge`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from refine_af_utils.errors import ParamsError
from refine_af_utils.params_loading import deep_merge as deep_merge  # re-exported: the public params API
from refine_af_utils.params_loading import parse_overrides as parse_overrides  # re-exported, as deep_merge
from refine_af_utils.params_loading import resolve_extends
from refine_af_utils.params_validation import at_least_zero, build, check_key, fraction, positive
from refine_af_utils.prompts import OASST_TEMPLATE, UNIEVAL_QUESTIONS, YES_NO_QUESTIONS  # scorers' templates
from refine_af_utils.trl_bridge import check_trainer_args


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
    # How stages 1, 2, 4, 6 and stage 3's held-out set decode (refine_af_utils/engines.py, docs/benchmarks.md):
    # static (transformers' padded batches, the reference), continuous (transformers' continuous batching;
    # greedy only) or vllm (optional install).
    engine: Literal["static", "continuous", "vllm"] = "static"


@dataclass
class InstructionGenerationParams:
    """Stage 1, Self-Instruct's instruction bootstrapping."""

    prompt_variant: Literal["all", "classification"] = "all"
    num_prompt_instructions: int = positive(8)
    num_machine_in_prompt: int = 2
    batch_size: int = positive(32)
    max_new_tokens: int = positive(160)
    temperature: float = at_least_zero(0.7, "0 decodes greedily")
    top_p: float = fraction(0.5, low_open=True)
    # Self-Instruct used OpenAI's additive presence penalty of 2; see docs/deviations.md.
    presence_penalty: float = 2.0
    novelty_threshold: float = fraction(0.7)
    drop_truncated_responses: bool = True
    max_batches: Optional[int] = positive(40)  # safety stop; null: none

    def validate(self, prefix: str, source: str) -> None:
        """The machine instructions in a prompt are fewer than its instructions."""
        if not 0 <= self.num_machine_in_prompt < self.num_prompt_instructions:
            raise ParamsError(
                f"{source}: key '{prefix}num_machine_in_prompt' must be at least 0 and below "
                f"num_prompt_instructions ({self.num_prompt_instructions})"
            )


@dataclass
class ClassificationParams:
    """Stage 1b, the few-shot yes/no prompt that marks classification instructions."""

    num_examples: int = positive(12)
    batch_size: int = positive(32)
    max_new_tokens: int = positive(3)


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
    max_length: int = positive(1024)
    batch_size: int = positive(8)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False

    def validate(self, prefix: str, source: str) -> None:
        """The templates use only the known placeholders."""
        for template_key in ("template", "pair_template"):
            template = getattr(self, template_key)
            if template is None:
                continue
            try:
                template.format(instruction="", input="", output="", response="", prompt="", context="")
            except (KeyError, IndexError, ValueError) as error:
                raise ParamsError(
                    f"{source}: key '{prefix}{template_key}' has an unknown placeholder or a stray brace ({error}); "
                    "use {instruction}, {input}, {output}, {response}, {prompt} or {context}"
                ) from error


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

    batch_size: int = positive(16)
    max_new_tokens: int = positive(64)
    temperature: float = at_least_zero(0.7, "0 decodes greedily")
    top_p: float = fraction(1.0, low_open=True)  # PPO in trl samples with top_p 1; RL rollouts and stage 4 decode alike
    num_demonstrations: int = positive(1)
    max_instances_per_task: int = positive(5)


@dataclass
class RewardAnalysisParams:
    """Stage 2's analysis: how many instructions to sample and candidates per instruction."""

    num_instructions: int = positive(16)
    candidates_per_instruction: int = positive(2)
    num_examples_shown: int = positive(5)


@dataclass
class LoraParams:
    """A LoRA adapter: peft's ``LoraConfig`` fields under their peft names (one builder: ``models.lora_config``).

    These are stage 5's defaults (``sft.lora``); :class:`RLLoraParams` has stage 3's. A section given
    in part takes the rest from its own class, so ``rl: {lora: {r: 8}}`` keeps stage 3's modules.
    """

    r: int = positive(16)
    lora_alpha: int = positive(32)
    lora_dropout: float = fraction(0.05, high_open=True)
    # "all-linear" (peft's shorthand) or a list of module names
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class RLLoraParams(LoraParams):
    """Stage 3's LoRA defaults (``rl.lora``): every linear layer (peft's ``all-linear``), no dropout."""

    lora_dropout: float = fraction(0.0, high_open=True)
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class RLParams:
    """Stage 3: RL from automated feedback on the instance generator (LoRA on the backbone)."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "grpo"
    # Rollouts decode with instance_generation's temperature, top_p, max_new_tokens and stop strings.
    num_prompts: int = positive(64)            # at most this many training prompts (after the held-out split)
    heldout_instructions: int = positive(24)   # stage 1 instructions held out of training (seeded split)
    heldout_samples: int = positive(2)         # completions per held-out instruction, base and trained generator
    updates: int = positive(12)                # PPO updates (GRPO/RLOO optimiser steps)
    batch_size: int = positive(4)              # prompts per update
    num_generations: int = positive(4)         # GRPO/RLOO: completions per prompt
    ppo_epochs: int = positive(2)
    learning_rate: float = positive(3.0e-4)
    value_learning_rate: float = positive(1.0e-5)  # PPO: the critic's own learning rate (zero-initialised head)
    # PPO's critic (refine_af_utils.ppo_critic): "lora", a LoRA adapter (rl.lora's settings) and a float32 value
    # head on the policy's frozen weights, shared; or "full", a trainable float32 copy of the backbone (trl's
    # setup; 16 bytes per backbone parameter: 98 GiB for LLaMA-2-7B). docs/paper-recipes.md has the measurements.
    critic: Literal["lora", "full"] = "lora"
    # Gradients computed micro_batch_size prompts at a time (per process), accumulated into one optimiser step per
    # update (batch_size must be a multiple); unset: the whole batch at once. Less activation memory. PPO also
    # samples per micro-batch (less KV memory; trl still keeps the batch's rollout scores), so its numbers are not
    # the whole batch's; GRPO/RLOO sample the whole batch at once: the same rollouts and, up to float summation
    # order, the same update (tests/test_rl_training.py).
    micro_batch_size: Optional[int] = 1
    kl_coef: float = at_least_zero(0.04)
    missing_eos_penalty: Optional[float] = None  # trl: subtracted when a completion has no end token
    lora: RLLoraParams = field(default_factory=RLLoraParams)
    # A completion that yields no instance gets the reward (mean - parse_penalty_sd * sd) of stage 2's
    # parsed candidates' content reward: the penalty is measured in the content signal's own spread.
    parse_penalty_sd: float = positive(2.0)
    # The optimiser sees (Eq. 1 - stage 2's mean) / stage 2's SD of the parsed candidates' content reward (a
    # positive affine map: the same optimum; kl_coef is then per SD); logs and reports stay in Eq. 1 units.
    standardise_reward: bool = False
    stop_at_stop_strings: bool = True          # a rollout ends at its first stop string (PPO: the rest is padding; GRPO/RLOO: cut)
    # GRPO only: trl's scale_rewards, what each advantage (reward - its group's mean) is divided by: "batch", the
    # SD over the update's completions; "group", its prompt's group's SD (which magnifies small within-group noise);
    # "none". RLOO takes trl's normalize_advantages through trainer_args.
    scale_rewards: Literal["batch", "group", "none"] = "batch"
    # Recompute activations in the backward pass (trl's default, on): less activation memory, at a time cost that
    # depends on the machine (bench/stage3_memory.py). Off with micro-batches of one prompt is the CPU default; the
    # paper recipes turn it on.
    activation_checkpointing: bool = False
    placebo: bool = False                      # the control: each batch's rewards shuffled (seeded) before training
    checkpoint_every: int = positive(4)        # updates between checkpoints (a rerun resumes from the last)
    # Any other field of trl's config class for the algorithm (PPOConfig, GRPOConfig, RLOOConfig), passed
    # through as given, e.g. PPO's {cliprange: 0.1, vf_coef: 0.5}; trl_bridge.RL_CONFIG_OWNED's fields are refused.
    trainer_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SFTParams:
    """Stage 5: supervised fine-tuning of the base backbone on each arm's dataset (same settings for both)."""

    full_fine_tuning: bool = False   # false: LoRA
    epochs: float = positive(2.0)
    learning_rate: float = positive(2.0e-4)
    batch_size: int = positive(8)
    gradient_accumulation_steps: int = positive(1)
    max_length: int = positive(256)            # prompt + output tokens; longer examples are truncated
    lora: LoraParams = field(default_factory=LoraParams)
    save_steps: int = positive(20)             # optimiser steps between checkpoints (a rerun resumes from the last)
    gradient_checkpointing: bool = False  # saves GPU memory on 7B+ models at about 30% more time
    equal_examples: bool = True      # subsample the larger arm (seeded) to the smaller arm's size
    include_seed_tasks: bool = False  # add the seed tasks' instances to both arms (Self-Instruct did)
    # Extra arms from outside the pipeline, {name: source}: a JSONL file of instruction/input/output records, a
    # Hugging Face dataset folder (e.g. python -m refine_af_utils.export's) or a hub id; stage 5 fine-tunes on
    # each (equalised like the arms) and stage 6 evaluates it beside the base model and the two arms.
    external_arms: dict[str, str] = field(default_factory=dict)
    # Any other field of trl's SFTConfig, passed through as given, e.g. {warmup_steps: 100, weight_decay: 0.01,
    # report_to: [wandb]}; trl_bridge.SFT_CONFIG_OWNED's fields are refused.
    trainer_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationParams:
    """Stage 6: zero-shot Super-NaturalInstructions evaluation (Tk-Instruct / Self-Instruct protocol)."""

    # "bundled" (our 12-task offline set, not Super-NI numbers) or a natural-instructions checkout
    superni_dir: str = "bundled"
    max_instances: int = positive(100)         # the first instances of each test task
    max_new_tokens: int = positive(32)         # greedy decoding, stops at the end token
    batch_size: int = positive(16)
    max_prompt_tokens: int = positive(1024)    # longer prompts keep their end (the input and "Output:")


@dataclass
class Params:
    """All settings of one pipeline run."""

    run_name: str
    seed_tasks: str = "bundled"
    num_instructions: int = positive(80)
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
        """A short hash of the named top-level sections (all of them when none are named).

        A key of :data:`ADDED_KEYS` is hashed only when set away from the value that keeps the behaviour
        before it existed, so adding it leaves every earlier run's stages complete.
        """
        data = self.to_dict()
        for dotted, unchanged in ADDED_KEYS.items():
            section, key = dotted.split(".")
            if data[section].get(key) == unchanged:
                del data[section][key]
        if sections:
            data = {key: data[key] for key in sections}
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def validate(self, prefix: str, source: str) -> None:
        """The run name, ``trainer_args`` against trl, and PPO's sampling (checks across sections)."""
        check_run_name(self.run_name, source)
        check_trainer_args(self, source)
        from refine_af_utils.external_arms import check_external_arms

        check_external_arms(self.sft.external_arms, source)
        micro = self.rl.micro_batch_size
        if micro is not None and (micro < 1 or self.rl.batch_size % micro):
            raise ParamsError(f"{source}: key 'rl.micro_batch_size' must be a positive divisor of rl.batch_size "
                              f"({self.rl.batch_size}), got {micro}")
        check_engine(self, source)
        if self.rl.algorithm == "ppo" and self.instance_generation.top_p != 1.0:
            # trl 1.9.2's PPO samples with top_p=1 and computes its log-probabilities on the full
            # distribution; RL rollouts and stage 4 must decode alike, so stage 4 cannot use another top_p.
            raise ParamsError(
                f"{source}: key 'instance_generation.top_p' must be 1.0 with rl.algorithm 'ppo' "
                f"(got {self.instance_generation.top_p}): trl's PPO samples from the full distribution, "
                "and RL and stage 4 decode alike; use grpo or rloo for nucleus sampling"
            )


def check_engine(params: "Params", source: str) -> None:
    """``model.engine`` can decode what the stages ask of it (refine_af_utils/engines.py)."""
    sampled = {"instruction_generation.temperature": params.instruction_generation.temperature,
               "instruction_generation.presence_penalty": params.instruction_generation.presence_penalty,
               "instance_generation.temperature": params.instance_generation.temperature}
    if params.model.engine == "continuous":
        for key, value in sampled.items():
            if value:
                raise ParamsError(
                    f"{source}: key 'model.engine' is 'continuous', which decodes greedily only (transformers' "
                    f"continuous batching has no per-request seed and no presence penalty), but '{key}' is {value}; "
                    "use 'static' or 'vllm'")
    penalty = params.instruction_generation.presence_penalty
    if params.model.engine == "vllm" and not -2 <= penalty <= 2:
        raise ParamsError(f"{source}: key 'instruction_generation.presence_penalty' must be within [-2, 2] with "
                          f"model.engine 'vllm' (OpenAI's range, which vLLM enforces), got {penalty}")


# Keys added after runs existed, with the value that behaves as before they did (Params.fingerprint).
ADDED_KEYS: dict[str, Any] = {"rl.standardise_reward": False, "rl.stop_at_stop_strings": False, "rl.placebo": False,
                              "rl.critic": "full", "rl.micro_batch_size": None, "sft.external_arms": {},
                              "model.engine": "static", "rl.scale_rewards": "group",
                              "rl.activation_checkpointing": True}

RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def check_run_name(name: str, source: str = "<params>") -> None:
    """Refuse a run name that is not a plain folder name: letters, digits, ``-``, ``_``, ``.``; not ``.`` or ``..``."""
    if not RUN_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ParamsError(
            f"{source}: key 'run_name' must be a folder name of letters, digits, '-', '_' and '.' "
            f"(not '.' or '..'), got {name!r}"
        )


def params_from_dict(data: dict[str, Any], source: str = "<params>") -> Params:
    """Validate a nested dict against the schema and build :class:`Params`."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    return build(Params, data, source)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with each dotted key of ``overrides`` set (sections created as needed); checked by name."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        check_key(Params, dotted, source)
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


def resolve_params_data(path: str | Path, overrides: Optional[dict[str, Any]] = None,
                        overrides_source: str = "--set") -> dict[str, Any]:
    """The mapping :func:`load_params` validates: the file, its ``extends`` chain, then ``overrides``."""
    data = resolve_extends(path)
    return apply_overrides(data, overrides or {}, f"{overrides_source} (over {path})")


def _blame_override(error: ParamsError, path: Path, overrides: dict[str, Any], overrides_source: str) -> ParamsError:
    """``error`` reworded to name ``overrides_source`` when the key it is about was set there, not in the file."""
    message = str(error)
    prefix = f"{path}: "
    if not message.startswith(prefix):
        return error
    for dotted in sorted(overrides, key=len, reverse=True):  # the most specific key that the message names
        if f"key '{dotted}'" in message or f"key '{dotted}." in message:
            return ParamsError(f"{overrides_source} {dotted}={overrides[dotted]!r} (over {path}): "
                               f"{message[len(prefix):]}")
    return error


def load_params(path: str | Path, overrides: Optional[dict[str, Any]] = None,
                overrides_source: str = "--set") -> Params:
    """Load and validate a params YAML file; ``overrides`` are dotted keys applied on top.

    The file may name a parent with ``extends:`` (a path relative to it); its keys are deep-merged
    over the parent's (:func:`~refine_af_utils.params_loading.resolve_extends`). ``overrides`` (e.g. from
    ``--set``, see :func:`parse_overrides`) go on last and are typed and checked by the schema like the
    file's keys; an error about one of them names ``overrides_source`` and the key, not the file.

    Raises :class:`ParamsError` with one line naming the file and the line (bad YAML, a duplicate
    key, a byte that is not UTF-8) or the dotted key (unknown, missing, wrong type or out of range).
    """
    path = Path(path)
    overrides = overrides or {}
    data = resolve_params_data(path, overrides, overrides_source)
    try:
        return params_from_dict(data, str(path))
    except ParamsError as error:
        raise _blame_override(error, path, overrides, overrides_source) from None


def params_yaml(params: Params, header: str = "") -> str:
    """``params`` as a complete YAML file (no ``extends``) that :func:`load_params` reads back equal."""
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    body = yaml.safe_dump(params.to_dict(), sort_keys=False, allow_unicode=True, width=1_000_000,
                          default_flow_style=False)
    return lines + body
