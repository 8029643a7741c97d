"""Statistics for comparisons between generators and arms: seeded, deterministic, numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedDifference:
    """Mean of paired differences (b - a) with a percentile bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    pairs: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0."""
        return self.low > 0 or self.high < 0

    def as_row(self, name: str) -> dict[str, float | int | str]:
        """A table row: the measure's name, the mean difference, the interval and the number of pairs."""
        return {"measure": name, "mean_difference": self.mean, "ci_low": self.low, "ci_high": self.high,
                "pairs": self.pairs}


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], seed: int,
                        resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> PairedDifference:
    """The mean of ``b - a`` over pairs where both are finite, with a seeded percentile bootstrap CI.

    Pairs are resampled with replacement ``resamples`` times; the interval holds the central
    ``level`` share of the resampled means (numpy's linear percentile). NaN pairs (a measure
    undefined for one side, e.g. content reward with nothing parsed) are left out.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = b[keep] - a[keep]
    if diff.size == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0, level)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[indices].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), int(diff.size), level)
