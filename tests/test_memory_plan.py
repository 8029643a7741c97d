"""Stage 3's resident parts counted on the meta device (refine_af_utils.memory_plan): exact against the real
model's parameters, and the recipes' backbones at their public sizes."""

from pathlib import Path

import pytest
from transformers import AutoConfig

from refine_af_utils.memory_plan import TRAINING_BYTES_PER_PARAMETER, main, stage3_parts
from refine_af_utils.models import load_causal_lm
from refine_af_utils.params import load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "model_configs"


def _tiny(tiny_llama_dir, critic):
    return params_from_dict({"run_name": "plan", "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
                             "rl": {"critic": critic, "lora": {"r": 4, "lora_alpha": 8}}})


@pytest.mark.parametrize("critic", ["full", "lora"])
def test_the_counts_equal_the_loaded_models(tiny_llama_dir, critic):
    from peft import get_peft_model

    from refine_af_utils.models import lora_config
    from refine_af_utils.ppo_critic import build_critic

    params = _tiny(tiny_llama_dir, critic)
    parts = stage3_parts(params, AutoConfig.from_pretrained(tiny_llama_dir))
    base, tokenizer = load_causal_lm(params.model)
    policy = get_peft_model(base, lora_config(params.rl.lora))
    real_critic = build_critic(critic, policy, params.model, tokenizer, None)
    trained_critic = sum(p.numel() for p in real_critic.parameters() if p.requires_grad)
    assert [p.parameters for p in parts[:2]] == [sum(p.numel() for p in policy.parameters() if not p.requires_grad),
                                                 sum(p.numel() for p in policy.parameters() if p.requires_grad)]
    assert parts[2].trained == trained_critic and parts[2].bytes == trained_critic * TRAINING_BYTES_PER_PARAMETER
    assert parts[0].bytes == parts[0].parameters * 4  # float32 backbone


def test_the_recipes_backbones_have_their_public_sizes_and_the_lora_critic_fits_where_the_full_one_cannot():
    recipes = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "mistral-7b": 7_241_732_096}
    for name, size in recipes.items():
        params = load_params(ROOT / "params" / "recipes" / name / "paper.yaml")
        assert params.rl.critic == "lora"
        parts = stage3_parts(params, AutoConfig.from_pretrained(CONFIGS / name))
        assert parts[0].parameters == size and parts[0].bytes == 2 * size  # bfloat16
        assert sum(p.bytes for p in parts) < 30 * 2**30
        full = stage3_parts(load_params(ROOT / "params" / "recipes" / name / "paper.yaml",
                                        {"rl.critic": "full"}), AutoConfig.from_pretrained(CONFIGS / name))
        assert full[2].bytes > 80 * 2**30  # a full critic's training state alone exceeds one 80 GB GPU


def test_the_command_prints_both_critics(capsys):
    main([str(ROOT / "params" / "recipes" / "llama2-7b" / "paper.yaml"), "--config", str(CONFIGS / "llama2-7b")])
    out = capsys.readouterr().out
    assert "critic 'lora'" in out and "critic 'full'" in out and "| 6,738,415,616 |" in out
