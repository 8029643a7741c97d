"""Both arms exported as Hugging Face dataset folders that ``datasets.load_dataset`` reads back."""

from __future__ import annotations

import json
import shutil

import pytest

from refine_af_utils.export import COLUMNS, main
from refine_af_utils.run_folder import read_metrics


def test_a_folder_that_is_not_a_finished_run_is_refused_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run folder (no params.yaml)" in err


@pytest.mark.slow  # needs the smoke run
def test_the_smoke_run_exports_both_arms_and_they_load_back(smoke_run, tmp_path, capsys):
    from datasets import load_dataset

    smoke_run.require("04")
    run_dir = tmp_path / "smoke"
    shutil.copytree(smoke_run.run_dir, run_dir, ignore=shutil.ignore_patterns(".lock"))
    assert main([str(run_dir)]) == 0
    metrics = read_metrics(run_dir, "04")
    for arm in ("self_instruct", "refine_af"):
        folder = run_dir / "datasets" / arm
        # a cache of its own: a datasets cache shared with other runs must not answer for this folder
        train = load_dataset(str(folder), cache_dir=str(tmp_path / "datasets-cache"))["train"]
        assert train.num_rows == metrics[f"{arm}_instances"] and tuple(train.column_names) == COLUMNS
        card = (folder / "README.md").read_text()
        assert f"- {train.num_rows} instances of" in card and "seed tasks' licence: Apache-2.0" in card
        kept = [json.loads(line) for line in (run_dir / "instance_generation" / f"{arm}.jsonl").read_text().splitlines()]
        assert [row["output"] for row in train] == [row["output"] for row in kept]
    (run_dir / "instance_generation" / "refine_af.jsonl").write_text("")  # an edited stage 4 output
    assert main([str(run_dir)]) == 2
    assert "stage 04 is not complete (its outputs changed since it ran" in capsys.readouterr().err
