"""The plan before stage 1 (refine_af_utils.memory_plan, ``run --plan``): counts on the meta device equal the real
models', the KV-cache rule equals a real cache, the recipes' backbones have their public sizes, the 7B recipes fit
one 80 GB GPU in every stage, and a stage that does not fit is refused naming the key to change."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from refine_af_utils.memory_plan import TRAINING_BYTES_PER_PARAMETER, kv_cache_bytes, main, plan, stage3_parts
from refine_af_utils.models import load_causal_lm
from refine_af_utils.params import load_params, params_from_dict
from refine_af_utils.run import main as run_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "model_configs"
RECIPES = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "mistral-7b": 7_241_732_096,
           "llama31-8b": 8_030_261_248, "qwen25-7b": 7_615_616_512, "gemma2-9b": 9_241_705_984}  # public sizes
# The paper scorers' configs cannot be loaded offline: the plan notes them as not counted.
OFFLINE_SCORERS = {"OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5": None, "MingZhong/unieval-dialog": None}


def _recipe(name, **overrides):
    return load_params(ROOT / "params" / "recipes" / name / "paper.yaml", overrides)


def _configs(name):
    params = _recipe(name)
    return {params.model.name_or_path: AutoConfig.from_pretrained(CONFIGS / name), **OFFLINE_SCORERS}


def _tiny(tiny_llama_dir, critic):
    return params_from_dict({"run_name": "plan", "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
                             "rl": {"algorithm": "ppo", "critic": critic, "lora": {"r": 4, "lora_alpha": 8}}})


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


def test_the_kv_cache_rule_equals_a_real_cache(tiny_llama_dir):
    model, tokenizer = load_causal_lm(_tiny(tiny_llama_dir, "lora").model)
    ids = torch.randint(5, 100, (3, 17))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    layers = [cache.layers[i] for i in range(len(cache.layers))]
    real = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(model.config, 3, 17, torch.float32) == real


@pytest.mark.slow  # the 7-13B models built on the meta device: several seconds each
def test_the_recipes_backbones_have_their_public_sizes_and_the_lora_critic_fits_where_the_full_one_cannot():
    for name, size in RECIPES.items():
        params = _recipe(name)
        assert params.rl.critic == "lora"
        parts = stage3_parts(params, AutoConfig.from_pretrained(CONFIGS / name))
        assert parts[0].parameters == size and parts[0].bytes == 2 * size  # bfloat16
        assert parts[2].name.startswith("critic: LoRA") and parts[2].bytes < 2**30  # its training state: under 1 GiB
        full = stage3_parts(_recipe(name, **{"rl.critic": "full"}), AutoConfig.from_pretrained(CONFIGS / name))
        assert full[2].bytes > 80 * 2**30  # a full critic's training state alone exceeds one 80 GB GPU


@pytest.mark.slow  # the 7-13B models built on the meta device: several seconds each
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_stage_of_every_recipe_fits_one_80_gb_gpu(name):
    from refine_af_utils.memory_plan import USABLE_SHARE

    plans = plan(_recipe(name), _configs(name))
    assert [p.stage[:2] for p in plans] == ["01", "02", "03", "04", "05", "06"]
    assert all(p.total <= USABLE_SHARE * 80 * 2**30 for p in plans), [(p.stage, p.total / 2**30) for p in plans]
    assert any("not counted" in note for p in plans for note in p.notes)  # the offline scorers are said so


@pytest.mark.slow  # the 7-13B models built on the meta device: several seconds each
def test_a_stage_that_does_not_fit_is_refused_naming_the_key(tmp_path, capsys):
    from refine_af_utils.memory_plan import plan_report

    plans = plan(_recipe("llama2-13b", **{"instruction_generation.batch_size": 64}), _configs("llama2-13b"))
    _, refused = plan_report(plans, 80 * 2**30, "80 GiB")
    assert [(p.stage, p.key_to_change()) for p in refused] == [("01 instruction generation",
                                                                "instruction_generation.batch_size")]
    plans = plan(_recipe("llama2-7b", **{"rl.critic": "full"}), _configs("llama2-7b"))
    _, refused = plan_report(plans, 80 * 2**30, "80 GiB")
    assert [(p.stage, p.key_to_change()) for p in refused] == [("03 RL training", "rl.critic")]


@pytest.mark.slow  # the 7-13B models built on the meta device: several seconds each
def test_the_runner_plans_without_running_and_exits_2_on_a_stage_that_does_not_fit(tmp_path, tiny_llama_dir, capsys):
    recipe = ROOT / "params" / "recipes" / "llama2-7b" / "paper.yaml"
    scorers = [f"{name}={tiny_llama_dir}" for name in OFFLINE_SCORERS]  # any config: this test is about the runner
    args = [str(recipe), "--plan", "--results-root", str(tmp_path / "results"),
            "--config", str(CONFIGS / "llama2-7b"), *[a for s in scorers for a in ("--config", s)]]
    assert run_main([*args, "--gpu-memory", "80"]) == 0
    out = capsys.readouterr()
    assert "| 03 RL training |" in out.out and "| 6,738,415,616 |" in out.out and not out.err
    assert run_main([*args, "--gpu-memory", "40", "--set", "rl.critic=full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("stage 03 RL training needs" in line and "change 'rl.critic'" in line for line in err)
    assert any("change 'instruction_generation.batch_size'" in line for line in err)
    assert not (tmp_path / "results").exists()  # a plan runs nothing and writes nothing
    assert main([str(recipe), "--gpu-memory", "80", "--config", str(CONFIGS / "llama2-7b"),
                 *[a for s in scorers for a in ("--config", s)]]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted([*(ROOT / "params").glob("*.yaml"), *(ROOT / "params").glob("recipes/*/*.yaml")]),
                         ids=lambda p: p.relative_to(ROOT / "params").as_posix())
def test_the_plan_runs_for_every_shipped_params_file(path):
    params = load_params(path)
    folder = path.parent.name
    configs = {**OFFLINE_SCORERS}
    if (CONFIGS / folder).is_dir():  # a paper recipe: its backbone's config from the fixtures
        configs[params.model.name_or_path] = AutoConfig.from_pretrained(CONFIGS / folder)
    plans = plan(params, configs)
    assert [p.stage[:2] for p in plans] == ["01", "02", "03", "04", "05", "06"] and all(p.total > 0 for p in plans)
    if params.model.name_or_path.startswith("embedded:"):  # the embedded 135M model: a few GiB in every stage
        assert all(p.total < 16 * 2**30 for p in plans)
