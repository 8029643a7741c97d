"""Notebooks: committed clean and thin; the runner executes them with papermill on the smoke params."""

import json

import nbformat
import pandas as pd
import pytest

from refine_af_utils.params import load_params
from refine_af_utils.results import read_metrics
from refine_af_utils.run import NOTEBOOK_DIR, STAGES, main, run_pipeline, select_stages

from conftest import REPO_ROOT

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_every_stage_has_its_notebook():
    assert [p.name for p in NOTEBOOKS] == [s.notebook for s in STAGES]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_clean_and_thin(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} carries outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "params_path" in tagged[0].source and "run_dir" in tagged[0].source
    for cell in code:
        for banned in ("def ", "class ", "lambda", "for ", "while "):
            assert banned not in cell.source, f"{path.name}: logic ({banned.strip()}) belongs in refine_af_utils"
    assert notebook.cells[0].cell_type == "markdown"


def test_stage_selection():
    assert [s.id for s in select_stages()] == [s.id for s in STAGES]
    assert [s.id for s in select_stages(only="01")] == ["01"]
    assert [s.id for s in select_stages(start="01")] == [s.id for s in STAGES][1:]
    with pytest.raises(SystemExit, match="unknown stage"):
        select_stages(only="9")


def test_runner_reports_bad_params_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nnum_instrucions: 3\n")
    assert main([str(bad), "--results-root", str(tmp_path)]) == 2
    assert f"{bad}: unknown key 'num_instrucions'" in capsys.readouterr().err


def test_smoke_pipeline_through_papermill(tmp_path, capsys):
    params_path = REPO_ROOT / "params" / "smoke.yaml"
    params = load_params(params_path)
    run_dir = run_pipeline(params_path, results_root=tmp_path)
    assert run_dir == tmp_path / "smoke"

    seeds = read_metrics(run_dir, "00")
    assert seeds["tasks"] == 36 and seeds["classification tasks"] == 10
    assert (run_dir / "seeds" / "seed_tasks.jsonl").read_text().count("\n") == 36
    assert pd.read_csv(run_dir / "seeds" / "seed_summary.csv").shape == (8, 2)

    stage1 = read_metrics(run_dir, "01")
    assert stage1["instructions"] == params.num_instructions == stage1["count_accepted"]
    lines = (run_dir / "instructions" / "instructions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == params.num_instructions
    assert len({r["instruction"] for r in records}) == len(records)
    assert all(r["max_rouge_l"] <= 0.7 for r in records)
    counts = pd.read_csv(run_dir / "instructions" / "filter_counts.csv")
    assert counts.set_index("stage").loc["accepted", "count"] == params.num_instructions
    for name in ("filter_counts.png", "novelty_rouge_l.png", "instruction_lengths.png", "instructions.csv"):
        assert (run_dir / "instructions" / name).stat().st_size > 0

    reward = read_metrics(run_dir, "02")
    scores = pd.read_csv(run_dir / "reward_analysis" / "scores.csv")
    assert reward["instances"] == len(scores) > 0
    components = ["reward_model", "understandability", "naturalness", "coherence"]
    assert set(components + ["reward", "instruction", "input", "output"]) <= set(scores.columns)
    assert scores[components].apply(lambda c: c.between(0, 1).all()).all()  # the default stand-ins are in [0, 1]
    weights = {"reward_model": 0.0078, "understandability": -0.4421, "naturalness": 0.3212, "coherence": 0.1520}
    recomputed = sum(w * scores[c] for c, w in weights.items())  # the reward is redrawable from the CSV
    assert (recomputed - scores["reward"]).abs().max() < 1e-9
    for name in ("component_histograms.png", "component_correlations.png", "reward_distribution.png",
                 "best_examples.csv", "worst_examples.csv", "reward_by_type.csv", "correlations.csv"):
        assert (run_dir / "reward_analysis" / name).stat().st_size > 0

    rl = pd.read_csv(run_dir / "rl" / "metrics.csv")
    assert list(rl["update"]) == list(range(1, params.rl.updates + 1))
    assert rl[["reward", "kl", "policy_loss", "value_loss"]].notna().all().all()
    assert read_metrics(run_dir, "03")["updates"] == params.rl.updates
    assert (run_dir / "rl" / "adapter" / "adapter_config.json").is_file()
    for name in ("reward_kl.png", "components.png"):
        assert (run_dir / "rl" / name).stat().st_size > 0

    from datasets import load_dataset

    arms = {}
    for arm in ("self_instruct", "refine_af"):
        data = load_dataset("json", data_files=str(run_dir / "data" / f"{arm}.jsonl"), split="train")
        assert {"instruction", "input", "output", "is_classification", "reward", *components} <= set(data.column_names)
        arms[arm] = data
        assert read_metrics(run_dir, "04")[f"{arm}_instances"] == len(data) > 0
    assert set(arms["self_instruct"]["instruction"]) <= {r["instruction"] for r in records}
    statistics = pd.read_csv(run_dir / "data" / "dataset_statistics.csv", index_col=0)
    assert list(statistics.columns) == ["self_instruct", "refine_af"]
    assert statistics.loc["instructions (stage 1)"].tolist() == [params.num_instructions] * 2
    assert (run_dir / "data" / "reward_by_arm.png").stat().st_size > 0

    for stage in STAGES:
        executed = nbformat.read(run_dir / "notebooks" / stage.notebook, as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        assert json.loads((run_dir / "stages" / f"{stage.id}.json").read_text())["seconds"] > 0

    capsys.readouterr()
    run_pipeline(params_path, results_root=tmp_path)  # complete: both stages are skipped
    assert capsys.readouterr().out.count("complete, skipped") == len(STAGES)

    cache_files = sorted((run_dir / "reward_analysis" / "cache").glob("*.jsonl"))
    assert len(cache_files) == 4
    run_pipeline(params_path, only="01", force=True, results_root=tmp_path)  # from scratch, same result
    rerun = [json.loads(line) for line in (run_dir / "instructions" / "instructions.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rerun] == [r["instruction"] for r in records]
