"""The bridge from the params schema to trl's config classes: what ``trainer_args`` may and may not set.

``sft.trainer_args`` and ``rl.trainer_args`` pass any other field of trl's config class (``SFTConfig``,
or ``PPOConfig`` / ``GRPOConfig`` / ``RLOOConfig`` for ``rl.algorithm``) through to trl as given. The
tables here name the trl fields that the package sets itself from its own keys, with where each value
comes from: a ``trainer_args`` key among them would silently change (or be overwritten by) what the
package decides, so :func:`check_trainer_args` refuses it when the params are loaded, as well as a key
that is not a field of trl's class at all, or a value that trl's class itself refuses, instead of
hours into a run.

The tables stay in step with the config builders below them (:func:`sft_config_args` for stage 5,
:func:`ppo_config_args` / :func:`group_config_args` for stage 3): every field a builder sets is in its
table (tests/test_params.py checks both ways against trl).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from refine_af_utils.errors import ParamsError

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
    "activation_checkpointing": "sft.gradient_checkpointing",
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
    "output_dir": "the run layout (rl_training/checkpoints)", "learning_rate": "rl.learning_rate",
    "lr_scheduler_type": "resume (constant: each segment starts a fresh optimiser)",
    "per_device_train_batch_size": "rl.micro_batch_size (or rl.batch_size)",
    "gradient_accumulation_steps": "rl.batch_size / rl.micro_batch_size",
    "logging_steps": "metrics.csv (one row per update)", "save_strategy": "rl.checkpoint_every",
    "total_episodes": "rl.updates", "max_steps": "rl.updates", "num_ppo_epochs": "rl.ppo_epochs",
    "num_mini_batches": "rl.batch_size", "kl_coef": "rl.kl_coef", "beta": "rl.kl_coef",
    "response_length": "instance_generation.max_new_tokens", "max_completion_length": "instance_generation.max_new_tokens",
    "temperature": "instance_generation.temperature", "top_p": "instance_generation.top_p",
    "stop_token": "the method (rollouts stop at the end token)", "missing_eos_penalty": "rl.missing_eos_penalty",
    "num_generations": "rl.num_generations", "whiten_rewards": "rl.batch_size (on from 8 prompts per update)",
    "local_rollout_forward_batch_size": "rl.micro_batch_size (or rl.batch_size)",
    "per_device_eval_batch_size": "rl.micro_batch_size (or rl.batch_size)",
    "num_sample_generations": "the held-out evaluation (stage 3's own)", "stop_token_id": "the method (rollouts stop at the end token)",
    "logging_strategy": "metrics.csv (one row per update)",
    "warmup_steps": "resume (constant learning rate: each segment starts a fresh optimiser)",
    "lr_scheduler_kwargs": "resume (constant learning rate: each segment starts a fresh optimiser)",
    "steps_per_generation": "rl.batch_size (one generation per update)", "generation_batch_size": "rl.batch_size",
    "num_iterations": "rl.ppo_epochs (one pass per generation with GRPO/RLOO)",
    "activation_checkpointing": "rl.activation_checkpointing", "gradient_checkpointing": "rl.activation_checkpointing",
    **{key: "instance_generation (RL rollouts and stage 4 decode alike)"
       for key in ("top_k", "min_p", "repetition_penalty", "generation_kwargs", "use_vllm")},
}
# PPO runs on stage 3's own AdamW (the policy's and the critic's learning rates) and trl's PPO does not
# clip gradients, so these fields would do nothing there.
PPO_CONFIG_OWNED: dict[str, str] = {
    key: "stage 3's own AdamW for PPO (rl.learning_rate, rl.value_learning_rate)"
    for key in ("optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")
}
GRPO_CONFIG_OWNED: dict[str, str] = {"scale_rewards": "rl.scale_rewards"}


def trl_config_class(section: str, algorithm: str = "ppo") -> type:
    """trl's config class that ``<section>.trainer_args`` pass through to: SFTConfig, or the RL algorithm's."""
    if section == "sft":
        from trl import SFTConfig
        return SFTConfig
    if algorithm == "ppo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # as stage 3 does: PPO lives in trl.experimental
        from trl.experimental.ppo import PPOConfig
        return PPOConfig
    from trl import GRPOConfig, RLOOConfig
    return GRPOConfig if algorithm == "grpo" else RLOOConfig


def check_trainer_args(params: Any, source: str) -> None:
    """Refuse a ``trainer_args`` key that trl's config class does not have, or that the package sets itself.

    ``params`` is a :class:`~refine_af_utils.params.Params` (not imported: params imports this module).
    trl is imported only when a ``trainer_args`` mapping is not empty; its config class then checks the values.
    """
    algorithm = params.rl.algorithm
    only = {"ppo": PPO_CONFIG_OWNED, "grpo": GRPO_CONFIG_OWNED}.get(algorithm, {})
    for section, owned in (("rl", {**RL_CONFIG_OWNED, **only}), ("sft", SFT_CONFIG_OWNED)):
        extra = getattr(params, section).trainer_args
        if not extra:
            continue  # trl is imported only when there is something to check
        config = trl_config_class(section, algorithm)
        fields = {f.name for f in dataclasses.fields(config)}
        for key in extra:
            if key in owned:
                raise ParamsError(f"{source}: key '{section}.trainer_args.{key}' is set by the package from "
                                  f"{owned[key]}; set that instead")
            if key not in fields:
                raise ParamsError(f"{source}: key '{section}.trainer_args.{key}' is not a field of trl's "
                                  f"{config.__name__}")
        _check_trackers(extra.get("report_to"), f"{section}.trainer_args.report_to", source)
        with tempfile.TemporaryDirectory() as scratch:  # trl checks the values now, not hours into the run
            try:
                # checkpointing set: where transformers has activation_checkpointing, trl's default
                # gradient_checkpointing=True is a deprecated alias that warns
                config(**{"report_to": [], checkpointing_key(): False, **extra, "output_dir": scratch,
                          "use_cpu": True})
            except (TypeError, ValueError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ParamsError(f"{source}: key '{section}.trainer_args' is refused by trl's {config.__name__}: "
                                  f"{first}") from error


def _check_trackers(report_to: Any, key: str, source: str) -> None:
    """A tracker named in ``report_to`` (wandb, tensorboard, ...) must be installed: transformers would
    otherwise fail when the trainer starts, hours into a run, instead of when the params load."""
    if report_to in (None, "none", "all", []):
        return
    from transformers.integrations import get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    available = set(get_available_reporting_integrations())
    missing = [name for name in names if name not in ("none", "all") and name not in available]
    if missing:
        raise ParamsError(f"{source}: key '{key}' names {', '.join(repr(m) for m in missing)}, which is not "
                          f"installed here: pip install {' '.join(missing)} (installed trackers: "
                          f"{', '.join(sorted(available)) or 'none'})")


# --- the config builders: the trl config arguments stages 3 and 5 pass (the tables above guard them) ---
# ``params`` is a ``params.Params`` and ``cfg`` a ``params.SFTParams`` (not imported: params imports this module).

def sft_config_args(cfg: Any, output_dir: Path, seed: int, device: str, dtype: Any) -> dict[str, Any]:
    """trl ``SFTConfig``'s arguments: ``sft.trainer_args`` as given, under the fields the package sets itself
    (:data:`SFT_CONFIG_OWNED`, which ``trainer_args`` may not name)."""
    import torch

    return {
        "report_to": [], "disable_tqdm": False, **cfg.trainer_args,
        "output_dir": str(output_dir), "num_train_epochs": cfg.epochs, "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_length": cfg.max_length, "completion_only_loss": True, "logging_steps": 1,
        checkpointing_key(): cfg.gradient_checkpointing, "save_strategy": "steps", "save_steps": cfg.save_steps,
        "save_total_limit": 1, "seed": seed, "data_seed": seed, "use_cpu": device == "cpu",
        "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
    }


def logged_kl_unit(algorithm: str) -> str:
    """The unit of the ``kl`` trl logs (stage 3's ``metrics.csv``): trl 1.9.2's PPO sums the KL over a response's
    tokens (mean over sequences); its GRPO and RLOO average it over the completion tokens."""
    return "nat per sequence" if algorithm == "ppo" else "nat per token"


def micro_batch_size(cfg: Any) -> int:
    """Prompts per forward and backward in stage 3, per process (``rl.micro_batch_size``, or the whole
    ``rl.batch_size``; not trl's own ``args.micro_batch_size``, which counts every process)."""
    return cfg.micro_batch_size or cfg.batch_size


def checkpointing_key() -> str:
    """transformers' ``TrainingArguments`` name for activation checkpointing: ``activation_checkpointing`` in the
    main lock's transformers (``gradient_checkpointing`` is its deprecated alias), ``gradient_checkpointing`` in
    older ones (``.venv-vllm``'s 5.19, which vLLM pins)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _rl_common_args(params: Any, output_dir: Path, seed: int, dtype: Any,
                    steps_or_episodes: dict[str, int]) -> dict[str, Any]:
    """The trl config fields every algorithm shares, over ``rl.trainer_args`` (which may not set them);
    ``dtype``: the torch dtype the backbone loads in (``models.torch_dtype``)."""
    import torch

    cfg = params.rl
    micro = micro_batch_size(cfg)
    return {
        # under transformers' new name where it has one (the old, trl's gradient_checkpointing, warns)
        checkpointing_key(): bool(cfg.activation_checkpointing),
        "report_to": [], "disable_tqdm": False, **cfg.trainer_args,  # rl.trainer_args: any other trl field
        "output_dir": str(output_dir), "learning_rate": cfg.learning_rate, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": cfg.batch_size // micro,
        "logging_steps": 1, "save_strategy": "no", "seed": seed, "data_seed": seed,
        "use_cpu": params.model.device == "cpu", "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16, **steps_or_episodes,
    }


def ppo_config_args(params: Any, output_dir: Path, seed: int, updates: int, dtype: Any) -> dict[str, Any]:
    """trl ``PPOConfig``'s arguments for ``updates`` updates: ``rl.trainer_args`` under the package's own fields."""
    cfg, decoding = params.rl, params.instance_generation
    from refine_af_utils.processes import world_size

    # trl counts episodes over all processes (batch_size x processes per update)
    episodes = updates * cfg.batch_size * world_size()
    return {**_rl_common_args(params, output_dir, seed, dtype, {"total_episodes": episodes}),
            "num_ppo_epochs": cfg.ppo_epochs, "num_mini_batches": 1, "kl_coef": cfg.kl_coef,
            "response_length": decoding.max_new_tokens, "temperature": decoding.temperature, "stop_token": "eos",
            "missing_eos_penalty": cfg.missing_eos_penalty, "whiten_rewards": cfg.batch_size >= 8,
            "local_rollout_forward_batch_size": micro_batch_size(cfg), "num_sample_generations": 0,
            "per_device_eval_batch_size": micro_batch_size(cfg)}


def group_config_args(params: Any, output_dir: Path, seed: int, updates: int, dtype: Any) -> dict[str, Any]:
    """trl ``GRPOConfig``'s / ``RLOOConfig``'s arguments: ``rl.num_generations`` completions per prompt."""
    cfg, decoding = params.rl, params.instance_generation
    common = _rl_common_args(params, output_dir, seed, dtype, {"max_steps": updates})
    common["per_device_train_batch_size"] = micro_batch_size(cfg) * cfg.num_generations
    grpo = {"scale_rewards": cfg.scale_rewards} if cfg.algorithm == "grpo" else {}
    return {**common, "num_generations": cfg.num_generations, "max_completion_length": decoding.max_new_tokens,
            "temperature": decoding.temperature, "top_p": decoding.top_p, "beta": cfg.kl_coef, **grpo}


@contextlib.contextmanager
def ppo_logprobs_from_forward() -> Iterator[None]:
    """Inside the block, trl PPO's rollout log-probs come from one ``forward()`` over query and response, the
    same computation as its reference log-probs and its loss's new log-probs.

    trl 1.9.2 takes them from ``generate()``'s scores, decoded token by token with a KV cache; in bfloat16 that
    rounds differently from a full forward (tests/test_rl_training.py measures the per-token gap), so at update
    1, with policy and reference still equal, the default run committed at 533daaf logged a KL of -0.37 nat per
    sequence and the PPO ratio was off 1.
    The sampled tokens are unchanged; the cost is one forward per rollout batch. trl calls the module-level
    ``batch_generation`` by name, which this replaces for the block.
    """
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo

    if not all(hasattr(ppo, name) for name in ("batch_generation", "forward")):  # pragma: no cover - a new trl
        raise RuntimeError("trl's PPO module no longer has batch_generation/forward: check ppo_logprobs_from_forward")
    original = ppo.batch_generation

    @torch.no_grad()
    def batch_generation(model: Any, queries: Any, local_rollout_forward_batch_size: int, pad_token_id: int,
                         generation_config: Any) -> tuple[Any, Any]:
        query_responses, _ = original(model, queries, local_rollout_forward_batch_size, pad_token_id,
                                      generation_config)
        context_length, chunks = queries.shape[1], []
        for start in range(0, query_responses.shape[0], local_rollout_forward_batch_size):
            chunk = query_responses[start:start + local_rollout_forward_batch_size]
            logits = ppo.forward(model, chunk, pad_token_id).logits[:, context_length - 1:-1]
            logits /= generation_config.temperature  # trl's args.temperature + 1e-7, in place, as its reference
            chunks.append(logits)
        return query_responses, torch.cat(chunks, 0)

    ppo.batch_generation = batch_generation
    try:
        yield
    finally:
        ppo.batch_generation = original


def stop_string_end(tokenizer: Any, tokens: list[int], stop_strings: Any) -> Optional[int]:
    """The number of leading ``tokens`` whose text first holds a whole stop string, or None when none does.

    A prefix that holds one keeps holding it as it grows, so the shortest is found by bisection.
    """
    def holds(length: int) -> bool:
        text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
        return any(stop in text for stop in stop_strings)

    if not tokens or not holds(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if holds(middle) else (middle + 1, high)
    return low


@contextlib.contextmanager
def ppo_rollouts_end_at_stop_strings(tokenizer: Any, stop_strings: Any) -> Iterator[None]:
    """Inside the block, trl PPO's rollouts end at their first stop string as well as at the end token.

    trl 1.9.2 samples with no stop strings, so a rollout runs on to ``response_length`` tokens while the reward
    reads only the text before the stop string (``generation.decode_completion``). Here the tokens after the
    one that completes the stop string become padding (trl's ``truncate_response``), so the score lands on
    the kept text's last token and the tail gets no advantage and no KL. The kept tokens still decode to the
    stop string, so the reward, cut by the same rule, is unchanged. trl calls ``truncate_response`` by name.
    """
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo

    if not hasattr(ppo, "truncate_response"):  # pragma: no cover - a new trl
        raise RuntimeError("trl's PPO module no longer has truncate_response: check ppo_rollouts_end_at_stop_strings")
    original = ppo.truncate_response

    def truncate_response(stop_token_id: int, pad_token_id: int, responses: Any) -> Any:
        truncated = original(stop_token_id, pad_token_id, responses)
        for row in range(truncated.shape[0]):
            tokens = truncated[row].tolist()
            tokens = tokens[: tokens.index(pad_token_id)] if pad_token_id in tokens else tokens  # padding trails
            end = stop_string_end(tokenizer, tokens, stop_strings)
            if end is not None:
                truncated[row, end:] = torch.full_like(truncated[row, end:], pad_token_id)
        return truncated

    ppo.truncate_response = truncate_response
    try:
        yield
    finally:
        ppo.truncate_response = original


def reference_is_the_base(trainer: Any) -> None:
    """Make a trl GRPO/RLOO trainer's KL reference the base model (adapters disabled) for a policy that already
    carries a trained adapter.

    Given a peft model, trl 1.9.2 copies its adapter into a frozen ``ref`` adapter and uses that as the reference;
    for a segment resumed from a checkpoint that anchors the KL to the segment's own start (stage 3 logged a KL of
    0 at the first update of every later segment) and saves ``ref`` beside the adapter. Without ``ref``, trl
    computes the reference with adapters disabled, as for a fresh adapter and as PPO does.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


@contextlib.contextmanager
def group_rollouts_end_at_stop_strings(trainer: Any, tokenizer: Any, stop_strings: Any) -> Iterator[None]:
    """Inside the block, a trl GRPO/RLOO trainer's completions end at their first stop string as well as at
    the end token.

    trl 1.9.2 samples with no stop strings; each completion's tokens all share its advantage, so the tail after
    the stop string (which the reward never reads) would be trained as hard as the kept text. Here
    ``_generate_single_turn``'s token lists (and vLLM's per-token log-probs, where given) are cut after the token
    that completes the stop string, so the tail gets no advantage and no KL; the kept tokens still decode to the
    stop string, so the reward is unchanged. GRPO returns ``(ids, logprobs)``, RLOO the ids alone.
    """
    original = trainer._generate_single_turn

    def cut(ids: list[int]) -> int:
        end = stop_string_end(tokenizer, list(ids), stop_strings)
        return len(ids) if end is None else end

    def generate_single_turn(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        ids, logprobs = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        ends = [cut(c) for c in ids]
        ids = [c[:end] for c, end in zip(ids, ends)]
        if logprobs is not None:
            logprobs = [lp[:end] for lp, end in zip(logprobs, ends)]
        return (ids, logprobs, *out[2:]) if isinstance(out, tuple) else ids

    trainer._generate_single_turn = generate_single_turn
    try:
        yield
    finally:
        del trainer._generate_single_turn  # the class's method again


def expose_ppo_models(trainer: Any) -> None:
    """Let trl PPO's wrapped model answer ``.policy`` and ``.value_model`` under several processes.

    ``accelerator.prepare`` wraps trl's ``PolicyAndValueWrapper`` in DistributedDataParallel, which has neither
    attribute, yet trl 1.9.2 reads ``self.model.policy`` for its reference pass (``null_ref_context``, with a
    peft policy), its KL forward and ``save_model`` (huggingface/trl#2375). The wrapped instance gets the two
    modules as plain attributes (not registered submodules: DDP's parameters and state dict are unchanged).
    With one process the model is not wrapped and nothing changes.
    """
    wrapped = trainer.model
    inner = trainer.accelerator.unwrap_model(wrapped)
    if wrapped is not inner:
        for name in ("policy", "value_model"):
            wrapped.__dict__[name] = getattr(inner, name)
