"""What stage 3 holds in memory for a backbone, counted on models built on the meta device (no weights loaded).

``python -m refine_af_utils.memory_plan PARAMS [--config DIR_OR_HUB_ID]`` prints, for the run's backbone and
``rl`` settings, each resident part of PPO training: the policy's weights, its LoRA adapter's training state,
the critic's (``rl.critic``), with parameter counts and bytes. The counts come from the model classes
themselves (transformers' ``from_config`` and peft on the meta device), so they are exact for the
architecture; activations, the KV cache and the scorers come on top and are not counted here.

Training state is counted as float32 master weight, gradient and AdamW's two moments: 16 bytes per trained
parameter (peft keeps adapters in float32; stage 3 keeps a full critic and the value head in float32).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

TRAINING_BYTES_PER_PARAMETER = 4 + 4 + 8  # float32 weight, gradient, AdamW's exp_avg and exp_avg_sq


@dataclass
class Part:
    """One resident part of stage 3: its parameters, how many are trained, and its bytes."""

    name: str
    parameters: int
    trained: int
    bytes: int


def meta_causal_lm(config: Any, dtype: torch.dtype) -> Any:
    """The causal LM of ``config`` built on the meta device: shapes and dtypes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def stage3_parts(params: Any, config: Any) -> list[Part]:
    """Stage 3's resident parts for ``params`` (a :class:`~refine_af_utils.params.Params`) on the backbone of
    ``config``: the policy backbone (its dtype), the policy's LoRA and the critic (training state)."""
    from peft import get_peft_model

    from refine_af_utils.models import lora_config, torch_dtype
    from refine_af_utils.ppo_critic import LoraCritic

    on_gpu = params.model.device.startswith("cuda")
    # "auto" is bfloat16 on a GPU (models.torch_dtype would ask this machine, which may have none)
    dtype = torch.bfloat16 if on_gpu and params.model.dtype == "auto" else torch_dtype(params.model.dtype)
    policy = get_peft_model(meta_causal_lm(config, dtype), lora_config(params.rl.lora))
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    adapter = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    parts = [Part("policy backbone (frozen; also the KL reference, adapter off)", frozen, 0,
                  frozen * torch.tensor([], dtype=dtype).element_size()),
             Part("policy LoRA adapter", adapter, adapter, adapter * TRAINING_BYTES_PER_PARAMETER)]
    if params.rl.algorithm == "ppo":
        if params.rl.critic == "lora":
            critic = sum(p.numel() for p in LoraCritic.from_policy(policy).parameters() if p.requires_grad)
            parts.append(Part("critic: LoRA adapter and value head (backbone shared)", critic, critic,
                              critic * TRAINING_BYTES_PER_PARAMETER))
        else:
            from transformers import AutoModelForSequenceClassification

            one_output = copy.deepcopy(config)
            one_output.num_labels = 1
            with torch.device("meta"):  # the backbone without its LM head, and a one-output head
                full = AutoModelForSequenceClassification.from_config(one_output, dtype=torch.float32)
            critic = sum(p.numel() for p in full.parameters())
            parts.append(Part("critic: full copy of the backbone, float32", critic, critic,
                              critic * TRAINING_BYTES_PER_PARAMETER))
    return parts


def parts_table(parts: Sequence[Part]) -> str:
    """A Markdown table of ``parts`` with a total row (bytes in GiB)."""
    lines = ["| part | parameters | trained | GiB |", "|---|---:|---:|---:|"]
    for part in [*parts, Part("total", sum(p.parameters for p in parts), sum(p.trained for p in parts),
                              sum(p.bytes for p in parts))]:
        lines.append(f"| {part.name} | {part.parameters:,} | {part.trained:,} | {part.bytes / 2**30:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print stage 3's resident parts for a params file, one table per critic kind."""
    import dataclasses

    from transformers import AutoConfig

    from refine_af_utils.models import resolve_model_path
    from refine_af_utils.params import load_params
    from refine_af_utils.ppo_critic import CRITICS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("params", help="params YAML file, e.g. params/recipes/llama2-7b/paper.yaml")
    parser.add_argument("--config", help="a model folder or hub id whose config.json to use instead of "
                                         "model.name_or_path's (e.g. offline)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = AutoConfig.from_pretrained(resolve_model_path(args.config or params.model.name_or_path),
                                        trust_remote_code=params.model.trust_remote_code)
    for critic in CRITICS:
        variant = dataclasses.replace(params, rl=dataclasses.replace(params.rl, critic=critic))
        print(f"\n{args.params}: stage 3, {params.rl.algorithm}, critic {critic!r}, backbone {params.model.dtype}\n")
        print(parts_table(stage3_parts(variant, config)))


if __name__ == "__main__":
    main()
