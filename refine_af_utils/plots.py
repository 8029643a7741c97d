"""Figures: saved as PNG with no timestamps in their metadata, so reruns give identical bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
