"""Notebooks: committed clean and thin; the runner executes them with papermill on the smoke params.

Two tiers. The cheap checks (unmarked) run in ``make test-fast``. The smoke tests (``slow``) share one
run of the whole pipeline on ``params/smoke.yaml`` (the session fixture ``smoke_run`` in conftest.py)
and check it one test per stage: the stage's outputs, and the metrics it recorded in
``<run>/metrics/NN.json`` against the values pinned in ``tests/fixtures/smoke_metrics.json``, within
the tolerances given there (microsoft/recommenders' habit). A stage that fails fails its own test;
the tests of the stages after it skip.

The pins are keyed by CPU kind and dtype (``tests/smoke_pins.py``): exact where the run's kind, read
from its stage markers, has a recording, within a band derived from every kind's recordings elsewhere.
Re-recording after an intended change (a new default, another model): run

    REFINE_AF_RECORD_METRICS=1 python -m pytest tests/test_notebooks.py -m slow

which writes this kind's values of each pinned metric into the fixture (tolerances and the set of pinned
keys stay as they are; add a new metric there by hand), then review the diff of the fixture and commit it.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest

from refine_af_utils.environment import reproduction_key
from refine_af_utils.library_noise import KNOWN_LOG_RECORDS, KNOWN_WARNINGS
from refine_af_utils.params import load_params
from refine_af_utils.run_folder import read_metrics
from refine_af_utils.run import NOTEBOOK_DIR, STAGES, main, run_pipeline, select_stages
from smoke_pins import PINNED_METRICS, RECORD_ENV, any_kind_band, check_metrics, dump_pins, load_pins, tolerant

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
COMPONENTS = ["reward_model", "understandability", "naturalness", "coherence"]
ARMS = ("self_instruct", "refine_af")
TIMING_WORDS = ("seconds", "per_second", "wall", "elapsed", "duration")  # machine-dependent: never pinned


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
    assert [s.id for s in select_stages(only="1")] == ["01"]  # the notebook number without its leading zero
    assert [s.id for s in select_stages(start="2", until="04")] == ["02", "03", "04"]
    assert [s.id for s in select_stages(until="1")] == ["00", "01"]
    with pytest.raises(SystemExit, match="--until 01 comes before --from 02"):
        select_stages(start="02", until="01")
    with pytest.raises(SystemExit, match="not with --only"):
        select_stages(only="02", until="03")


def test_runner_reports_bad_params_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nnum_instrucions: 3\n")
    assert main([str(bad), "--results-root", str(tmp_path)]) == 2
    assert f"{bad}: unknown key 'num_instrucions'" in capsys.readouterr().err


def test_pinned_metrics_are_well_formed():
    pins = load_pins()
    assert PINNED_METRICS.read_text() == dump_pins(pins)  # the layout recording writes
    assert list(pins) == ["_comment", "_kinds", *(s.id for s in STAGES)]
    for stage in (s.id for s in STAGES):
        assert pins[stage], f"stage {stage}: nothing pinned"
        for key, pin in pins[stage].items():
            assert not any(word in key for word in TIMING_WORDS), f"{stage}.{key}: timing is not pinned"
            assert set(pin) in ({"value"}, {"by_kind", "any_kind"}) or set(pin) - {"rel", "abs"} in (
                {"value"}, {"by_kind", "any_kind"}), f"{stage}.{key}: {pin}"
            values = [pin["value"]] if "value" in pin else list(pin["by_kind"].values())
            if "by_kind" in pin:
                assert set(pin["by_kind"]) <= set(pins["_kinds"]), f"{stage}.{key}: a kind not described in _kinds"
                assert pin["any_kind"] == any_kind_band(pin), f"{stage}.{key}: the band does not follow the rule"
                assert all(pin["any_kind"][0] <= v <= pin["any_kind"][1] for v in values)
            for value in values:
                if tolerant(pin):
                    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{stage}.{key}: {pin}"
                    assert all(pin[t] >= 0 for t in ("rel", "abs") if t in pin), f"{stage}.{key}: {pin}"
                else:  # exact: counts and names, never a measured float
                    assert not isinstance(value, float), f"{stage}.{key}: a float needs a tolerance (rel or abs)"


def run_kind(run_dir: Path, stage: str) -> str:
    """``<cpu kind>/<backbone dtype>`` of a stage as its marker recorded it; never ``auto``."""
    marker = json.loads((run_dir / "stages" / f"{stage}.json").read_text())
    kind = reproduction_key(marker["environment"])
    assert not kind.endswith("/auto"), f"stage {stage} ran with an unresolved dtype ({kind})"
    return kind


def check_pinned_metrics(run_dir: Path, stage: str) -> dict[str, Any]:
    """The stage's recorded metrics, after comparing them with the pins of the run's own CPU kind and dtype
    (or, when recording, re-pinning that kind)."""
    return check_metrics(read_metrics(run_dir, stage), stage, run_kind(run_dir, stage),
                         record=os.environ.get(RECORD_ENV) == "1")


def check_executed(run_dir: Path, stage_id: str) -> None:
    stage = next(s for s in STAGES if s.id == stage_id)
    executed = nbformat.read(run_dir / "notebooks" / stage.notebook, as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    # progress under the runner is text (refine_af_utils.progress): no widget saved frozen at 0%, and a
    # stage with a bar keeps its final state
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if stage.id in ("01", "02", "03", "04", "05", "06"):
        assert any(o.get("output_type") == "stream" and "100%|" in o.get("text", "") for o in outputs), stage.id
    # the notebook closes with its conclusion, computed from this run's metrics (refine_af_utils.conclusions)
    from refine_af_utils.conclusions import conclusion

    last = [c for c in executed.cells if c.cell_type == "code"][-1]
    shown = "".join("".join(o.get("data", {}).get("text/markdown", "")) for o in last.get("outputs", []))
    assert shown == conclusion(stage.id, run_dir) and shown.startswith("**This run's"), stage.id
    # the known library noise (refine_af_utils.library_noise) is not in the saved notebook
    streams = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    noise = [p for _, p, _ in KNOWN_WARNINGS] + [p for p, _ in KNOWN_LOG_RECORDS] + [r"Consider training"]
    assert not [p for p in noise if re.search(p, streams)], stage.id
    assert json.loads((run_dir / "stages" / f"{stage.id}.json").read_text())["seconds"] > 0


def instructions(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "instruction_generation" / "instructions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def params(smoke_run):
    return load_params(smoke_run.params_path)


@pytest.mark.slow
def test_smoke_00_seed_tasks(smoke_run):
    run_dir = smoke_run.require("00")
    assert run_dir == smoke_run.results_root / "smoke"
    seeds = check_pinned_metrics(run_dir, "00")
    assert seeds["tasks"] == 36 and seeds["classification tasks"] == 10
    assert (run_dir / "seed_tasks" / "seed_tasks.jsonl").read_text().count("\n") == 36
    assert pd.read_csv(run_dir / "seed_tasks" / "seed_summary.csv").shape == (8, 2)
    check_executed(run_dir, "00")


@pytest.mark.slow
def test_smoke_01_instruction_generation(smoke_run, params):
    run_dir = smoke_run.require("01")
    stage1 = check_pinned_metrics(run_dir, "01")
    assert stage1["instructions"] == params.num_instructions == stage1["count_accepted"]
    records = instructions(run_dir)
    assert len(records) == params.num_instructions
    assert len({r["instruction"] for r in records}) == len(records)
    assert all(r["max_rouge_l"] <= 0.7 for r in records)
    counts = pd.read_csv(run_dir / "instruction_generation" / "filter_counts.csv")
    assert counts.set_index("stage").loc["accepted", "count"] == params.num_instructions
    for name in ("filter_counts.png", "novelty_rouge_l.png", "instruction_lengths.png", "instructions.csv"):
        assert (run_dir / "instruction_generation" / name).stat().st_size > 0
    check_executed(run_dir, "01")


@pytest.mark.slow
def test_smoke_02_reward_analysis(smoke_run):
    run_dir = smoke_run.require("02")
    reward = check_pinned_metrics(run_dir, "02")
    scores = pd.read_csv(run_dir / "reward_analysis" / "scores.csv")
    assert reward["instances"] == len(scores) > 0
    assert set(COMPONENTS + ["reward", "instruction", "input", "output"]) <= set(scores.columns)
    assert scores[COMPONENTS].apply(lambda c: c.between(0, 1).all()).all()  # the default stand-ins are in [0, 1]
    weights = {"reward_model": 0.0078, "understandability": -0.4421, "naturalness": 0.3212, "coherence": 0.1520}
    recomputed = sum(w * scores[c] for c, w in weights.items())  # the reward is redrawable from the CSV
    assert (recomputed - scores["reward"]).abs().max() < 1e-9
    for name in ("component_histograms.png", "component_correlations.png", "reward_distribution.png",
                 "best_examples.csv", "worst_examples.csv", "reward_by_type.csv", "correlations.csv"):
        assert (run_dir / "reward_analysis" / name).stat().st_size > 0
    assert len(sorted((run_dir / "reward_analysis" / "cache").glob("*.jsonl"))) == 4  # a score cache per scorer
    check_executed(run_dir, "02")


@pytest.mark.slow
def test_smoke_03_rl_training(smoke_run, params):
    run_dir = smoke_run.require("03")
    rl = pd.read_csv(run_dir / "rl_training" / "metrics.csv")
    assert list(rl["update"]) == list(range(1, params.rl.updates + 1))
    assert rl[["reward", "parsed_share", "unparsed_reward", "kl", "kl_penalty", "policy_loss", "value_loss"]
              ].notna().all().all()
    stage3 = check_pinned_metrics(run_dir, "03")
    assert stage3["updates"] == params.rl.updates
    assert (run_dir / "rl_training" / "adapter" / "adapter_config.json").is_file()
    for name in ("reward_kl.png", "components.png", "heldout_gain.png"):
        assert (run_dir / "rl_training" / name).stat().st_size > 0
    probe = pd.read_csv(run_dir / "rl_training" / "reward_probe.csv")  # the judge-exploitation probe
    assert probe["instructions"].iloc[:2].tolist() == [params.rl.heldout_instructions] * 2
    assert isinstance(stage3["probe_exploitable"], bool)
    split = pd.read_json(run_dir / "rl_training" / "prompts.jsonl", lines=True)
    heldout = pd.read_csv(run_dir / "rl_training" / "heldout_eval.csv")
    assert sorted(heldout["instruction"]) == sorted(split.loc[split["split"] == "heldout", "instruction"])
    assert len(heldout) == params.rl.heldout_instructions == stage3["heldout_instructions"]
    assert stage3["heldout_reward_gain"] == pytest.approx((heldout["trained_reward"] - heldout["base_reward"]).mean())
    assert stage3["heldout_reward_gain_ci_low"] <= stage3["heldout_reward_gain"] <= stage3["heldout_reward_gain_ci_high"]
    check_executed(run_dir, "03")


@pytest.mark.slow
def test_smoke_04_instance_generation(smoke_run, params):
    from datasets import load_dataset

    run_dir = smoke_run.require("04")
    stage4 = check_pinned_metrics(run_dir, "04")
    arms = {}
    for arm in ARMS:
        data = load_dataset("json", data_files=str(run_dir / "instance_generation" / f"{arm}.jsonl"), split="train")
        assert {"instruction", "input", "output", "is_classification", "reward", *COMPONENTS} <= set(data.column_names)
        arms[arm] = data
        assert stage4[f"{arm}_instances"] == len(data) > 0
    assert set(arms["self_instruct"]["instruction"]) <= {r["instruction"] for r in instructions(run_dir)}
    statistics = pd.read_csv(run_dir / "instance_generation" / "dataset_statistics.csv", index_col=0)
    assert list(statistics.columns) == list(ARMS)
    assert statistics.loc["instructions (stage 1)"].tolist() == [params.num_instructions] * 2
    for name in ("reward_by_arm.png", "arm_comparison.png", "yield.png", "lengths.png"):
        assert (run_dir / "instance_generation" / name).stat().st_size > 0
    comparison = pd.read_csv(run_dir / "instance_generation" / "arm_comparison.csv")
    assert set(comparison["group"]) == {"all", "rl-train", "held-out"}
    assert set(comparison["measure"]) == {"has_instances", "reward", "content"}
    per_instruction = pd.read_csv(run_dir / "instance_generation" / "per_instruction.csv")
    assert len(per_instruction) == params.num_instructions
    for arm in ARMS:
        assert per_instruction[f"{arm}_has_instances"].sum() == len(set(arms[arm]["instruction"]))
    check_executed(run_dir, "04")


@pytest.mark.slow
def test_smoke_05_sft(smoke_run):
    run_dir = smoke_run.require("05")
    stage5 = check_pinned_metrics(run_dir, "05")
    sft = pd.read_csv(run_dir / "sft" / "loss.csv")
    assert set(sft["arm"]) == set(ARMS) and sft["loss"].notna().all()
    for arm in ARMS:
        assert (run_dir / "sft" / arm / "model" / "adapter_config.json").is_file()
        assert (run_dir / "sft" / arm / "complete").is_file()
    assert stage5["refine_af_steps"] == sft[sft["arm"] == "refine_af"]["step"].max()
    assert (run_dir / "sft" / "loss.png").stat().st_size > 0
    summary = pd.read_csv(run_dir / "sft" / "summary.csv", index_col=0)
    sizes = [len(pd.read_json(run_dir / "instance_generation" / f"{arm}.jsonl", lines=True)) for arm in ARMS]
    assert summary.loc["training examples", "self_instruct"] == summary.loc["training examples", "refine_af"] == min(
        sizes)  # sft.equal_examples
    check_executed(run_dir, "05")


@pytest.mark.slow
def test_smoke_06_superni_evaluation(smoke_run, params):
    run_dir = smoke_run.require("06")
    evaluation = check_pinned_metrics(run_dir, "06")
    tasks = 12  # the bundled set: one task per Super-NI test category
    for model in ("base", *ARMS):
        predictions = [json.loads(line) for line in
                       (run_dir / "superni_evaluation" / f"predictions_{model}.jsonl").read_text().splitlines()]
        assert len(predictions) == tasks * params.evaluation.max_instances
        assert {"task", "id", "prompt", "prediction", "references", "rougeL", "exact_match"} <= set(predictions[0])
        mean = sum(p["rougeL"] for p in predictions) / len(predictions)
        assert evaluation[f"{model}_rougeL"] == pytest.approx(mean, abs=0.01)
    assert evaluation["wins"] + evaluation["ties"] + evaluation["losses"] == evaluation["tasks"] == tasks
    per_category = pd.read_csv(run_dir / "superni_evaluation" / "per_category.csv", index_col="category")
    assert len(per_category) == 12 and set(per_category["winner"]) <= {"refine_af", "self_instruct", "tie"}
    assert len(pd.read_csv(run_dir / "superni_evaluation" / "per_task.csv")) == tasks
    check_executed(run_dir, "06")


@pytest.mark.slow
def test_smoke_07_report(smoke_run):
    run_dir = smoke_run.require("07")
    report = (run_dir / "report.md").read_text()
    stage7 = check_pinned_metrics(run_dir, "07")
    expected_tables = {"environment", "main", "tasks_improved", "per_category", "seeds", "filter_counts", "reward_components",
                       "reward_correlations", "rl_summary", "rl_heldout", "dataset_statistics", "arm_comparison",
                       "reward_by_arm", "sft_summary", "wall_time", "task_stats", "paired_instances", "reward_probe"}
    expected_figures = {"06_per_category", "06_task_forest", "01_filter_counts", "01_novelty", "02_components",
                        "02_correlations", "03_reward_kl", "03_components", "03_heldout", "04_arm_comparison",
                        "04_arm_rewards", "04_yield", "04_lengths", "05_sft_loss", "wall_time"}
    assert set(stage7["tables"]) == expected_tables and set(stage7["figures"]) == expected_figures
    for name in expected_tables:
        assert f"(`table_{name}.csv`)" in report and (run_dir / f"table_{name}.csv").stat().st_size > 0
    for name in expected_figures:
        assert f"](fig_{name}.png)" in report and (run_dir / f"fig_{name}.png").stat().st_size > 0
    assert "63-66%" in report and "not** Super-NI numbers" in report
    assert report.split("\n\n")[2] == "## Environment"  # right after the title and its paragraph
    environment = pd.read_csv(run_dir / "table_environment.csv").set_index("what")["value"]
    assert environment["dtype: backbone (generation, RL, SFT, evaluation)"] == "float32"  # smoke.yaml pins it
    assert f"{environment['CPU kind']} {environment['CPU identity']}" == run_kind(run_dir, "06").rpartition("/")[0]
    wall = pd.read_csv(run_dir / "table_wall_time.csv", dtype={"stage": str})
    assert wall["stage"].tolist() == ["00", "01", "02", "03", "04", "05", "06", "0-6"]
    assert wall["seconds"].iloc[-1] == pytest.approx(wall["seconds"].iloc[:-1].sum(), abs=0.2)
    # each stage's peak memory, measured in its own kernel: above the 0.1 GiB a Python process with torch
    # needs, below the machine; stage 3 (policy, reference and critic) above stage 0 (no model)
    peak = wall.set_index("stage")["peak_rss_gb"]
    assert peak.between(0.1, 64).all() and peak["03"] > peak["00"] and peak["0-6"] == peak.iloc[:-1].max()
    check_executed(run_dir, "07")
    # The executed notebook shows every figure of the report as a PNG output (no relative link left to 404)
    executed = json.loads((run_dir / "notebooks" / next(s for s in STAGES if s.id == "07").notebook).read_text())
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    markdown = "".join("".join(o["data"]["text/markdown"]) for o in outputs if "text/markdown" in o.get("data", {}))
    assert len(pngs) >= len(expected_figures) and "](fig_" not in markdown and "## Environment" in markdown
    figures = {p.name: p.read_bytes() for p in run_dir.glob("fig_*.png")}
    run_pipeline(smoke_run.params_path, only="07", force=True, results_root=smoke_run.results_root)
    assert {p.name: p.read_bytes() for p in run_dir.glob("fig_*.png")} == figures  # regenerated: byte-identical


# These rerun the smoke run and come last: they leave its outputs as they were.


@pytest.mark.slow
def test_smoke_compare_a_second_real_run_is_identical(smoke_run):
    """Two real smoke runs: a copy of stages 0-5 whose evaluation (stage 06) and report are run again from
    scratch under another run name; greedy evaluation on the same machine reproduces every headline exactly."""
    import shutil

    from refine_af_utils.compare import compare_runs, main as compare_main, reference_check

    run_dir = smoke_run.require("07")
    second = smoke_run.results_root / "smoke-b"
    shutil.rmtree(second, ignore_errors=True)
    shutil.copytree(run_dir, second, ignore=shutil.ignore_patterns(".lock"))
    run_pipeline(smoke_run.params_path, start="06", force=True, results_root=smoke_run.results_root,
                 overrides={"run_name": "smoke-b"})
    predictions = Path("superni_evaluation") / "predictions_refine_af.jsonl"
    assert (second / predictions).stat().st_mtime_ns > (run_dir / predictions).stat().st_mtime_ns  # made again
    comparison = compare_runs(run_dir, second)
    assert comparison.verdict == "identical", comparison.table[comparison.table["judgement"] != "identical"]
    assert len(comparison.rows) > 40
    assert compare_main([str(run_dir), str(second)]) == 0
    assert "verdict: identical" in reference_check(str(run_dir), second)
    assert reference_check(None, second).startswith("No reference run set")


@pytest.mark.slow
def test_smoke_rerun_skips_every_complete_stage(smoke_run, capsys):
    smoke_run.require("07")
    capsys.readouterr()
    run_pipeline(smoke_run.params_path, results_root=smoke_run.results_root)
    assert capsys.readouterr().out.count("complete, skipped") == len(STAGES)


@pytest.mark.slow
def test_smoke_01_rerun_from_scratch_gives_the_same_instructions(smoke_run):
    run_dir = smoke_run.require("01")
    before = [r["instruction"] for r in instructions(run_dir)]
    run_pipeline(smoke_run.params_path, only="01", force=True, results_root=smoke_run.results_root)
    assert [r["instruction"] for r in instructions(run_dir)] == before
