import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest
import yaml

from refine_af_utils.params import (Params, ParamsError, deep_merge, load_params, params_from_dict, params_yaml,
                                    parse_overrides)

from conftest import REPO_ROOT

PARAMS_DIR = REPO_ROOT / "params"
# params/*.yaml (default, smoke) and params/recipes/<model>/<recipe>.yaml, as in alignment-handbook's recipes/;
# accelerate configs live apart in params/accelerate_configs/ and study specs in params/studies/
PARAMS_FILES = sorted([*PARAMS_DIR.glob("*.yaml"), *PARAMS_DIR.glob("recipes/*/*.yaml")])
PAPER_RECIPES = ("recipes/llama2-7b/paper", "recipes/llama2-13b/paper", "recipes/mistral-7b/paper")


def test_every_shipped_params_file_loads():
    names = {p.relative_to(PARAMS_DIR).as_posix() for p in PARAMS_FILES}
    assert {"default.yaml", "smoke.yaml", *(f"{name}.yaml" for name in PAPER_RECIPES),
            "recipes/llama31-8b/paper.yaml", "recipes/qwen25-7b/paper.yaml", "recipes/gemma2-9b/paper.yaml"} <= names
    assert (PARAMS_DIR / "accelerate_configs" / "multi_gpu.yaml").is_file()
    assert not list(PARAMS_DIR.glob("paper_*.yaml")) and not list(PARAMS_DIR.glob("accelerate*.yaml"))
    for path in PARAMS_FILES:
        params = load_params(path)
        # params/recipes/llama2-7b/paper.yaml has run_name paper_llama2_7b (results/paper_llama2_7b/)
        expected = path.stem if path.parent == PARAMS_DIR else f"{path.stem}_{path.parent.name.replace('-', '_')}"
        assert params.run_name == expected


def test_paper_recipes_use_self_instruct_seeds_and_15000_instructions():
    for name in PAPER_RECIPES:
        params = load_params(PARAMS_DIR / f"{name}.yaml")
        assert params.num_instructions == 15000
        assert "yizhongw/self-instruct/0b26ccaa415992100fa32df62d41b994cf928e23" in params.seed_tasks
        assert params.model.device == "cuda"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("run_name: x\nnum_instrucions: 5\n", "unknown key 'num_instrucions'"),
        ("run_name: x\ninstruction_generation:\n  tempature: 0.5\n", "unknown key 'instruction_generation.tempature'"),
        ("run_name: x\nnum_instructions: many\n", "key 'num_instructions' must be int"),
        ("run_name: x\nnum_instructions: 2.5\n", "key 'num_instructions' must be int"),
        ("run_name: x\nnum_instructions: true\n", "key 'num_instructions' must be int"),
        ("run_name: x\nmodel:\n  trust_remote_code: 'yes'\n", "key 'model.trust_remote_code' must be bool"),
        ("run_name: x\nmodel:\n  dtype: float64\n", "key 'model.dtype' must be one of"),
        ("run_name: x\nmodel: cpu\n", "key 'model' must be ModelParams"),
        ("num_instructions: 5\n", "required key 'run_name' is missing"),
        ("run_name: x\nnum_instructions: 0\n", "key 'num_instructions' must be positive"),
        ("run_name: x\ninstruction_generation:\n  top_p: 1.5\n", "key 'instruction_generation.top_p'"),
        ("run_name: x\ninstruction_generation:\n  num_machine_in_prompt: 8\n", "num_machine_in_prompt"),
        ("run_name: a/b\n", "key 'run_name'"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("run_name: [unclosed\n", "not valid YAML"),
        ("run_name: x\nsft:\n  lora:\n    target_modules: 3\n", "key 'sft.lora.target_modules' must be str or a list of str"),
        ("run_name: x\nsft:\n  epochs: 0\n", "key 'sft.epochs' must be positive"),
        ("run_name: x\nevaluation:\n  max_instances: 0\n", "key 'evaluation.max_instances' must be positive"),
        ("run_name: x\nevaluation:\n  superni_dir: 7\n", "key 'evaluation.superni_dir' must be str"),
    ],
)
def test_bad_params_name_the_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_ints_widen_to_floats_and_overrides_apply(tmp_path):
    params = load_params(_write(tmp_path, "run_name: x\ninstruction_generation:\n  temperature: 1\n"),
                         overrides={"num_instructions": 7, "model.device": "cuda"})
    assert params.instruction_generation.temperature == 1.0
    assert isinstance(params.instruction_generation.temperature, float)
    assert params.num_instructions == 7 and params.model.device == "cuda"


def test_fingerprint_changes_with_any_value(tmp_path):
    a = load_params(_write(tmp_path, "run_name: x\n"))
    b = load_params(_write(tmp_path, "run_name: x\nnum_instructions: 101\n"))
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint("model") == b.fingerprint("model")


def test_a_key_added_later_leaves_earlier_fingerprints_until_it_is_set(tmp_path):
    import hashlib

    from refine_af_utils.params import ADDED_KEYS

    # Some defaults changed when their keys were added (rl.critic: lora, ...): a run made before them is one with
    # every added key at the value that behaves as before
    a = load_params(_write(tmp_path, "run_name: x\n"), overrides=dict(ADDED_KEYS))
    before = a.to_dict()  # the params as a run made before the keys existed hashed them
    for dotted in ADDED_KEYS:
        section, key = dotted.split(".")
        del before[section][key]
    old = hashlib.sha256(json.dumps({"rl": before["rl"]}, sort_keys=True).encode()).hexdigest()[:16]
    assert a.fingerprint("rl") == old
    earlier = {section: hashlib.sha256(json.dumps({section: before[section]}, sort_keys=True).encode()).hexdigest()[:16]
               for section in ("rl", "sft", "model")}
    assert a.fingerprint("sft") == earlier["sft"] and a.fingerprint("model") == earlier["model"]
    for dotted, changed_value in {"rl.standardise_reward": True, "rl.stop_at_stop_strings": True, "rl.placebo": True,
                                  "rl.critic": "lora", "rl.micro_batch_size": 2, "rl.scale_rewards": "batch",
                                  "rl.activation_checkpointing": False,
                                  "sft.external_arms": {"paper45k": "data.jsonl"}, "model.engine": "vllm"}.items():
        changed = load_params(_write(tmp_path, "run_name: x\n"), overrides={**ADDED_KEYS, dotted: changed_value})
        section = dotted.split(".")[0]
        assert changed.fingerprint(section) != earlier[section], dotted
    assert load_params(_write(tmp_path, "run_name: x\n")).fingerprint("rl") != old  # today's defaults differ
    assert set(ADDED_KEYS) == {"rl.standardise_reward", "rl.stop_at_stop_strings", "rl.placebo", "rl.critic",
                               "rl.micro_batch_size", "rl.scale_rewards", "rl.activation_checkpointing",
                               "sft.external_arms", "model.engine"}


def test_a_micro_batch_must_divide_the_batch(tmp_path):
    with pytest.raises(ParamsError, match=r"key 'rl.micro_batch_size' must be a positive divisor of rl.batch_size \(4\), got 3"):
        load_params(_write(tmp_path, "run_name: x\n"), overrides={"rl.micro_batch_size": 3})
    assert load_params(_write(tmp_path, "run_name: x\n"), overrides={"rl.micro_batch_size": 2}).rl.micro_batch_size == 2


# --- recipes as deltas: extends, --set, defaults (issue 11 item 4) --------------------------------

RESOLVED = json.loads((REPO_ROOT / "tests" / "fixtures" / "recipes_resolved.json").read_text())


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_recipes_resolve_to_what_they_were_before_they_became_deltas(name):
    """The fixture holds each recipe's params as they were when every recipe was a complete file."""
    assert load_params(REPO_ROOT / "params" / f"{name}.yaml").to_dict() == RESOLVED[name]


@pytest.mark.parametrize("name", ["smoke", *PAPER_RECIPES])
def test_recipes_are_short_deltas(name):
    path = REPO_ROOT / "params" / f"{name}.yaml"
    assert len(path.read_text().splitlines()) < 40
    assert "extends" in yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name", sorted(RESOLVED) + ["default"])
def test_resolved_params_yaml_reads_back_equal(tmp_path, name):
    params = load_params(REPO_ROOT / "params" / f"{name}.yaml")
    path = tmp_path / "params.yaml"
    path.write_text(params_yaml(params, "resolved\nfrom a test"))
    assert load_params(path) == params
    assert "extends" not in yaml.safe_load(path.read_text())


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Params) if f.name != "run_name"])
def test_the_schema_has_no_silent_defaults_that_differ_from_default_yaml(section):
    schema = params_from_dict({"run_name": "default"}).to_dict()
    assert schema[section] == load_params(REPO_ROOT / "params" / "default.yaml").to_dict()[section]


def test_the_paper_scorers_are_one_call_away():
    from refine_af_utils.params import PAPER_WEIGHTS, RewardParams, paper_reward_params
    from refine_af_utils.prompts import OASST_TEMPLATE, UNIEVAL_QUESTIONS

    paper = paper_reward_params()
    assert (paper.reward_model.kind, paper.reward_model.model, paper.reward_model.template) == (
        "sequence_classification", "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5", OASST_TEMPLATE)
    assert paper.coherence.template == UNIEVAL_QUESTIONS["coherence"] and paper.coherence.model == "MingZhong/unieval-dialog"
    for reward in (paper, RewardParams()):  # the paper's and the offline stand-ins' share Eq. 1's weights
        assert {c: getattr(reward, c).weight for c in PAPER_WEIGHTS} == PAPER_WEIGHTS and reward.intercept == 0.0


def test_extends_merges_mappings_and_replaces_other_values(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "parent.yaml").write_text(
        "run_name: parent\nnum_instructions: 5\nmodel:\n  device: cuda\n  dtype: bfloat16\n"
        "rl:\n  lora: {r: 4, target_modules: [q_proj, k_proj, v_proj]}\n  kl_coef: 0.2\n")
    child = _write(tmp_path, "extends: base/parent.yaml\nrun_name: child\nmodel:\n  device: cpu\n"
                             "rl:\n  lora: {target_modules: [o_proj]}\n")
    params = load_params(child)
    assert params.run_name == "child" and params.num_instructions == 5
    assert (params.model.device, params.model.dtype) == ("cpu", "bfloat16")
    assert params.rl.lora.target_modules == ["o_proj"] and params.rl.lora.r == 4 and params.rl.kl_coef == 0.2
    grandchild = tmp_path / "g.yaml"
    grandchild.write_text("extends: p.yaml\nnum_instructions: 9\n")  # a chain, each path relative to its file
    assert (load_params(grandchild).run_name, load_params(grandchild).num_instructions) == ("child", 9)


def test_deep_merge_does_not_modify_its_inputs():
    base, delta = {"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}
    assert deep_merge(base, delta) == {"a": {"b": 1, "c": [2]}}
    assert base == {"a": {"b": 1, "c": [1]}} and delta == {"a": {"c": [2]}}


def test_extends_cycles_and_bad_parents_are_refused_in_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nrun_name: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nrun_name: b\n")
    with pytest.raises(ParamsError, match=r"'extends' makes a cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)") as error:
        load_params(tmp_path / "a.yaml")
    assert "\n" not in str(error.value)
    (tmp_path / "self.yaml").write_text("extends: self.yaml\nrun_name: s\n")
    with pytest.raises(ParamsError, match="cycle"):
        load_params(tmp_path / "self.yaml")
    with pytest.raises(ParamsError, match=r"key 'extends': .*missing\.yaml: params file not found"):
        load_params(_write(tmp_path, "extends: missing.yaml\nrun_name: x\n"))
    with pytest.raises(ParamsError, match="key 'extends' must be the path of a params file"):
        load_params(_write(tmp_path, "extends: [a.yaml]\nrun_name: x\n"))
    (tmp_path / "bad.yaml").write_text("run_name: [unclosed\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml:2: not valid YAML \(while parsing a flow sequence \(line 1\)"):  # the parent's own file and line
        load_params(_write(tmp_path, "extends: bad.yaml\n"))


def test_set_values_are_parsed_by_yaml_and_typed_by_the_schema(tmp_path):
    overrides = parse_overrides(["evaluation.max_new_tokens=64", "model.device=cuda", "rl.kl_coef=1",
                                 "rl.lora.target_modules=[q_proj, v_proj]", "instruction_generation.max_batches=null",
                                 "seed_tasks=a=b"])
    assert overrides == {"evaluation.max_new_tokens": 64, "model.device": "cuda", "rl.kl_coef": 1,
                         "rl.lora.target_modules": ["q_proj", "v_proj"], "instruction_generation.max_batches": None,
                         "seed_tasks": "a=b"}
    params = load_params(REPO_ROOT / "params" / "smoke.yaml", overrides=overrides)
    assert params.evaluation.max_new_tokens == 64 and params.rl.kl_coef == 1.0 and isinstance(params.rl.kl_coef, float)
    assert params.instruction_generation.max_batches is None and params.seed_tasks == "a=b"
    assert params.rl.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("item, message", [
    ("evaluation.max_new_tokes=3", "unknown key 'evaluation.max_new_tokes'"),
    ("evaluatio.max_new_tokens=3", "unknown key 'evaluatio'"),
    ("run_name.x=3", "key 'run_name' is a value, not a section: cannot set 'run_name.x'"),
    ("evaluation.max_new_tokens=many", "key 'evaluation.max_new_tokens' must be int, got 'many'"),
    ("evaluation.max_new_tokens=0", "key 'evaluation.max_new_tokens' must be positive"),
    ("rl.kl_coef=.nan", "key 'rl.kl_coef' must be a finite number"),
    ("rl.kl_coef=-1", "key 'rl.kl_coef' must be at least 0"),
])
def test_bad_set_keys_and_values_get_the_schema_messages(item, message):
    path = REPO_ROOT / "params" / "smoke.yaml"
    with pytest.raises(ParamsError) as error:
        load_params(path, overrides=parse_overrides([item]))
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith("--set "), "the error names --set, where the key came from, not the file"


def test_an_error_in_the_file_still_names_the_file_when_set_is_given(tmp_path):
    path = _write(tmp_path, "extends: " + str(REPO_ROOT / "params" / "smoke.yaml") + "\nrl:\n  kl_coef: -1\n")
    with pytest.raises(ParamsError) as error:
        load_params(path, overrides=parse_overrides(["evaluation.max_new_tokens=8"]))
    assert str(error.value).startswith(f"{path}: key 'rl.kl_coef' must be at least 0")


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("5E3", 5000.0), ("-2.5e+3", -2500.0), (".5", 0.5),
                                         ("1.", 1.0), ("12", 12), ("1_000", 1000), ("0x10", 16), ("1e", "1e")])
def test_numbers_are_read_as_yaml_1_2_in_files_and_set(tmp_path, text, value):
    """``1e-4`` is a float (YAML 1.2), not the string PyYAML's YAML 1.1 makes of it; integers stay ints."""
    from refine_af_utils.params_loading import load_yaml_text

    parsed = load_yaml_text(text)
    assert parsed == value and type(parsed) is type(value)
    assert parse_overrides([f"rl.learning_rate={text}"]) == {"rl.learning_rate": value}
    path = _write(tmp_path, "extends: " + str(REPO_ROOT / "params" / "smoke.yaml") + f"\nrl:\n  learning_rate: {text}\n")
    if isinstance(value, (int, float)) and value > 0:  # a learning rate must be positive
        assert load_params(path).rl.learning_rate == float(value)
        assert load_params(REPO_ROOT / "params" / "smoke.yaml",
                           overrides=parse_overrides([f"rl.learning_rate={text}"])).rl.learning_rate == float(value)


@pytest.mark.parametrize("item", ["evaluation.max_new_tokens", "=3", "a..b=3", "x=[unclosed"])
def test_malformed_set_items_are_refused(item):
    with pytest.raises(ParamsError, match="--set"):
        parse_overrides([item])


def test_params_paths_named_in_the_docs_exist():
    """Every ``params/....yaml`` that README.md, docs/*.md and the params files' comments name is there."""
    sources = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), *sorted(PARAMS_DIR.rglob("*.yaml"))]
    named = {(source.name, match) for source in sources
             for match in re.findall(r"params/[\w./-]+\.yaml", source.read_text())}
    assert any(path == "params/recipes/llama2-7b/paper.yaml" for _, path in named)
    assert [(source, path) for source, path in sorted(named) if not (REPO_ROOT / path).is_file()] == []


def test_trainer_args_pass_through_to_trl_and_refuse_what_the_package_sets(tmp_path):
    """``rl.trainer_args`` / ``sft.trainer_args``: any other trl config field, checked against trl's own class."""
    import torch

    from refine_af_utils.trl_bridge import (GRPO_CONFIG_OWNED, PPO_CONFIG_OWNED, RL_CONFIG_OWNED, SFT_CONFIG_OWNED,
                                            trl_config_class)
    from refine_af_utils.trl_bridge import _rl_common_args, sft_config_args

    smoke = REPO_ROOT / "params" / "smoke.yaml"
    params = load_params(smoke, overrides={"sft.trainer_args.weight_decay": 0.01, "sft.trainer_args.report_to": ["none"],
                                           "rl.trainer_args": {"cliprange": 0.1, "vf_coef": 0.5}})
    args = sft_config_args(params.sft, tmp_path, 7, "cpu", torch.float32)
    assert (args["weight_decay"], args["report_to"], args["seed"], args["num_train_epochs"]) == (0.01, ["none"], 7, 1.0)
    assert set(args) - {"report_to", "disable_tqdm", "weight_decay"} <= set(SFT_CONFIG_OWNED)  # the package's own fields
    trl_config_class("sft")(**args)  # trl accepts them
    assert _rl_common_args(params, tmp_path, 7, torch.float32, {"total_episodes": 4})["cliprange"] == 0.1
    rl_fields = set().union(*({f.name for f in dataclasses.fields(trl_config_class("rl", a))} for a in ("ppo", "grpo", "rloo")))
    assert set(RL_CONFIG_OWNED) | set(PPO_CONFIG_OWNED) | set(GRPO_CONFIG_OWNED) <= rl_fields  # no typo in the refused names
    assert set(SFT_CONFIG_OWNED) <= {f.name for f in dataclasses.fields(trl_config_class("sft"))}
    grpo = {"rl.algorithm": "grpo", "instance_generation.top_p": 0.9}
    from refine_af_utils.trl_bridge import group_config_args, ppo_config_args

    for algorithm, build in (("ppo", ppo_config_args), ("grpo", group_config_args), ("rloo", group_config_args)):
        chosen = params if algorithm == "ppo" else load_params(smoke, overrides={**grpo, "rl.algorithm": algorithm})
        rl_args = build(chosen, tmp_path, 7, 2, torch.float32)
        owned = {**RL_CONFIG_OWNED, **(GRPO_CONFIG_OWNED if algorithm == "grpo" else {})}
        assert set(rl_args) - {"report_to", "disable_tqdm"} - set(chosen.rl.trainer_args) <= set(owned), algorithm
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # no deprecated alias (gradient_checkpointing) reaches trl
            trl_config_class("rl", algorithm)(**rl_args)  # trl accepts what stage 3 passes
    assert load_params(smoke, overrides={**grpo, "rl.trainer_args.max_grad_norm": 0.5}).rl.trainer_args == {"max_grad_norm": 0.5}

    for overrides, message in [
        ({"sft.trainer_args.learning_rate": 1e-3},
         r"^--set sft\.trainer_args\.learning_rate=0\.001 \(over \S*smoke\.yaml\): key 'sft\.trainer_args\.learning_rate' is set by the package from sft\.learning_rate; set that instead"),
        ({"sft.trainer_args.max_steps": 3}, r"key 'sft\.trainer_args\.max_steps' is set by the package from sft\.epochs"),
        ({"rl.trainer_args.warmup_stepz": 3}, r"key 'rl\.trainer_args\.warmup_stepz' is not a field of trl's PPOConfig"),
        ({**grpo, "rl.trainer_args.beta": 0.1}, r"key 'rl\.trainer_args\.beta' is set by the package from rl\.kl_coef"),
        ({"rl.trainer_args.max_grad_norm": 0.5}, r"key 'rl\.trainer_args\.max_grad_norm' is set by the package from "
                                                 r"stage 3's own AdamW for PPO"),
        ({**grpo, "rl.trainer_args.top_k": 5}, r"'rl\.trainer_args\.top_k' is set by the package from instance_generation"),
        ({"sft.trainer_args": 3}, r"key 'sft\.trainer_args' must be a mapping of names to values, got 3"),
        ({"rl.trainer_args.report_to": ["wandb"]},  # a tracker that is not installed: at load, not at the trainer
         r"key 'rl\.trainer_args\.report_to' names 'wandb', which is not installed here: pip install wandb"),
        ({"sft.trainer_args.lr_scheduler_type": "cosinee"}, r"key 'sft\.trainer_args' is refused by trl's SFTConfig: .*cosinee"),
        (parse_overrides(["sft.trainer_args.run_name=2024-01-01"]), r"key 'sft\.trainer_args' must hold plain values"),
    ]:
        with pytest.raises(ParamsError, match=message) as error:
            load_params(smoke, overrides=overrides)
        assert "\n" not in str(error.value)


def test_a_lora_section_given_in_part_keeps_its_own_stages_defaults():
    params = params_from_dict({"run_name": "x", "rl": {"lora": {"r": 8}}, "sft": {"lora": {"r": 4}}})
    assert (params.rl.lora.r, params.rl.lora.lora_dropout, params.rl.lora.target_modules) == \
        (8, 0.0, "all-linear")
    assert (params.sft.lora.r, params.sft.lora.lora_dropout, params.sft.lora.target_modules) == (4, 0.05, "all-linear")


def test_ranges_belong_to_fields_not_to_field_names():
    """A field is range-checked only when its own metadata says so, whatever its name."""
    from refine_af_utils.params_validation import build, check_ranges, positive

    @dataclasses.dataclass
    class Unchecked:
        batch_size: int = 8  # the name of ranged fields elsewhere, but no range of its own

    @dataclasses.dataclass
    class Checked:
        batch_size: int = positive(8)
        novel_size: int = positive(8)  # a name no other section has: checked all the same

    assert build(Unchecked, {"batch_size": 0}, "t.yaml").batch_size == 0
    check_ranges(Unchecked(batch_size=-1), "t.yaml")
    for key in ("batch_size", "novel_size"):
        with pytest.raises(ParamsError, match=rf"^t\.yaml: key 'sec\.{key}' must be positive, got 0$"):
            build(Checked, {key: 0}, "t.yaml", "sec.")
        with pytest.raises(ParamsError, match=rf"^t\.yaml: key '{key}' must be positive, got -1$"):
            check_ranges(Checked(**{key: -1}), "t.yaml")
    assert build(Checked, {"batch_size": 1, "novel_size": 2}, "t.yaml") == Checked(1, 2)
