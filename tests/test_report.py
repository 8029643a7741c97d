"""The report's main-result section on hand-built predictions: CIs, tests, the chance sentence, power, flags."""

import numpy as np
import pandas as pd
import pytest

from refine_af_utils.comparison import evaluation_statistics
from refine_af_utils.layout import RunLayout
from refine_af_utils.stages.report import (
    chance_sentence,
    main_table,
    per_category_table,
    power_line,
    task_table,
    tasks_improved_table,
)
from refine_af_utils.stats import min_detectable_share


def _predictions(shift: float, tasks: int = 12, instances: int = 6, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Three models on ``tasks`` tasks; REFINE-AF scores ``shift`` more than Self-Instruct, plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(10, 60, size=(tasks, instances))
    noise = rng.normal(0, 1, size=(tasks, instances))
    scores = {"base": base * 0.5, "self_instruct": base, "refine_af": base + shift + noise}
    return {name: pd.DataFrame([{"task": f"t{t:02d}", "category": f"c{t % 3}", "id": f"t{t:02d}-{i}",
                                 "rougeL": float(value[t, i]), "exact_match": 0.0, "references": [f"r{i}"]}
                                for t in range(tasks) for i in range(instances)])
            for name, value in scores.items()}


def _improvement(stats):
    counts = stats.tasks["outcome"].value_counts()
    return (int(counts.get("win", 0)), int(counts.get("tie", 0)), int(counts.get("loss", 0)))


def test_a_clear_difference_is_called_distinguishable():
    stats = evaluation_statistics(_predictions(shift=5.0), seed=1)
    sentence = chance_sentence(stats.overall, stats.improvement)
    assert "distinguishable from chance, in favour of REFINE-AF" in sentence and "excludes 0" in sentence
    table = main_table(stats.overall)
    assert table.loc["refine_af - self_instruct", "ROUGE-L CI low"] > 0
    assert list(table.index) == ["base", "self_instruct", "refine_af", "refine_af - self_instruct"]
    wins, ties, losses = _improvement(stats)
    assert (wins, ties, losses) == (12, 0, 0)
    share = tasks_improved_table(wins, ties, losses, stats.improvement)
    assert share.loc["REFINE-AF better", "this run"] == "100.0% (12/12)" and share.loc["REFINE-AF better", "paper"]
    assert share.loc["wins needed for a two-sided sign test at 0.05", "this run"] == "10/12"
    assert share.loc["sign test, wins among wins and losses (two-sided p)", "this run"] == "0.000488"  # 2 / 4096


def test_no_difference_is_called_not_distinguishable_and_the_power_line_is_derived():
    stats = evaluation_statistics(_predictions(shift=0.0), seed=1)
    sentence = chance_sentence(stats.overall, stats.improvement)
    assert sentence.startswith("**The REFINE-AF vs Self-Instruct difference is not distinguishable from chance")
    line = power_line(12, stats.improvement)
    assert f"a win share below {100 * min_detectable_share(12):.1f}% cannot be told from chance at 80% power" in line
    assert "63-66%" in line and "likely go undetected" in line
    assert "no win share can be told" in power_line(5, {**stats.improvement, "min_detectable_win_share": np.nan})


def test_per_category_and_task_tables():
    predictions = _predictions(shift=5.0)
    for name in predictions:  # t00: every model scores 0 (a floor task) on one label (a constant-label task)
        predictions[name].loc[predictions[name]["task"] == "t00", "rougeL"] = 0.0
        predictions[name].loc[predictions[name]["task"] == "t00", "references"] = pd.Series(
            [["yes"]] * 6, index=predictions[name].index[predictions[name]["task"] == "t00"])
    stats = evaluation_statistics(predictions, seed=1)
    tasks = task_table(stats.tasks)
    assert tasks.loc["t00", "flags"] == "floor, constant label" and tasks.loc["t01", "flags"] == ""
    assert tasks.loc["t00", "outcome"] == "tie" and tasks.loc["t01", "significant"] in {"win", "no"}
    categories = per_category_table(stats.per_category)
    assert list(categories.index) == ["c0", "c1", "c2"] and set(categories["winner"]) <= {
        "refine_af", "self_instruct", "neither (CI includes 0)"}
    assert categories.loc["c1", "refine_af"].count("[") == 1 and categories.loc["c1", "tasks"] == 4


def test_tables_round_trip_through_csv(tmp_path):
    from refine_af_utils.comparison import write_statistics
    from refine_af_utils.stages.report import evaluation_statistics_tables

    stats = evaluation_statistics(_predictions(shift=1.0), seed=4)
    (tmp_path / "superni_evaluation").mkdir()
    write_statistics(RunLayout(tmp_path), stats, {"tasks": 12, "wins": 0, "ties": 0, "losses": 0})
    improvement = pd.read_csv(tmp_path / "superni_evaluation" / "tasks_improved.csv", index_col="measure")["value"]
    overall, tasks, per_category, tests = evaluation_statistics_tables(tmp_path, improvement, None)
    assert chance_sentence(overall, tests) == chance_sentence(stats.overall, stats.improvement)
    assert len(tasks) == 12 and len(per_category) == len(stats.per_category)
    with pytest.raises(FileNotFoundError, match="missing stage 6 statistics"):
        evaluation_statistics_tables(tmp_path, improvement.drop("sign_test_p"), None)
