"""Stage 6: predictions are resumable and complete; tables and the tasks-improved share by hand."""

import pandas as pd
import pytest

from refine_af_utils.comparison import category_winners, compare_arms, grouped_scores, per_task_scores, tasks_improved
from refine_af_utils.files import read_jsonl
from refine_af_utils.layout import RunLayout
from refine_af_utils.params import params_from_dict
from refine_af_utils.superni import BUNDLED_SUPERNI, load_tasks, score
from refine_af_utils.stages.superni_evaluation import predict, resolve_superni_dir


def _predictions(scores):
    """A predictions table from {task: (category, [rougeL per instance])}."""
    rows = [{"task": task, "category": category, "id": f"{task}-{i}", "rougeL": value, "exact_match": 0.0}
            for task, (category, values) in scores.items() for i, value in enumerate(values)]
    return pd.DataFrame(rows)


PREDICTIONS = {
    "base": _predictions({"t1": ("A", [0, 0]), "t2": ("A", [10, 10]), "t3": ("B", [0, 0, 0, 0])}),
    "self_instruct": _predictions({"t1": ("A", [50, 50]), "t2": ("A", [20, 40]), "t3": ("B", [10, 10, 10, 10])}),
    "refine_af": _predictions({"t1": ("A", [60, 60]), "t2": ("A", [30, 30]), "t3": ("B", [0, 0, 20, 20])}),
}


def test_per_task_category_and_overall_are_means_over_instances():
    per_task = per_task_scores(PREDICTIONS).set_index("task")
    assert per_task.loc["t2", "rougeL_self_instruct"] == 30 and per_task.loc["t3", "instances"] == 4
    per_category = grouped_scores(PREDICTIONS, "category")
    assert per_category.loc["A", "refine_af"] == 45.0 and per_category.loc["B", "self_instruct"] == 10.0
    overall = grouped_scores(PREDICTIONS, None)  # instance-weighted, as Tk-Instruct: t3 counts 4 times
    assert overall.loc["rougeL", "refine_af"] == pytest.approx((120 + 60 + 40) / 8, abs=0.01)
    winners = category_winners(per_category)
    assert winners.loc["A", "winner"] == "refine_af"  # 45 vs 40
    assert winners.loc["B", "winner"] == "tie"        # 10 vs 10


def test_grouped_scores_names_the_metric_it_groups():
    assert grouped_scores(PREDICTIONS, "category").equals(grouped_scores(PREDICTIONS, "category", metric="rougeL"))
    predictions = {name: table.assign(exact_match=(table["rougeL"] >= 30).astype(float) * 100)
                   for name, table in PREDICTIONS.items()}
    exact = grouped_scores(predictions, "category", metric="exact_match")
    assert exact.loc["A", "refine_af"] == 100.0 and exact.loc["A", "self_instruct"] == 75.0
    assert exact.loc["B", "self_instruct"] == 0.0
    overall = grouped_scores(predictions, None)  # both metrics, whatever ``metric`` says
    assert list(overall.index) == ["rougeL", "exact_match"]
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        grouped_scores(predictions, "category", metric="bleu")


def test_tasks_improved_counts_ties_apart():
    comparison = compare_arms(per_task_scores(PREDICTIONS))
    assert comparison.set_index("task")["outcome"].to_dict() == {"t1": "win", "t2": "tie", "t3": "tie"}
    summary = tasks_improved(comparison)
    assert summary == {"tasks": 3, "wins": 1, "win_share_percent": 33.3, "ties": 2, "tie_share_percent": 66.7,
                       "losses": 0, "loss_share_percent": 0.0}


def test_superni_dir_resolution(tmp_path):
    assert resolve_superni_dir("bundled") == BUNDLED_SUPERNI
    from refine_af_utils.errors import RefineAFError

    with pytest.raises(RefineAFError, match="evaluation.superni_dir: .*natural-instructions"):  # one line in the runner
        resolve_superni_dir(str(tmp_path / "missing"))


@pytest.mark.slow
def test_predictions_resume_after_a_torn_write(tmp_path, tiny_llama_dir):
    params = params_from_dict({"run_name": "t", "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
                               "evaluation": {"max_instances": 2, "max_new_tokens": 4, "batch_size": 5,
                                              "max_prompt_tokens": 64}})
    tasks = load_tasks(BUNDLED_SUPERNI, max_instances=2)
    first = predict(params, "base", tasks, tmp_path)
    assert len(first) == 24 and first[["task", "id"]].drop_duplicates().shape[0] == 24
    record = read_jsonl(tmp_path / "superni_evaluation" / "predictions_base.jsonl")[0]
    assert set(record) >= {"task", "id", "prompt", "prediction", "references", "rougeL", "exact_match"}
    assert record["prompt"].endswith("\nOutput:")
    path = tmp_path / "superni_evaluation" / "predictions_base.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:7]) + lines[7][:20])  # a crash: 7 records and half of the 8th
    kept = read_jsonl(path)
    resumed = predict(params, "base", tasks, tmp_path)
    records = read_jsonl(path)
    assert len(records) == 24 and records[:7] == kept  # no duplicates, nothing lost, nothing rewritten
    assert resumed[["task", "id"]].equals(first[["task", "id"]])
    for row in resumed.itertuples():  # the stored metrics recompute from the stored text
        assert score(row.prediction, row.references)["rougeL"] == pytest.approx(row.rougeL)


def test_evaluating_before_stage_5_says_so(tmp_path):
    from refine_af_utils.stages.superni_evaluation import _model_files_sha256

    with pytest.raises(FileNotFoundError, match="run stage 5 first"):
        _model_files_sha256(tmp_path / "sft" / "refine_af" / "model")


@pytest.mark.slow
def test_a_fully_fine_tuned_arm_loads_as_its_own_model(tmp_path, tiny_llama_dir):
    import shutil

    from refine_af_utils.stages.superni_evaluation import load_evaluated_model

    model_dir = tmp_path / "sft" / "refine_af" / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir.parent / "complete").write_text("{}")
    params = params_from_dict({"run_name": "t", "model": {"name_or_path": "no/such-hub-model", "revision": "abc"},
                               "sft": {"full_fine_tuning": True}})
    engine = load_evaluated_model(params, "refine_af", tmp_path)  # never touches the hub id
    model, tokenizer = engine.model, engine.tokenizer
    assert model.config.num_hidden_layers == 2 and tokenizer.padding_side == "left"


def test_the_report_names_a_missing_result(tmp_path):
    from refine_af_utils.stages.report import build_report

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "06.json").write_text('{"superni_dir": "bundled"}')
    with pytest.raises(FileNotFoundError, match=r"superni_evaluation/overall.csv: missing; run the stage that writes it"):
        build_report(tmp_path)


def _with_references(table, constant_tasks):
    refs = [["yes"] if row.task in constant_tasks else [row.id] for row in table.itertuples()]
    return table.assign(references=refs)


def test_statistics_by_hand():
    from refine_af_utils.comparison import DIFFERENCE, evaluation_statistics

    stats = evaluation_statistics(PREDICTIONS, seed=5)
    overall = stats.overall.set_index(["model", "metric"])
    assert overall.loc[("refine_af", "rougeL"), "mean"] == pytest.approx(220 / 8)
    assert overall.loc[(DIFFERENCE, "rougeL"), "mean"] == pytest.approx(20 / 8)  # paired by instance
    assert overall.loc[(DIFFERENCE, "rougeL"), "instances"] == 8 and overall.loc[(DIFFERENCE, "rougeL"), "tasks"] == 3
    for row in stats.overall.itertuples():
        assert row.ci_low <= row.mean <= row.ci_high
    tasks = stats.tasks.set_index("task")
    # t1: both instances differ by exactly 10, so its CI is the point 10: a significant win
    assert (tasks.loc["t1", "delta"], tasks.loc["t1", "ci_low"], tasks.loc["t1", "ci_high"]) == (10, 10, 10)
    assert tasks["outcome"].to_dict() == {"t1": "win", "t2": "tie", "t3": "tie"}
    assert tasks["significant"].to_dict() == {"t1": "win", "t2": "no", "t3": "no"}
    # t3's instance differences are -10, -10, +10, +10: resampled means run from -10 to 10
    assert (tasks.loc["t3", "ci_low"], tasks.loc["t3", "ci_high"]) == (-10, 10)
    assert stats.improvement["significant_wins"] == 1 and stats.improvement["sign_test_p"] == 1.0
    category = stats.per_category.set_index(["category", "model", "metric"])
    assert category.loc[("B", "self_instruct", "rougeL"), ["mean", "ci_low", "ci_high"]].tolist() == [10, 10, 10]
    assert category.loc[("A", "refine_af", "rougeL"), "tasks"] == 2
    again = evaluation_statistics(PREDICTIONS, seed=5)
    pd.testing.assert_frame_equal(stats.overall, again.overall)
    pd.testing.assert_frame_equal(stats.tasks, again.tasks)


def test_floor_and_constant_label_tasks_are_flagged():
    from refine_af_utils.comparison import evaluation_statistics

    predictions = {name: _with_references(table, {"t3"}) for name, table in PREDICTIONS.items()}
    predictions["refine_af"] = predictions["refine_af"].assign(
        rougeL=lambda t: t["rougeL"].where(t["task"] != "t3", 0.0))
    predictions["self_instruct"] = predictions["self_instruct"].assign(
        rougeL=lambda t: t["rougeL"].where(t["task"] != "t3", 0.0))
    stats = evaluation_statistics(predictions, seed=1)
    tasks = stats.tasks.set_index("task")
    assert tasks["floor"].to_dict() == {"t1": False, "t2": False, "t3": True}
    assert tasks["constant_label"].to_dict() == {"t1": False, "t2": False, "t3": True}
    assert stats.improvement["floor_tasks"] == 1 and stats.improvement["constant_label_tasks"] == 1


def test_statistics_files_extend_tasks_improved(tmp_path):
    from refine_af_utils.comparison import evaluation_statistics, write_statistics

    improvement = tasks_improved(compare_arms(per_task_scores(PREDICTIONS)))
    layout = RunLayout(tmp_path)
    layout.stage_folder("06", create=True)
    write_statistics(layout, evaluation_statistics(PREDICTIONS, seed=2), improvement)
    for name in ("overall_ci.csv", "task_stats.csv", "per_category_ci.csv"):
        assert len(pd.read_csv(layout.eval / name)) > 0
    values = pd.read_csv(layout.eval / "tasks_improved.csv", index_col="measure")["value"]
    assert int(float(values["wins"])) == 1 and int(float(values["ties"])) == 2
    assert float(values["sign_test_p"]) == 1.0 and float(values["win_share_ci_high"]) > 0.9
