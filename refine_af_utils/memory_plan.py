"""A plan before stage 1: what each stage holds in memory for a recipe, counted on models built on the meta device.

``python -m refine_af_utils.run PARAMS --plan [--gpu-memory GIB]`` (or ``python -m refine_af_utils.memory_plan``)
prints, per stage: the parameter counts of the backbone and of each scorer on the same device, their weights,
the trained parameters and their optimiser state, the KV cache of the stage's decoding batch and an activation
estimate for the training stages; the total against the memory given; and the tokens it decodes with a time
range at stated rates. A stage that does not fit is refused before anything runs, naming the key to change.

What is exact and what is estimated:

* **Exact** (from the model classes, via transformers' ``from_config`` and peft on the meta device): parameter
  counts, weight bytes in the configured dtype, the LoRA adapters' and the critic's trained parameters.
* **Counted by rule**: training state at 16 bytes per trained float32 parameter (weight, gradient, AdamW's two
  moments; peft keeps adapters in float32, stage 3 its critic and value head) and, for full SFT, 4 times the
  dtype's bytes per parameter (the weights are trained in their loaded dtype); the KV cache as layers x 2 x
  key/value heads x head size x batch x tokens.
* **Estimated**: prompt lengths (real prompts built from the bundled seed tasks, at :data:`CHARS_PER_TOKEN`),
  activations of a training step (with activation checkpointing: one hidden state per layer plus one layer's
  working set, and the logits in float32 a few times over), and the time (the decoded tokens at
  :data:`TOKENS_PER_SECOND`, an assumed range, not a measurement).

CUDA's own context, allocator fragmentation and the scorers of another device are not counted; the plan
refuses a stage above :data:`USABLE_SHARE` of the memory given.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

TRAINING_BYTES_PER_PARAMETER = 4 + 4 + 8  # float32 weight, gradient, AdamW's exp_avg and exp_avg_sq
CHARS_PER_TOKEN = 4.0  # English text under a BPE tokenizer, about
USABLE_SHARE = 0.9  # of the memory given: CUDA's context and fragmentation take the rest
# Decoding rates assumed for the time column (tokens/s summed over a batch, one 7B model on one 80 GB GPU with
# transformers' static batching): an assumption for planning, not a measurement of this package.
TOKENS_PER_SECOND = (500, 2000)


@dataclass
class Part:
    """One resident part of a stage: its parameters, how many are trained, its bytes, and the key that sizes it."""

    name: str
    parameters: int
    trained: int
    bytes: int
    key: str = ""


@dataclass
class StagePlan:
    """One stage: its parts, the tokens it decodes, and whether it fits."""

    stage: str
    parts: list[Part]
    decoded_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Bytes of every part together."""
        return sum(p.bytes for p in self.parts)

    def key_to_change(self) -> str:
        """The key of the largest part that one can change (a stage that does not fit names it)."""
        sized = [p for p in self.parts if p.key]
        return max(sized, key=lambda p: p.bytes).key if sized else "model.name_or_path"


def meta_causal_lm(config: Any, dtype: torch.dtype) -> Any:
    """The causal LM of ``config`` built on the meta device: shapes and dtypes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def plan_dtype(name: str, device: str) -> torch.dtype:
    """The dtype a model loads in on ``device``: ``auto`` is bfloat16 on a GPU (this machine may have none)."""
    from refine_af_utils.models import torch_dtype

    if name == "auto" and device.startswith("cuda"):
        return torch.bfloat16
    return torch_dtype(name)


def kv_cache_bytes(config: Any, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """The KV cache of ``batch`` sequences of ``tokens`` tokens: layers x 2 x key/value heads x head size."""
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers * 2 * kv_heads * head_size * batch * tokens * _element_size(dtype)


def training_activation_bytes(config: Any, batch: int, tokens: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """An estimate of one training step's activations: with checkpointing, one hidden state per layer plus one
    layer's working set (about 16 hidden-sized and 3 MLP-sized tensors); without, every layer's working set;
    and the logits in float32 three times over (logits, log-softmax, their gradient)."""
    b = _element_size(dtype)
    hidden = batch * tokens * config.hidden_size * b
    layer = batch * tokens * (16 * config.hidden_size + 3 * getattr(config, "intermediate_size", 4 * config.hidden_size)) * b
    kept = config.num_hidden_layers * hidden + layer if checkpointing else config.num_hidden_layers * layer
    return kept + 3 * batch * tokens * config.vocab_size * 4


def prompt_tokens(params: Any) -> dict[str, int]:
    """The longest prompt of each kind, in tokens at :data:`CHARS_PER_TOKEN`, built from the bundled seed tasks
    with the run's settings: stage 1's instruction prompt, stage 1's classification prompt, the instance prompt."""
    import random

    from refine_af_utils.instances import instance_prompts
    from refine_af_utils.prompts import classification_prompt, instruction_generation_prompt
    from refine_af_utils.seeding import derive_seed
    from refine_af_utils.seeds import load_seed_tasks

    seeds = load_seed_tasks("bundled")
    rng = random.Random(derive_seed(params.random_seed, "plan", "classification examples"))
    count = min(params.instruction_generation.num_prompt_instructions, len(seeds))
    longest = sorted(seeds, key=lambda s: -len(s.instruction))
    instruction = instruction_generation_prompt([s.instruction for s in longest[:count]],
                                                params.instruction_generation.prompt_variant)
    examples = [(s.instruction, s.is_classification) for s in rng.sample(seeds, min(params.classification.num_examples,
                                                                                     len(seeds)))]
    classification = classification_prompt(examples, longest[0].instruction)
    instance = max(instance_prompts([{"instruction": s.instruction, "is_classification": s.is_classification}
                                     for s in seeds], seeds, params.instance_generation, 0), key=len)
    return {name: math.ceil(len(text) / CHARS_PER_TOKEN) for name, text in
            (("instruction", instruction), ("classification", classification), ("instance", instance))}


def _backbone_part(config: Any, dtype: torch.dtype, name: str) -> Part:
    model = meta_causal_lm(config, dtype)
    count = sum(p.numel() for p in model.parameters())
    return Part(name, count, 0, count * _element_size(dtype), "model.name_or_path")


def scorer_parts(params: Any, configs: dict[str, Any]) -> tuple[list[Part], list[str]]:
    """One part per distinct scorer model on the backbone's kind of device (scorers sharing a model share it),
    and notes for the scorers whose config is not available (not counted)."""
    from transformers import AutoModel

    device_kind = params.model.device.split(":")[0]
    parts, notes, seen = [], [], set()
    for name in ("reward_model", "understandability", "naturalness", "coherence"):
        spec = getattr(params.reward, name)
        if spec.device.split(":")[0] != device_kind or (spec.model, spec.dtype) in seen:
            continue
        seen.add((spec.model, spec.dtype))
        config = model_config(spec.model, configs, spec.trust_remote_code)
        if config is None:
            notes.append(f"scorer {spec.model}: config not available here, not counted")
            continue
        dtype = plan_dtype(spec.dtype, spec.device)
        with torch.device("meta"):
            model = AutoModel.from_config(config, dtype=dtype)
        count = sum(p.numel() for p in model.parameters())
        parts.append(Part(f"scorer {spec.model} ({dtype})".replace("torch.", ""), count, 0,
                          count * _element_size(dtype), f"reward.{name}.model"))
    return parts, notes


def model_config(name_or_path: str, configs: dict[str, Any], trust_remote_code: bool = False) -> Optional[Any]:
    """The config of a model: from ``configs`` (name -> config) when given, else loaded (hub or folder); None
    when it cannot be had (offline, gated, or a custom model type transformers does not know)."""
    if name_or_path in configs:  # given (None: known to be unavailable)
        return configs[name_or_path]
    from transformers import AutoConfig

    from refine_af_utils.models import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None


def stage3_parts(params: Any, config: Any) -> list[Part]:
    """Stage 3's training state for ``params`` on the backbone of ``config``: the policy backbone (its dtype), the
    policy's LoRA and the critic (``rl.critic``, PPO only)."""
    from peft import get_peft_model

    from refine_af_utils.models import lora_config
    from refine_af_utils.ppo_critic import LoraCritic

    dtype = plan_dtype(params.model.dtype, params.model.device)
    policy = get_peft_model(meta_causal_lm(config, dtype), lora_config(params.rl.lora))
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    adapter = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    parts = [Part("policy backbone (frozen; also the KL reference, adapter off)", frozen, 0,
                  frozen * _element_size(dtype), "model.name_or_path"),
             Part("policy LoRA adapter", adapter, adapter, adapter * TRAINING_BYTES_PER_PARAMETER, "rl.lora.r")]
    if params.rl.algorithm == "ppo":
        if params.rl.critic == "lora":
            critic = sum(p.numel() for p in LoraCritic.from_policy(policy).parameters() if p.requires_grad)
            parts.append(Part("critic: LoRA adapter and value head (backbone shared)", critic, critic,
                              critic * TRAINING_BYTES_PER_PARAMETER, "rl.critic"))
        else:
            from transformers import AutoModelForSequenceClassification

            one_output = copy.deepcopy(config)
            one_output.num_labels = 1
            with torch.device("meta"):  # the backbone without its LM head, and a one-output head
                full = AutoModelForSequenceClassification.from_config(one_output, dtype=torch.float32)
            critic = sum(p.numel() for p in full.parameters())
            parts.append(Part("critic: full copy of the backbone, float32", critic, critic,
                              critic * TRAINING_BYTES_PER_PARAMETER, "rl.critic"))
    return parts


def plan(params: Any, configs: Optional[dict[str, Any]] = None) -> list[StagePlan]:
    """Every stage's plan (stages 1-6; stage 0 and the report hold no model) for ``params``.

    ``configs`` maps model names (the backbone's ``model.name_or_path``, a scorer's ``model``) to transformers
    configs, for models whose config cannot be loaded here (offline); the others are loaded.
    """
    from peft import get_peft_model

    from refine_af_utils.models import lora_config
    from refine_af_utils.trl_bridge import micro_batch_size

    configs = configs or {}
    config = model_config(params.model.name_or_path, configs, params.model.trust_remote_code)
    if config is None:
        raise ValueError(f"model.name_or_path: the config of {params.model.name_or_path} is not available here "
                         "(offline or gated): give it with --config")
    dtype = plan_dtype(params.model.dtype, params.model.device)
    prompts = prompt_tokens(params)
    scorers, notes = scorer_parts(params, configs)
    generation, instances, rl, sft, evaluation = (params.instruction_generation, params.instance_generation, params.rl,
                                                  params.sft, params.evaluation)
    backbone = _backbone_part(config, dtype, f"backbone {params.model.name_or_path} ({dtype})".replace("torch.", ""))

    def kv(name: str, batch: int, tokens: int, key: str) -> Part:
        return Part(f"KV cache: {name}, {batch} x {tokens} tokens", 0, 0, kv_cache_bytes(config, batch, tokens, dtype),
                    key)

    stage1_kv = max(kv("instruction prompts", generation.batch_size, prompts["instruction"] + generation.max_new_tokens,
                       "instruction_generation.batch_size"),
                    kv("classification prompts", params.classification.batch_size,
                       prompts["classification"] + params.classification.max_new_tokens, "classification.batch_size"),
                    key=lambda p: p.bytes)
    instance_kv = kv("instance prompts", instances.batch_size, prompts["instance"] + instances.max_new_tokens,
                     "instance_generation.batch_size")
    plans = [
        StagePlan("01 instruction generation", [backbone, stage1_kv],
                  params.num_instructions * generation.max_new_tokens,
                  ["decoded tokens: at most one accepted instruction per response assumed"]),
        StagePlan("02 reward analysis", [backbone, instance_kv, *scorers],
                  params.reward_analysis.num_instructions * params.reward_analysis.candidates_per_instruction
                  * instances.max_new_tokens, list(notes)),
    ]
    micro = micro_batch_size(rl)
    ppo = rl.algorithm == "ppo"
    sequences = micro * (1 if ppo else rl.num_generations)  # per forward and backward
    sequence = prompts["instance"] + instances.max_new_tokens
    checkpointing = bool(rl.activation_checkpointing)
    stage3 = stage3_parts(params, config)
    if ppo:  # trl's PPO samples per micro-batch but keeps every rollout's scores (float32, and a padded copy)
        # and stage 3's forward logits for the whole update's batch
        rollout_kv = kv("rollouts", micro, sequence, "rl.micro_batch_size")
        logits = Part(f"rollout logits: {rl.batch_size} x {instances.max_new_tokens} tokens x the vocabulary", 0, 0,
                      rl.batch_size * instances.max_new_tokens * config.vocab_size * (2 * 4 + _element_size(dtype)),
                      "rl.batch_size")
        stage3 += [rollout_kv, logits]
    else:  # GRPO and RLOO generate the update's batch x num_generations at once
        stage3.append(kv("rollouts", rl.batch_size * rl.num_generations, sequence, "rl.batch_size"))
    stage3 += [Part(f"activations: a training step of {sequences} x {sequence} tokens (estimate)", 0, 0,
                    training_activation_bytes(config, sequences, sequence, dtype, checkpointing) * (2 if ppo else 1),
                    "rl.micro_batch_size"),
               *scorers]
    episodes = rl.updates * rl.batch_size * (1 if ppo else rl.num_generations)
    plans.append(StagePlan("03 RL training", stage3,
                           (episodes + 2 * rl.heldout_instructions * rl.heldout_samples) * instances.max_new_tokens,
                           list(notes)))
    adapter = stage3[1].parameters  # stage 3's policy LoRA: the trained generator stage 4 decodes with
    plans.append(StagePlan("04 instance generation",
                           [backbone, Part("the trained generator's LoRA adapter", adapter, 0, adapter * 4),
                            instance_kv, *scorers],
                           2 * params.num_instructions * instances.max_new_tokens, list(notes)))
    if sft.full_fine_tuning:
        trained = backbone.parameters
        state = Part("full fine-tuning: gradient and AdamW state in the weights' dtype", trained, trained,
                     3 * trained * _element_size(dtype), "sft.full_fine_tuning")
    else:
        sft_model = get_peft_model(meta_causal_lm(config, dtype), lora_config(sft.lora))
        trained = sum(p.numel() for p in sft_model.parameters() if p.requires_grad)
        state = Part("SFT LoRA adapter", trained, trained, trained * TRAINING_BYTES_PER_PARAMETER, "sft.lora.r")
    plans.append(StagePlan("05 SFT", [backbone, state, Part(
        f"activations: a step of {sft.batch_size} x {sft.max_length} tokens (estimate)", 0, 0,
        training_activation_bytes(config, sft.batch_size, sft.max_length, dtype, sft.gradient_checkpointing),
        "sft.batch_size")]))
    tasks = 119 if evaluation.superni_dir != "bundled" else 12
    plans.append(StagePlan("06 Super-NI evaluation", [
        backbone, kv("evaluation prompts", evaluation.batch_size, evaluation.max_prompt_tokens + evaluation.max_new_tokens,
                     "evaluation.batch_size")],
        (3 + len(sft.external_arms)) * tasks * evaluation.max_instances * evaluation.max_new_tokens))
    return plans


def plan_report(plans: Sequence[StagePlan], memory_bytes: Optional[int], label: str) -> tuple[str, list[StagePlan]]:
    """The plan as Markdown (a table per stage, then the summary) and the stages that do not fit ``memory_bytes``."""
    usable = None if memory_bytes is None else USABLE_SHARE * memory_bytes
    lines, refused = [], []
    for stage in plans:
        lines += [f"### {stage.stage}", "", "| part | parameters | trained | GiB |", "|---|---:|---:|---:|"]
        for part in stage.parts:
            lines.append(f"| {part.name} | {part.parameters:,} | {part.trained:,} | {part.bytes / 2**30:.2f} |")
        lines.append(f"| **total** | | | **{stage.total / 2**30:.1f}** |")
        lines += [f"- {note}" for note in stage.notes] + [""]
    low, high = TOKENS_PER_SECOND
    lines += [f"### Summary ({label})", "",
              f"| stage | GiB | fits | key to change | decoded tokens | hours at {low:,}-{high:,} tokens/s (assumed) |",
              "|---|---:|---|---|---:|---|"]
    for stage in plans:
        fits = "-" if usable is None else ("yes" if stage.total <= usable else "**no**")
        if usable is not None and stage.total > usable:
            refused.append(stage)
        hours = (f"{stage.decoded_tokens / high / 3600:.1f}-{stage.decoded_tokens / low / 3600:.1f}"
                 if stage.decoded_tokens else "-")
        lines.append(f"| {stage.stage} | {stage.total / 2**30:.1f} | {fits} | "
                     f"{stage.key_to_change() if fits == '**no**' else ''} | {stage.decoded_tokens:,} | {hours} |")
    return "\n".join(lines), refused


def load_configs(items: Sequence[str], backbone: str) -> dict[str, Any]:
    """``--config`` values: ``DIR`` (the backbone's config) or ``NAME=DIR`` (any model's), as transformers configs."""
    from transformers import AutoConfig

    configs = {}
    for item in items:
        name, _, folder = item.rpartition("=") if "=" in item else (backbone, "", item)
        configs[name] = AutoConfig.from_pretrained(folder)
    return configs


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """``--gpu-memory`` and ``--config``, shared by the runner's ``--plan`` and this module's command line."""
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="memory per device to plan against, in GiB (default: this machine's GPU, or its RAM "
                             "for a CPU run)")
    parser.add_argument("--config", action="append", default=[], metavar="[NAME=]DIR",
                        help="a model's config folder, for models whose config cannot be loaded here (offline, "
                             "gated): DIR for the backbone, NAME=DIR for a scorer; repeatable")


def default_memory_bytes(device: str) -> Optional[int]:
    """The memory to plan against when none is given: this machine's GPU, or its RAM for a CPU run."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    import psutil

    return psutil.virtual_memory().total


def print_plan(params: Any, gpu_memory: Optional[float], config_items: Sequence[str], source: str) -> int:
    """Print the plan; 0 when every stage fits (or no memory is known), 2 when one does not (one line per stage
    naming the key to change)."""
    import sys

    configs = load_configs(config_items, params.model.name_or_path)
    memory = int(gpu_memory * 2**30) if gpu_memory is not None else default_memory_bytes(params.model.device)
    label = (f"{source}, {memory / 2**30:.0f} GiB per device, {USABLE_SHARE:.0%} usable" if memory
             else f"{source}: no memory to plan against (no GPU here: give --gpu-memory)")
    text, refused = plan_report(plan(params, configs), memory, label)
    print(text)
    for stage in refused:
        print(f"error: {source}: stage {stage.stage} needs {stage.total / 2**30:.1f} GiB, more than "
              f"{USABLE_SHARE * memory / 2**30:.1f} GiB usable of {memory / 2**30:.0f}: change "
              f"'{stage.key_to_change()}'", file=sys.stderr)
    return 2 if refused else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m refine_af_utils.memory_plan PARAMS [--gpu-memory GIB] [--config [NAME=]DIR]``."""
    from refine_af_utils.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("params", help="params YAML file, e.g. params/recipes/llama2-7b/paper.yaml")
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    return print_plan(load_params(args.params), args.gpu_memory, args.config, args.params)


if __name__ == "__main__":
    raise SystemExit(main())

