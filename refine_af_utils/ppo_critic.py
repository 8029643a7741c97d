"""PPO's critic (value model) for stage 3: a full trainable copy of the backbone, or a LoRA critic on the policy's
frozen weights (``rl.critic``).

trl's PPO reads a value model through two attributes only: ``getattr(model, model.base_model_prefix)`` (a
backbone called with ``output_hidden_states=True``) and ``model.score`` (hidden states to one value per token).

* ``full`` (trl's own setup): a sequence-classification copy of the backbone, every weight trained. Its weights,
  gradients and AdamW state cost 16 bytes per parameter in float32 master weights (98.5 GiB for LLaMA-2-7B;
  a copy trained in bf16 would be half that, and its 1e-5 updates would round away).
* ``lora``: the policy's backbone module tree copied with its frozen weights *shared* (the same tensors, no
  second copy), its own LoRA adapter (``rl.lora``'s settings) and a float32 value head. The trained state is
  the adapter and the head; the trunk costs nothing beyond the policy's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

CRITICS = ("full", "lora")
_TRAINED_FILE = "critic.safetensors"  # a LoRA critic's trained tensors (adapter and head)


class ValueHead(nn.Module):
    """One value per position from the last hidden state, in float32 whatever the backbone's dtype (it is a
    full-rank trained weight: bf16 would round its small updates away). Zero-initialised: "no advantage"."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.linear(hidden.float())


class LoraCritic(nn.Module):
    """A value model that shares the policy's frozen backbone weights and trains its own LoRA adapter and head.

    ``backbone`` is a copy of the policy's transformer trunk (LoRA layers included) whose frozen tensors are
    the policy's own; its LoRA tensors are its own copies.
    """

    base_model_prefix = "backbone"

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.score = ValueHead(hidden_size)

    @classmethod
    def from_policy(cls, policy: Any) -> "LoraCritic":
        """A LoRA critic over ``policy`` (a peft ``PeftModel`` of a causal LM): its trunk copied with every frozen
        tensor shared, its adapter starting where the policy's is (A random, B zero on a fresh adapter)."""
        causal_lm = policy.get_base_model()
        trunk = getattr(causal_lm, causal_lm.base_model_prefix)
        shared = {id(p): p for p in trunk.parameters() if not p.requires_grad}
        backbone = copy.deepcopy(trunk, memo=dict(shared))
        return cls(backbone, causal_lm.config.hidden_size)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors the critic trains (its adapter and head), by name."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the trained tensors (not the shared trunk) to ``folder``."""
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.trained_state().items()}, str(Path(folder) / _TRAINED_FILE))

    def load_trained(self, folder: str | Path) -> None:
        """Load the trained tensors that :meth:`save_pretrained` wrote; a missing or extra name is an error."""
        from safetensors.torch import load_file

        saved = load_file(str(Path(folder) / _TRAINED_FILE))
        expected = set(self.trained_state())
        if set(saved) != expected:
            raise ValueError(f"{folder}: the saved LoRA critic does not match this policy's adapter "
                             f"({len(set(saved) ^ expected)} tensor names differ)")
        with torch.no_grad():
            parameters = dict(self.named_parameters())
            for name, tensor in saved.items():
                parameters[name].copy_(tensor)


def build_critic(kind: str, policy: Any, model_params: Any, tokenizer: Any,
                 saved: Optional[Path]) -> nn.Module:
    """PPO's value model of ``kind`` (:data:`CRITICS`) for ``policy``, from the saved one in ``saved`` when
    resuming. ``model_params`` is the run's ``params.model``."""
    if kind == "lora":
        critic = LoraCritic.from_policy(policy)
        if saved is not None:
            critic.load_trained(saved)
        return critic
    if kind != "full":  # pragma: no cover - the params schema admits only CRITICS
        raise ValueError(f"unknown critic {kind!r}: one of {CRITICS}")
    from transformers import AutoModelForSequenceClassification

    from refine_af_utils.library_noise import quiet_load_report
    from refine_af_utils.models import resolve_model_path

    source = resolve_model_path(model_params.name_or_path) if saved is None else saved
    with quiet_load_report():  # its score head is new by design (zeroed below)
        # float32 master weights: every weight is trained, and bf16 would round 1e-5 updates away
        revision = {"revision": model_params.revision} if saved is None and model_params.revision else {}
        critic = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch.float32, trust_remote_code=model_params.trust_remote_code, **revision)
    critic.config.pad_token_id = tokenizer.pad_token_id
    head = getattr(critic, "score", None)
    if saved is None and isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)  # a random head gives random values; zero predicts "no advantage" at first
    return critic.to(next(policy.parameters()).device)


def checkpoint_activations(policy: Any, critic: nn.Module) -> None:
    """Recompute activations in the backward pass, in the policy and the critic's backbone (trl's PPO reads
    ``gradient_checkpointing`` from its config but never turns it on; its GRPO and RLOO do). The gradients
    are the same; activations of one layer at a time are kept instead of all."""
    for model in (policy, getattr(critic, critic.base_model_prefix)):
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers before the rename (.venv-vllm's 5.19)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
