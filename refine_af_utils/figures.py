"""Every stage's figures, drawn from its tables: the stage saves them in its folder, the report as ``fig_*.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from refine_af_utils.layout import MODELS
from refine_af_utils.reward import COMPONENTS


def component_histograms_figure(scores: pd.DataFrame, path: Path) -> Path:
    """One histogram per reward component (stage 2 and the report draw the same figure)."""
    from refine_af_utils.plots import histogram_grid, save_figure

    return save_figure(histogram_grid(scores, list(COMPONENTS), f"Reward components per instance (n = {len(scores)})"),
                       path)


def correlations_figure(correlations: pd.DataFrame, path: Path, instances: int) -> Path:
    """Heatmap of the components' correlations over ``instances`` instances (stated: few make them noisy)."""
    from refine_af_utils.plots import heatmap, save_figure

    return save_figure(heatmap(correlations, f"Correlation of reward components (n = {instances} instances)"), path)


def heldout_figure(summary: pd.DataFrame, path: Path, title: str) -> Path:
    """Each measure's paired difference with its 95% CI (stage 3 and the report draw the same figure)."""
    from refine_af_utils.plots import difference_chart, save_figure

    return save_figure(difference_chart(summary, title), path)


def reward_kl_figure(metrics: pd.DataFrame, algorithm: str, path: Path) -> Path:
    """The reward's parse and content terms, the KL penalty and the parsed share per update."""
    from refine_af_utils.plots import save_figure, two_panel_lines

    return save_figure(two_panel_lines(
        metrics, "update", ["reward", "content_reward", "unparsed_reward", "kl_penalty"], ["parsed_share"],
        f"{algorithm.upper()}: reward terms and KL penalty per update"), path)


def components_figure(metrics: pd.DataFrame, path: Path) -> Path:
    """Each reward component's mean over the parsed completions, per update."""
    from refine_af_utils.plots import line_chart, save_figure

    return save_figure(line_chart(metrics, "update", list(COMPONENTS),
                                  "Mean reward components of the parsed completions per update"), path)


def filter_counts_figure(counts: pd.DataFrame, path: Path) -> Path:
    """Bars of candidates per filter (stage 1 and the report draw the same figure)."""
    from refine_af_utils.plots import bar_chart, save_figure

    return save_figure(bar_chart(counts, "stage", "count", "Stage 1: candidates per filter"), path)


def novelty_figure(max_rouge_l: Sequence[float], threshold: float, path: Path) -> Path:
    """Histogram of each new instruction's highest ROUGE-L to the pool, with the rejection threshold."""
    from refine_af_utils.plots import histogram, save_figure

    return save_figure(histogram(
        max_rouge_l, "ROUGE-L of each new instruction to its most similar pool instruction",
        "max ROUGE-L F", bins=[i / 20 for i in range(21)], vline=threshold, vline_label="rejection threshold"), path)


def arm_comparison_figure(comparison: pd.DataFrame, path: Path) -> Path:
    """Each measure's REFINE-AF minus Self-Instruct difference with its CI, per instruction group."""
    from refine_af_utils.plots import difference_chart, save_figure

    return save_figure(difference_chart(comparison, "Stage 4: REFINE-AF minus Self-Instruct, paired by instruction, 95% CI"),
                       path)


def arm_rewards_figure(rewards: dict[str, Sequence[float]], path: Path) -> Path:
    """Both arms' reward distributions on shared bins (stage 4 and the report draw the same figure)."""
    from refine_af_utils.plots import overlaid_histograms, save_figure

    return save_figure(overlaid_histograms(rewards, "REFINE-AF reward of each arm's instances", "reward"), path)


MODEL_LABELS = {"base": "base model", "self_instruct": "Self-Instruct", "refine_af": "REFINE-AF"}


def yield_funnel_figure(counts: pd.DataFrame, path: Path) -> Path:
    """Stage 1's instructions, those with a kept instance and the kept instances, per arm (stage 4's
    ``yield_counts``; stage 4 and the report draw the same figure)."""
    from refine_af_utils.plots import count_bars, save_figure

    return save_figure(count_bars(counts, "Stage 4: from instructions to kept instances, per arm", MODEL_LABELS), path)


def lengths_figure(lengths: dict[str, dict[str, Sequence[int]]], path: Path) -> Path:
    """Words per non-empty input and per output of each arm's kept instances, every instance a dot."""
    from refine_af_utils.plots import save_figure, strip_panels

    panels = {f"{field} (non-empty)" if field == "input" else field: series for field, series in lengths.items()}
    return save_figure(strip_panels(panels, "Stage 4: length of each kept instance, per arm (median as a line)",
                                    "words", MODEL_LABELS, counts=True), path)


def sft_loss_figure(losses: pd.DataFrame, path: Path) -> Path:
    """The loss per step of each arm against the epoch (stage 5 and the report draw the same figure)."""
    from refine_af_utils.plots import grouped_lines, save_figure

    return save_figure(grouped_lines(losses, "epoch", "loss", "arm", "Stage 5: SFT loss on each arm's dataset"), path)


def evaluation_figure(name: str, statistics: Any, path: Path) -> Path:
    """Draw stage 6's ``task_forest`` (the headline: per-task REFINE-AF minus Self-Instruct ROUGE-L with its
    CI, sorted) or ``per_category`` (ROUGE-L per category and model with CIs) from its
    :class:`~refine_af_utils.comparison.EvaluationStatistics` (``tasks``, ``per_category``) to ``path``."""
    from refine_af_utils.plots import forest, grouped_intervals, save_figure

    if name == "task_forest":
        tasks = statistics.tasks.assign(label=[f"{t} ({c})" for t, c in zip(statistics.tasks["task"],
                                                                           statistics.tasks["category"])])
        wins, losses = int((tasks["delta"] > 0).sum()), int((tasks["delta"] < 0).sum())
        return save_figure(forest(
            tasks, "label", "delta", "ci_low", "ci_high",
            f"REFINE-AF minus Self-Instruct per task (n = {len(tasks)} tasks: {wins} above 0, {losses} below)",
            "ROUGE-L difference (x100) with its 95% CI over the task's instances", colour_by="significant"), path)
    if name == "per_category":
        rows = statistics.per_category
        rows = rows[(rows["metric"] == "rougeL") & rows["model"].isin(list(MODELS))]
        return save_figure(grouped_intervals(
            rows, "category", "model", "mean", "ci_low", "ci_high",
            "ROUGE-L per category and model (95% cluster bootstrap CIs)", "ROUGE-L (x100)", MODEL_LABELS), path)
    raise ValueError(f"unknown evaluation figure '{name}'")


EVALUATION_FIGURES = ("task_forest", "per_category")
