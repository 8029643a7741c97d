"""Comparing the models' Super-NI predictions: per task, per category and overall, with their statistics.

Stage 6 computes these from its scored predictions and writes them to ``superni_evaluation/``; the report and
the study runner read them (or recompute them from the predictions with the same seed rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refine_af_utils.layout import MODELS, RunLayout
from refine_af_utils.seeding import derive_seed
from refine_af_utils.stats import BOOTSTRAP_RESAMPLES, ClusterBootstrap, tasks_improved_tests

METRICS = ("rougeL", "exact_match")
PAPER_TASKS_IMPROVED = (63.0, 66.0)  # % of Super-NI test tasks where REFINE-AF beats Self-Instruct, per backbone


def per_task_scores(predictions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean ROUGE-L and exact match per task and model (columns ``rougeL_<model>``, ...)."""
    tables = []
    for name, table in predictions.items():
        grouped = table.groupby(["task", "category"], sort=True)
        means = grouped[list(METRICS)].mean().add_suffix(f"_{name}")
        tables.append(means)
    result = pd.concat(tables, axis=1).reset_index()
    counts = next(iter(predictions.values())).groupby("task").size().rename("instances")
    return result.merge(counts, on="task")


def grouped_scores(predictions: dict[str, pd.DataFrame], by: str | None, metric: str = "rougeL") -> pd.DataFrame:
    """Tk-Instruct's grouped metrics: means over the instances of each group (or of all, ``by=None``).

    With ``by=None`` the table has one row per metric in :data:`METRICS` (ROUGE-L and exact match)
    and one column per model. With ``by`` (e.g. ``"category"``) it has one row per group and one
    column per model, and holds ``metric`` only (ROUGE-L unless asked otherwise; ``metric`` is not
    used when ``by`` is None). Values are rounded to 2 decimals.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    rows = {}
    for name, table in predictions.items():
        if by is None:
            rows[name] = table[list(METRICS)].mean()
        else:
            rows[name] = table.groupby(by)[metric].mean()
    return pd.DataFrame(rows).round(2)


TIE_TOLERANCE = 1e-9  # a task is a tie when the two arms' mean scores differ by at most this (i.e. are equal)


def task_outcomes(delta: Any, atol: float = TIE_TOLERANCE) -> np.ndarray:
    """``win``, ``tie`` or ``loss`` per difference (REFINE-AF minus Self-Instruct); a tie is ``|delta| <= atol``."""
    delta = np.asarray(delta, dtype=np.float64)
    return np.where(np.isclose(delta, 0.0, atol=atol), "tie", np.where(delta > 0, "win", "loss"))


def compare_arms(per_task: pd.DataFrame, metric: str = "rougeL", atol: float = TIE_TOLERANCE) -> pd.DataFrame:
    """Per task: REFINE-AF's score minus Self-Instruct's, and the outcome (win, tie, loss)."""
    delta = per_task[f"{metric}_refine_af"] - per_task[f"{metric}_self_instruct"]
    outcome = task_outcomes(delta, atol)
    return pd.DataFrame({"task": per_task["task"], "category": per_task["category"],
                         "self_instruct": per_task[f"{metric}_self_instruct"],
                         "refine_af": per_task[f"{metric}_refine_af"], "delta": delta, "outcome": outcome})


def tasks_improved(comparison: pd.DataFrame) -> dict[str, Any]:
    """Counts and shares of wins, ties and losses of REFINE-AF over Self-Instruct (ties counted apart)."""
    counts = comparison["outcome"].value_counts()
    total = len(comparison)
    summary: dict[str, Any] = {"tasks": total}
    for outcome, plural in (("win", "wins"), ("tie", "ties"), ("loss", "losses")):
        summary[plural] = int(counts.get(outcome, 0))
        summary[f"{outcome}_share_percent"] = round(100.0 * counts.get(outcome, 0) / total, 1) if total else None
    return summary


def category_winners(per_category: pd.DataFrame) -> pd.DataFrame:
    """Each category's mean ROUGE-L per model and which arm wins it."""
    table = per_category.copy()
    delta = table["refine_af"] - table["self_instruct"]
    table["winner"] = np.where(np.isclose(delta, 0.0), "tie", np.where(delta > 0, "refine_af", "self_instruct"))
    return table


DIFFERENCE = "refine_af - self_instruct"  # the paired difference's name in the statistics tables


def paired_predictions(predictions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per instance answered by every model (same task and id): ``<metric>_<model>`` columns.

    ``references`` (as a tuple) comes along when the predictions carry it, for the constant-label flag.
    """
    keys = ["task", "category", "id"]
    table = None
    for name, frame in predictions.items():
        part = frame[keys + list(METRICS)].rename(columns={m: f"{m}_{name}" for m in METRICS})
        table = part if table is None else table.merge(part, on=keys, how="inner", validate="one_to_one")
    first = next(iter(predictions.values()))
    if "references" in first.columns:
        refs = first[["task", "id"]].assign(references=[tuple(str(r).strip() for r in refs)
                                                        for refs in first["references"]])
        table = table.merge(refs, on=["task", "id"], how="left")
    return table.sort_values(["task", "id"], kind="stable").reset_index(drop=True)


@dataclass
class EvaluationStatistics:
    """Stage 6's statistics: overall and per-category means with cluster bootstrap CIs, per-task paired
    differences with instance bootstrap CIs and flags, and the tests over tasks."""

    overall: pd.DataFrame       # model (and the paired difference), metric, mean, ci_low, ci_high, tasks, instances
    tasks: pd.DataFrame         # per task: ROUGE-L per model, difference with CI, outcome, significance, flags
    per_category: pd.DataFrame  # category, model (and the difference), metric, mean, ci_low, ci_high, tasks, instances
    improvement: dict[str, Any]  # wins/ties/losses, significant ones, exact interval, p-values, power


def evaluation_statistics(predictions: dict[str, pd.DataFrame], seed: int,
                          resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> EvaluationStatistics:
    """Every statistic of stage 6 from the scored predictions (see :class:`EvaluationStatistics`).

    One :class:`~refine_af_utils.stats.ClusterBootstrap` (tasks, then instances) serves all of them,
    so the models and their paired difference share the same draws. Per task, REFINE-AF minus
    Self-Instruct on ROUGE-L with an instance bootstrap CI; a task is a significant win or loss only
    when that CI excludes 0. Ties follow :func:`task_outcomes`.
    """
    paired = paired_predictions(predictions)
    models = list(predictions)
    columns = [(name, metric) for metric in METRICS for name in models]
    columns += [(DIFFERENCE, metric) for metric in METRICS]
    values = np.column_stack(
        [paired[f"{m}_{name}"] for name, m in columns if name != DIFFERENCE]
        + [paired[f"{m}_refine_af"] - paired[f"{m}_self_instruct"] for name, m in columns if name == DIFFERENCE])
    boot = ClusterBootstrap(values, paired["task"], seed, resamples)

    def rows(intervals: list[Any], **extra: Any) -> list[dict[str, Any]]:
        return [{**extra, "model": name, "metric": metric, "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high,
                 "tasks": iv.clusters, "instances": iv.instances} for (name, metric), iv in zip(columns, intervals)]

    overall = pd.DataFrame(rows(boot.interval(level=level)))
    category_of = paired.groupby("task")["category"].first()
    per_category = pd.DataFrame([row for category, names in category_of.groupby(category_of).groups.items()
                                 for row in rows(boot.interval(list(names), key=f"category:{category}", level=level),
                                                 category=category)])
    means, low, high = boot.cluster_intervals(level)
    diff = columns.index((DIFFERENCE, "rougeL"))
    tasks = pd.DataFrame({"task": list(boot.names), "category": category_of.loc[list(boot.names)].to_numpy(),
                          "instances": boot.sizes})
    for j, (name, metric) in enumerate(columns):
        if metric == "rougeL" and name != DIFFERENCE:
            tasks[name] = means[:, j]
    tasks["delta"], tasks["ci_low"], tasks["ci_high"] = means[:, diff], low[:, diff], high[:, diff]
    tasks["outcome"] = task_outcomes(tasks["delta"])
    tasks["significant"] = np.where(tasks["ci_low"] > 0, "win", np.where(tasks["ci_high"] < 0, "loss", "no"))
    tasks["floor"] = (tasks[models] == 0).all(axis=1)
    if "references" in paired.columns:
        tasks["constant_label"] = (paired.groupby("task")["references"].nunique() == 1).loc[tasks["task"]].to_numpy()
    else:
        tasks["constant_label"] = pd.NA

    counts = tasks["outcome"].value_counts()
    wins, ties, losses = (int(counts.get(k, 0)) for k in ("win", "tie", "loss"))
    tests = tasks_improved_tests(wins, ties, losses, tasks["delta"].where(tasks["outcome"] != "tie", 0.0),
                                 level=level)
    improvement = {"significant_wins": int((tasks["significant"] == "win").sum()),
                   "significant_losses": int((tasks["significant"] == "loss").sum()),
                   "floor_tasks": int(tasks["floor"].sum()),
                   "constant_label_tasks": int(tasks["constant_label"].eq(True).sum()),
                   "tie_tolerance": TIE_TOLERANCE, "confidence_level": level, "bootstrap_resamples": resamples,
                   "bootstrap_seed": int(seed), **tests}
    return EvaluationStatistics(overall, tasks, per_category, improvement)


STATISTICS_FILES = {"overall": "overall_ci", "tasks": "task_stats", "per_category": "per_category_ci"}  # layout names


def write_statistics(layout: RunLayout, statistics: EvaluationStatistics, improvement: dict[str, Any]) -> None:
    """Write stage 6's ``overall_ci``, ``task_stats``, ``per_category_ci`` and ``tasks_improved`` tables.

    ``improvement`` is :func:`tasks_improved`'s counts; the statistics' rows follow them in
    ``tasks_improved`` (one ``measure,value`` table).
    """
    for key, name in STATISTICS_FILES.items():
        getattr(statistics, key).to_csv(layout.file("06", name), index=False)
    pd.Series({**improvement, **statistics.improvement}, dtype=object).to_csv(
        layout.file("06", "tasks_improved"), header=["value"], index_label="measure")


def bootstrap_seed(random_seed: int) -> int:
    """The seed of stage 6's bootstrap, from the run's seed (the one seed rule)."""
    return derive_seed(random_seed, "06", "bootstrap")


def statistics_from_run(run_dir: str | Path, random_seed: int) -> EvaluationStatistics:
    """Stage 6's statistics again from ``superni_evaluation/predictions_<model>.jsonl`` (same seed rule, same numbers)."""
    from refine_af_utils.files import read_jsonl

    predictions = {}
    for name in MODELS:
        path = RunLayout(run_dir).predictions(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the stage that writes it before stage 7")
        predictions[name] = pd.DataFrame(read_jsonl(path))
    return evaluation_statistics(predictions, bootstrap_seed(random_seed))
