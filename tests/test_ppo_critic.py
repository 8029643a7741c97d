"""PPO's critic (refine_af_utils.ppo_critic) on a tiny Llama: the LoRA critic shares the policy's frozen weights
and nothing else, trains apart from the policy, speaks trl's value-model interface, saves and loads its own
tensors; activation checkpointing gives the same gradients."""

import pytest
import torch
from peft import get_peft_model
from trl.experimental.utils import get_reward

from refine_af_utils.models import load_causal_lm, lora_config
from refine_af_utils.params import ModelParams, RLLoraParams
from refine_af_utils.ppo_critic import LoraCritic, build_critic, checkpoint_activations


def _policy(tiny_llama_dir, dtype="float32"):
    torch.manual_seed(0)
    base, tokenizer = load_causal_lm(ModelParams(name_or_path=str(tiny_llama_dir), dtype=dtype))
    # the attention projections: on the tiny model an all-linear adapter is 13% of the trunk, on 7B well under 1%
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return get_peft_model(base, lora_config(RLLoraParams(r=4, lora_alpha=8, target_modules=attention))), tokenizer


def _query_responses(tokenizer):
    encoded = tokenizer(["Write a haiku about rain.", "Name three colours"], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    return torch.cat([encoded["input_ids"], torch.randint(5, 100, (2, 6))], 1), encoded["input_ids"].shape[1]


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_a_lora_critic_shares_the_frozen_weights_and_owns_only_its_adapter_and_head(tiny_llama_dir):
    policy, tokenizer = _policy(tiny_llama_dir)
    critic = LoraCritic.from_policy(policy)
    policy_storage = {p.data_ptr() for p in policy.parameters()}
    own = [p for p in critic.parameters() if p.data_ptr() not in policy_storage]
    assert own and all(p.requires_grad for p in own)  # what it does not share is exactly what it trains
    assert all(p.data_ptr() in policy_storage for p in critic.parameters() if not p.requires_grad)
    assert all(p.data_ptr() not in policy_storage for p in critic.parameters() if p.requires_grad)
    assert {n for n, p in critic.named_parameters() if p.requires_grad} == set(critic.trained_state())
    assert all("lora_" in n or n.startswith("score.") for n in critic.trained_state())
    full = build_critic("full", policy, ModelParams(name_or_path=str(tiny_llama_dir)), tokenizer, None)
    full_trained = [p for p in full.parameters() if p.requires_grad]
    # trained bytes, each with its gradient and AdamW's two moments: the LoRA critic's are a few per cent
    assert _bytes(own) < 0.1 * _bytes(full_trained)
    assert all(p.dtype == torch.float32 for p in full_trained)  # fp32 master weights for full-rank training


def test_training_the_critic_leaves_the_policy_alone_and_the_adapter_switch_leaves_the_critic_alone(tiny_llama_dir):
    policy, tokenizer = _policy(tiny_llama_dir)
    critic = LoraCritic.from_policy(policy)
    torch.manual_seed(1)
    for name, p in critic.named_parameters():  # a critic that has learnt something: non-zero B and head
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    query_responses, context = _query_responses(tokenizer)
    values, _, _ = get_reward(critic, query_responses, tokenizer.pad_token_id, context)  # trl's own reader
    assert values.shape == (*query_responses.shape, 1) and values.dtype == torch.float32
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    policy_logits = policy(input_ids=query_responses).logits.detach()
    with policy.disable_adapter():  # trl's reference pass must not switch the critic's adapter off
        unchanged, _, _ = get_reward(critic, query_responses, tokenizer.pad_token_id, context)
    torch.testing.assert_close(unchanged, values)
    optimizer = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=1e-2)
    values.square().mean().backward()
    optimizer.step()
    after, _, _ = get_reward(critic, query_responses, tokenizer.pad_token_id, context)
    assert not torch.allclose(after, values)  # the critic learnt
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # the policy did not move
    torch.testing.assert_close(policy(input_ids=query_responses).logits, policy_logits)


def test_a_saved_lora_critic_loads_back_and_refuses_another_adapter(tmp_path, tiny_llama_dir):
    policy, tokenizer = _policy(tiny_llama_dir)
    critic = LoraCritic.from_policy(policy)
    for p in critic.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    critic.save_pretrained(tmp_path / "value_model")
    reloaded = build_critic("lora", policy, None, tokenizer, tmp_path / "value_model")
    query_responses, context = _query_responses(tokenizer)
    torch.testing.assert_close(get_reward(reloaded, query_responses, tokenizer.pad_token_id, context)[0],
                               get_reward(critic, query_responses, tokenizer.pad_token_id, context)[0])
    torch.manual_seed(0)
    base, _ = load_causal_lm(ModelParams(name_or_path=str(tiny_llama_dir)))
    other = get_peft_model(base, lora_config(RLLoraParams(r=4, lora_alpha=8, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="does not match this policy's adapter"):
        build_critic("lora", other, None, tokenizer, tmp_path / "value_model")


def test_the_value_head_stays_float32_on_a_bfloat16_backbone(tiny_llama_dir):
    policy, tokenizer = _policy(tiny_llama_dir, dtype="bfloat16")
    critic = LoraCritic.from_policy(policy)
    assert critic.score.linear.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in critic.named_parameters() if "lora_" in n)  # peft's autocast
    query_responses, context = _query_responses(tokenizer)
    values, _, _ = get_reward(critic, query_responses, tokenizer.pad_token_id, context)
    assert values.dtype == torch.float32


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_activation_checkpointing_gives_the_same_gradients(tiny_llama_dir, kind):
    def gradients(checkpointed: bool) -> dict[str, torch.Tensor]:
        policy, tokenizer = _policy(tiny_llama_dir)
        critic = build_critic(kind, policy, ModelParams(name_or_path=str(tiny_llama_dir)), tokenizer, None)
        torch.nn.init.normal_(critic.score.weight if kind == "full" else critic.score.linear.weight, std=0.02)
        for p in policy.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        if checkpointed:
            checkpoint_activations(policy, critic)
        policy.train(), critic.train()
        query_responses, context = _query_responses(tokenizer)
        backbone = getattr(critic, critic.base_model_prefix)
        assert backbone.is_activation_checkpointing == policy.is_activation_checkpointing == checkpointed
        values = critic.score(backbone(input_ids=query_responses, output_hidden_states=True).hidden_states[-1])
        loss = policy(input_ids=query_responses).logits.logsumexp(-1).mean() + values.square().mean()
        loss.backward()
        named = [*policy.named_parameters(prefix="policy"), *critic.named_parameters(prefix="critic")]
        return {n: p.grad.clone() for n, p in named if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
