"""Figures: saved as PNG with no timestamps in their metadata, so reruns give identical bytes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG without software or time metadata; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)  # pipelines make many figures; the notebooks show the saved PNGs
    return path


def histogram(
    values: Sequence[float], title: str, xlabel: str, bins: int | Sequence[float] = 20,
    vline: float | None = None, vline_label: str | None = None,
) -> plt.Figure:
    """A labelled histogram, optionally with a vertical threshold line."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(np.asarray(values, dtype=float), bins=bins, color="#4C72B0", edgecolor="white")
    if vline is not None:
        ax.axvline(vline, color="#C44E52", linestyle="--", label=vline_label)
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    return fig


def bar_chart(table: pd.DataFrame, label_column: str, value_column: str, title: str) -> plt.Figure:
    """Horizontal bars, one per row of ``table``, first row on top."""
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(table) + 1.2))
    ax.barh(table[label_column][::-1], table[value_column][::-1], color="#55A868")
    for y, value in enumerate(table[value_column][::-1]):
        ax.text(value, y, f" {value}", va="center", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(value_column)
    fig.tight_layout()
    return fig


def histogram_grid(table: pd.DataFrame, columns: Sequence[str], title: str, bins: int = 20) -> plt.Figure:
    """One histogram per column, two per row."""
    rows = (len(columns) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(9, 3 * rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        ax.hist(table[column].astype(float), bins=bins, color="#4C72B0", edgecolor="white")
        ax.set_title(column)
        ax.set_ylabel("count")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def heatmap(matrix: pd.DataFrame, title: str) -> plt.Figure:
    """A square matrix (e.g. correlations in [-1, 1]) with its values written in the cells."""
    fig, ax = plt.subplots(figsize=(1.2 * len(matrix) + 2, 1.1 * len(matrix) + 1.5))
    image = ax.imshow(matrix.values, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix.index)), matrix.index)
    for i in range(len(matrix.index)):
        for j in range(len(matrix.columns)):
            value = matrix.values[i, j]
            ax.text(j, i, "nan" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def line_chart(table: pd.DataFrame, x: str, columns: Sequence[str], title: str) -> plt.Figure:
    """One line per column against ``x``, each on its own y-axis panel."""
    fig, axes = plt.subplots(len(columns), 1, figsize=(6, 1.9 * len(columns) + 0.6), sharex=True, squeeze=False)
    for ax, column in zip(axes[:, 0], columns):
        ax.plot(table[x], table[column], marker="o", color="#4C72B0")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x)
    _integer_ticks_for_counts(axes[-1, 0], table[x])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _integer_ticks_for_counts(ax: plt.Axes, values: pd.Series) -> None:
    """Whole-number ticks on the x axis when ``values`` are whole numbers (updates, steps: no 1.5)."""
    from matplotlib.ticker import MaxNLocator

    numbers = pd.to_numeric(values, errors="coerce").dropna()
    if len(numbers) and (numbers == numbers.round()).all():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def overlaid_histograms(series: dict[str, Sequence[float]], title: str, xlabel: str, bins: int = 20) -> plt.Figure:
    """Histograms of several named samples on shared bins, side by side in one panel."""
    values = [np.asarray(v, dtype=float) for v in series.values()]
    everything = np.concatenate(values) if values else np.zeros(0)
    edges = np.histogram_bin_edges(everything, bins=bins) if everything.size else bins
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.hist(values, bins=edges, label=[f"{k} (mean {np.mean(v):.3f})" for k, v in series.items()])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    return fig


def grouped_lines(table: pd.DataFrame, x: str, y: str, group: str, title: str) -> plt.Figure:
    """One line of ``y`` against ``x`` per value of ``group``, in one panel."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for name, rows in table.groupby(group, sort=False):
        ax.plot(rows[x], rows[y], marker=".", label=str(name))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def grouped_bars(table: pd.DataFrame, title: str, xlabel: str) -> plt.Figure:
    """Horizontal grouped bars: one group per row of ``table``, one bar per column."""
    labels = list(table.index)[::-1]
    height = 0.8 / max(len(table.columns), 1)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(table) * len(table.columns) + 1.5))
    positions = np.arange(len(labels))
    for offset, column in enumerate(table.columns):
        ax.barh(positions + offset * height, table[column].to_numpy()[::-1], height=height, label=str(column))
    ax.set_yticks(positions + height * (len(table.columns) - 1) / 2, labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def two_panel_lines(table: pd.DataFrame, x: str, top: Sequence[str], bottom: Sequence[str], title: str) -> plt.Figure:
    """Two stacked line charts sharing the x axis (e.g. reward terms above, a share below)."""
    fig, (upper, lower) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[2, 1])
    for axis, columns in ((upper, top), (lower, bottom)):
        for column in columns:
            axis.plot(table[x], table[column], marker="o", markersize=3, label=column)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    upper.set_title(title)
    lower.set_xlabel(x)
    _integer_ticks_for_counts(lower, table[x])
    fig.tight_layout()
    return fig


def difference_chart(summary: pd.DataFrame, title: str) -> plt.Figure:
    """Mean differences with their confidence intervals: one panel per measure (own scale), a zero line.

    ``summary`` has ``measure``, ``mean_difference``, ``ci_low`` and ``ci_high`` columns, and
    optionally ``group``: one row per group inside each panel.
    """
    measures = list(dict.fromkeys(summary["measure"]))
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures) + 1, 0.45 * summary.shape[0] + 2),
                             squeeze=False)
    for axis, measure in zip(axes[0], measures):
        rows = summary[summary["measure"] == measure]
        labels = list(rows["group"]) if "group" in rows else [measure]
        positions = np.arange(len(rows))[::-1]
        means = rows["mean_difference"].to_numpy(dtype=float)
        errors = np.vstack([means - rows["ci_low"].to_numpy(dtype=float),
                            rows["ci_high"].to_numpy(dtype=float) - means])
        axis.errorbar(means, positions, xerr=errors, fmt="o", color="#4C72B0", capsize=4)
        axis.axvline(0, color="#C44E52", linestyle="--", linewidth=1)
        axis.set_yticks(positions)
        axis.set_yticklabels(labels if axis is axes[0][0] else [""] * len(labels))
        axis.set_title(measure, fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("mean paired difference (95% bootstrap CI)", fontsize=9)
    fig.tight_layout()
    return fig


def spread_by_group(table: pd.DataFrame, group: str, columns: Sequence[str], titles: Mapping[str, str],
                    references: Mapping[str, float], title: str, within: str | None = None) -> plt.Figure:
    """One panel per column: per value of ``group``, each row as a dot (with its ``<column>_ci_low`` to
    ``<column>_ci_high`` bar where the table has them) and their mean as a line; a dotted reference line
    at ``references[column]`` (default 0). With ``within`` (e.g. the seed), a group's rows stand side by side
    in that column's order, each labelled with its value under the axis, instead of on one x position."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.9), squeeze=False)
    groups = list(dict.fromkeys(table[group]))
    for ax, key in zip(axes[0], columns):
        minor_positions, minor_labels = [], []
        for i, name in enumerate(groups):
            part = table[table[group] == name]
            if within is not None:
                part = part.sort_values(within)
            width = 0.5 if within is not None and len(part) > 1 else 0.0
            xs = [i - width / 2 + width * n / max(len(part) - 1, 1) for n in range(len(part))]
            values = part[key].astype(float)
            ax.scatter(xs, values, color="tab:blue", alpha=0.7, s=18)
            low, high = f"{key}_ci_low", f"{key}_ci_high"
            if low in part and high in part:
                for x, lo, hi in zip(xs, part[low].astype(float), part[high].astype(float)):
                    if math.isfinite(lo) and math.isfinite(hi):
                        ax.plot([x, x], [lo, hi], color="tab:blue", alpha=0.25, linewidth=3)
            if values.notna().any():
                ax.hlines(values.mean(), i - 0.35, i + 0.35, color="black")
            if within is not None:
                minor_positions += xs
                minor_labels += [str(v) for v in part[within]]
        ax.axhline(references.get(key, 0.0), color="grey", linestyle=":", linewidth=1)
        if within is None:
            ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right")
        else:  # the rows' own labels as ticks, the group names under them
            ax.set_xticks(minor_positions, minor_labels, fontsize=7)
            for i, name in enumerate(groups):
                ax.text(i, -0.12, name, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=9)
        ax.set_title(titles.get(key, key), fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def density_histograms(samples: Sequence[tuple[str, Sequence[float], float]], title: str, xlabel: str,
                       bins: int = 20) -> plt.Figure:
    """Density histograms of labelled samples, ``(label, values, alpha)``, over each other, with a dotted zero line."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values, alpha in samples:
        ax.hist(values, bins=bins, alpha=alpha, label=label, density=True)
    ax.axvline(0.0, color="grey", linestyle=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


OUTCOME_COLOURS = {"win": "#55A868", "loss": "#C44E52", "no": "#8C8C8C"}


def forest(table: pd.DataFrame, label: str, estimate: str, low: str, high: str, title: str, xlabel: str,
           colour_by: str | None = None, note: str = "") -> plt.Figure:
    """A forest plot: one row per row of ``table``, sorted by ``estimate`` (largest on top), its interval as a
    horizontal line, a zero line; rows coloured by ``colour_by`` (``win`` / ``loss`` / other) when given."""
    rows = table.sort_values([estimate, label], ascending=[True, False]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.6))
    positions = np.arange(len(rows))
    colours = [OUTCOME_COLOURS.get(str(v), OUTCOME_COLOURS["no"]) for v in
               (rows[colour_by] if colour_by else ["no"] * len(rows))]
    values = rows[estimate].to_numpy(dtype=float)
    ax.hlines(positions, rows[low].to_numpy(dtype=float), rows[high].to_numpy(dtype=float), colors=colours,
              linewidth=2)
    ax.scatter(values, positions, color=colours, zorder=3, s=22)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(positions, [str(v) for v in rows[label]], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if colour_by:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, marker="o", linewidth=2, label=n) for n, c in
                   (("CI above 0", OUTCOME_COLOURS["win"]), ("CI below 0", OUTCOME_COLOURS["loss"]),
                    ("CI includes 0", OUTCOME_COLOURS["no"]))]
        ax.legend(handles=handles, fontsize=8, loc="lower right")
    if note:
        fig.text(0.01, 0.0, note, fontsize=7, va="top")
    fig.tight_layout()
    return fig


def grouped_intervals(table: pd.DataFrame, group: str, series: str, estimate: str, low: str, high: str,
                      title: str, xlabel: str, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Per ``group`` (a row band), one point with its interval per ``series`` (offset within the band)."""
    groups = list(dict.fromkeys(table[group]))[::-1]
    names = list(dict.fromkeys(table[series]))
    step = 0.7 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(groups) * max(len(names), 1) * 0.6 + 1.6))
    for k, name in enumerate(names):
        rows = table[table[series] == name].set_index(group).reindex(groups)
        y = np.arange(len(groups)) + (k - (len(names) - 1) / 2) * step
        ax.hlines(y, rows[low].to_numpy(dtype=float), rows[high].to_numpy(dtype=float), color=f"C{k}", linewidth=2)
        ax.scatter(rows[estimate].to_numpy(dtype=float), y, color=f"C{k}", s=18, zorder=3,
                   label=(labels or {}).get(name, name))
    ax.set_yticks(np.arange(len(groups)), groups, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def count_bars(counts: pd.DataFrame, title: str, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Horizontal bars of counts, one group per row (top to bottom in the table's order), one bar per column,
    each labelled with its integer value; an integer axis."""
    from matplotlib.ticker import MaxNLocator

    labels = labels or {}
    rows, columns = list(counts.index), list(counts.columns)
    height = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.55 * len(rows) * max(len(columns), 1) * 0.6))
    for j, column in enumerate(columns):
        positions = [i + (j - (len(columns) - 1) / 2) * height for i in range(len(rows))]
        values = counts[column].astype(int).tolist()
        bars = ax.barh(positions, values, height=height * 0.95, label=labels.get(column, column))
        ax.bar_label(bars, labels=[str(v) for v in values], padding=2, fontsize=8)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, max(1, int(counts.to_numpy().max())) * 1.15)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def strip_panels(panels: Mapping[str, Mapping[str, Sequence[float]]], title: str, ylabel: str,
                 labels: Mapping[str, str] | None = None, seed: int = 0, counts: bool = False) -> plt.Figure:
    """One panel per entry of ``panels``; in each, every value of each series as a jittered dot (small n is
    shown whole, not binned), its median as a line, and n in the tick label; ``counts``: an integer axis
    from 0."""
    from matplotlib.ticker import MaxNLocator

    labels = labels or {}
    rng = np.random.default_rng(seed)  # jitter only: the same picture on every draw
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        names = list(series)
        for i, name in enumerate(names):
            values = np.asarray(series[name], dtype=float)
            if values.size:
                ax.scatter(i + rng.uniform(-0.15, 0.15, values.size), values, s=14, alpha=0.6)
                ax.hlines(np.median(values), i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(names)), [f"{labels.get(n, n)}\n(n={len(series[n])})" for n in names], fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(panel, fontsize=9)
        ax.set_ylabel(ylabel)
        if counts:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, max([1.0, *[max(v) for v in series.values() if len(v)]]) * 1.1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
