from pathlib import Path

import pytest

from refine_af_utils.params import ParamsError, load_params

from conftest import REPO_ROOT

PARAMS_FILES = sorted((REPO_ROOT / "params").glob("*.yaml"))


def test_every_shipped_params_file_loads():
    names = {p.name for p in PARAMS_FILES}
    assert {"default.yaml", "smoke.yaml", "paper_llama2_7b.yaml", "paper_llama2_13b.yaml",
            "paper_mistral_7b.yaml"} <= names
    for path in PARAMS_FILES:
        if path.name.startswith("accelerate"):
            continue
        params = load_params(path)
        assert params.run_name == path.stem


def test_paper_recipes_use_self_instruct_seeds_and_15000_instructions():
    for name in ("paper_llama2_7b", "paper_llama2_13b", "paper_mistral_7b"):
        params = load_params(REPO_ROOT / "params" / f"{name}.yaml")
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
        ("run_name: x\nsft:\n  lora_target_modules: 3\n", "key 'sft.lora_target_modules' must be str or a list of str"),
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
