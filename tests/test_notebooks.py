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


@pytest.mark.slow
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
    assert rl[["reward", "parsed_share", "unparsed_reward", "kl", "kl_penalty", "policy_loss", "value_loss"]
              ].notna().all().all()
    stage3 = read_metrics(run_dir, "03")
    assert stage3["updates"] == params.rl.updates
    assert (run_dir / "rl" / "adapter" / "adapter_config.json").is_file()
    for name in ("reward_kl.png", "components.png", "heldout_gain.png"):
        assert (run_dir / "rl" / name).stat().st_size > 0
    split = pd.read_json(run_dir / "rl" / "prompts.jsonl", lines=True)
    heldout = pd.read_csv(run_dir / "rl" / "heldout_eval.csv")
    assert sorted(heldout["instruction"]) == sorted(split.loc[split["split"] == "heldout", "instruction"])
    assert len(heldout) == params.rl.heldout_instructions == stage3["heldout_instructions"]
    assert stage3["heldout_reward_gain"] == pytest.approx((heldout["trained_reward"] - heldout["base_reward"]).mean())
    assert stage3["heldout_reward_gain_ci_low"] <= stage3["heldout_reward_gain"] <= stage3["heldout_reward_gain_ci_high"]

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
    comparison = pd.read_csv(run_dir / "data" / "arm_comparison.csv")
    assert set(comparison["group"]) == {"all", "rl-train", "held-out"}
    assert set(comparison["measure"]) == {"has_instances", "reward", "content"}
    per_instruction = pd.read_csv(run_dir / "data" / "per_instruction.csv")
    assert len(per_instruction) == params.num_instructions
    for arm in ("self_instruct", "refine_af"):
        assert per_instruction[f"{arm}_has_instances"].sum() == len(set(arms[arm]["instruction"]))

    sft = pd.read_csv(run_dir / "sft" / "loss.csv")
    assert set(sft["arm"]) == {"self_instruct", "refine_af"} and sft["loss"].notna().all()
    for arm in ("self_instruct", "refine_af"):
        assert (run_dir / "sft" / arm / "model" / "adapter_config.json").is_file()
        assert (run_dir / "sft" / arm / "complete").is_file()
    assert read_metrics(run_dir, "05")["refine_af_steps"] == sft[sft["arm"] == "refine_af"]["step"].max()
    assert (run_dir / "sft" / "loss.png").stat().st_size > 0
    summary = pd.read_csv(run_dir / "sft" / "summary.csv", index_col=0)
    assert summary.loc["training examples", "self_instruct"] == summary.loc["training examples", "refine_af"] == min(
        len(arms["self_instruct"]), len(arms["refine_af"]))  # sft.equal_examples

    evaluation = read_metrics(run_dir, "06")
    tasks = 12  # the bundled set: one task per Super-NI test category
    for model in ("base", "self_instruct", "refine_af"):
        predictions = [json.loads(line) for line in
                       (run_dir / "eval" / f"predictions_{model}.jsonl").read_text().splitlines()]
        assert len(predictions) == tasks * params.evaluation.max_instances
        assert {"task", "id", "prompt", "prediction", "references", "rougeL", "exact_match"} <= set(predictions[0])
        mean = sum(p["rougeL"] for p in predictions) / len(predictions)
        assert evaluation[f"{model}_rougeL"] == pytest.approx(mean, abs=0.01)
    assert evaluation["wins"] + evaluation["ties"] + evaluation["losses"] == evaluation["tasks"] == tasks
    per_category = pd.read_csv(run_dir / "eval" / "per_category.csv", index_col="category")
    assert len(per_category) == 12 and set(per_category["winner"]) <= {"refine_af", "self_instruct", "tie"}
    assert len(pd.read_csv(run_dir / "eval" / "per_task.csv")) == tasks

    report = (run_dir / "report.md").read_text()
    stage7 = read_metrics(run_dir, "07")
    expected_tables = {"main", "tasks_improved", "per_category", "seeds", "filter_counts", "reward_components",
                       "reward_correlations", "rl_summary", "rl_heldout", "dataset_statistics", "arm_comparison",
                       "reward_by_arm", "sft_summary", "wall_time", "task_stats"}
    expected_figures = {"06_per_category", "06_task_deltas", "01_filter_counts", "01_novelty", "02_components",
                        "02_correlations", "03_reward_kl", "03_components", "03_heldout", "04_arm_comparison",
                        "04_arm_rewards", "05_sft_loss",
                        "wall_time"}
    assert set(stage7["tables"]) == expected_tables and set(stage7["figures"]) == expected_figures
    for name in expected_tables:
        assert f"(`table_{name}.csv`)" in report and (run_dir / f"table_{name}.csv").stat().st_size > 0
    for name in expected_figures:
        assert f"](fig_{name}.png)" in report and (run_dir / f"fig_{name}.png").stat().st_size > 0
    assert "63-66%" in report and "not** Super-NI numbers" in report
    wall = pd.read_csv(run_dir / "table_wall_time.csv", dtype={"stage": str})
    assert wall["stage"].tolist() == ["00", "01", "02", "03", "04", "05", "06", "0-6"]
    assert wall["seconds"].iloc[-1] == pytest.approx(wall["seconds"].iloc[:-1].sum(), abs=0.2)
    figures = {p.name: p.read_bytes() for p in run_dir.glob("fig_*.png")}
    run_pipeline(params_path, only="07", force=True, results_root=tmp_path)  # regenerated: byte-identical
    assert {p.name: p.read_bytes() for p in run_dir.glob("fig_*.png")} == figures

    for stage in STAGES:
        executed = nbformat.read(run_dir / "notebooks" / stage.notebook, as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        assert json.loads((run_dir / "stages" / f"{stage.id}.json").read_text())["seconds"] > 0

    capsys.readouterr()
    run_pipeline(params_path, results_root=tmp_path)  # complete: every stage is skipped
    assert capsys.readouterr().out.count("complete, skipped") == len(STAGES)

    cache_files = sorted((run_dir / "reward_analysis" / "cache").glob("*.jsonl"))
    assert len(cache_files) == 4
    run_pipeline(params_path, only="01", force=True, results_root=tmp_path)  # from scratch, same result
    rerun = [json.loads(line) for line in (run_dir / "instructions" / "instructions.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rerun] == [r["instruction"] for r in records]
