"""sft.external_arms: a dataset from outside the pipeline as an extra SFT arm, read, checked and equalised."""

from __future__ import annotations

import json
import shutil

import pytest

from refine_af_utils.errors import ParamsError
from refine_af_utils.external_arms import ExternalArmError, load_external_arm
from refine_af_utils.files import append_jsonl
from refine_af_utils.layout import RunLayout
from refine_af_utils.params import load_params
from refine_af_utils.stages.sft import training_sets

from conftest import REPO_ROOT

SMOKE = REPO_ROOT / "params" / "smoke.yaml"
RECORDS = [{"instruction": f"Say {n}.", "input": "" if n % 2 else f"n = {n}", "output": str(n)} for n in range(10)]


def test_a_jsonl_file_and_a_dataset_folder_are_read_and_checked(tmp_path):
    source = tmp_path / "paper45k.jsonl"
    source.write_text("".join(json.dumps({k: v for k, v in r.items() if v != ""}) + "\n" for r in RECORDS))
    assert load_external_arm("paper45k", str(source)) == RECORDS  # an absent input is the empty input
    folder = tmp_path / "exported"  # the layout python -m refine_af_utils.export writes
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text(source.read_text())
    assert load_external_arm("exported", str(folder)) == RECORDS


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "Say 1.", "output": ""}', r"bad\.jsonl:2: key 'output' must be a non-empty string, got ''"),
    ('{"instruction": 3, "output": "x"}', r"bad\.jsonl:2: key 'instruction' must be a non-empty string, got 3"),
    ('{"instruction": "a", "input": 5, "output": "x"}', r"bad\.jsonl:2: key 'input' must be a string, got 5"),
    ('not json', r"bad\.jsonl:2: not a JSON record"),
    ('[1, 2]', r"bad\.jsonl:2: a record must be a mapping, got list"),
])
def test_a_bad_record_is_one_line_naming_the_file_line_and_key(tmp_path, line, message):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(ExternalArmError, match=message) as error:
        load_external_arm("bad", str(source))
    assert "\n" not in str(error.value)


def test_the_reserved_names_are_the_pipelines_models():
    from refine_af_utils.external_arms import RESERVED_NAMES
    from refine_af_utils.layout import MODELS

    assert RESERVED_NAMES == MODELS


@pytest.mark.parametrize("arms, message", [
    ({"refine_af": "x.jsonl"}, r"key 'sft\.external_arms\.refine_af': an arm's name must match"),
    ({"Paper-45K": "x.jsonl"}, r"key 'sft\.external_arms\.Paper-45K': an arm's name must match"),
    ({"paper": ""}, r"key 'sft\.external_arms\.paper' must be a path or hub id"),
])
def test_arm_names_that_would_clash_are_refused_when_the_params_load(arms, message):
    with pytest.raises(ParamsError, match=message):
        load_params(SMOKE, overrides={"sft.external_arms": arms})


def test_an_external_arm_is_equalised_like_the_arms_seeded_and_without_seed_tasks(tmp_path):
    layout = RunLayout(tmp_path)
    for arm, size in (("self_instruct", 4), ("refine_af", 6)):
        append_jsonl(layout.arm_data(arm), RECORDS[:size])
    source = tmp_path / "paper45k.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    params = load_params(SMOKE, overrides={"sft.external_arms": {"paper45k": str(source)}, "sft.equal_examples": True})
    sets = training_sets(params, tmp_path)
    assert list(sets) == ["self_instruct", "refine_af", "paper45k"]
    assert [len(records) for records in sets.values()] == [4, 4, 4]  # the smaller arm's size
    assert all(record in RECORDS for record in sets["paper45k"])
    assert training_sets(params, tmp_path)["paper45k"] == sets["paper45k"]  # seeded: the same on a rerun


@pytest.mark.slow  # the smoke run's stages 5-7 again, through the runner, with the exported REFINE-AF arm
def test_the_runner_fine_tunes_and_evaluates_an_external_arm(smoke_run, tmp_path, capsys):
    from refine_af_utils.export import main as export
    from refine_af_utils.run import main as run
    from refine_af_utils.run_folder import read_metrics

    smoke_run.require("07")
    results = tmp_path / "results"
    shutil.copytree(smoke_run.run_dir, results / "smoke", ignore=shutil.ignore_patterns(".lock"))
    assert export([str(results / "smoke"), "--output", str(tmp_path / "exported")]) == 0
    assert run([str(SMOKE), "--results-root", str(results), "--in-place", "--from", "05",
                "--set", f"sft.external_arms={{again: {tmp_path / 'exported' / 'refine_af'}}}"]) == 0
    run_dir = results / "smoke"
    assert (RunLayout(run_dir).sft_model("again") / "adapter_config.json").is_file()
    stage6 = read_metrics(run_dir, "06")
    assert 0 <= stage6["again_rougeL"] <= 100 and stage6["wins"] + stage6["ties"] + stage6["losses"] == stage6["tasks"]
    main = (run_dir / "table_main.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in main[1:]] == ["base", "self_instruct", "refine_af", "again",
                                                         "refine_af - self_instruct"]
