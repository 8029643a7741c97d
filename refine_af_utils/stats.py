"""Statistics for comparisons between generators, arms and models: seeded, deterministic (numpy and scipy).

Paired bootstrap CIs (stages 3 and 4); a two-stage cluster bootstrap over tasks and instances, and
the tests over tasks (sign test, Wilcoxon, exact interval of the win share, power) for stage 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from refine_af_utils.seeding import derive_seed

BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A mean with a percentile bootstrap confidence interval, and what it was computed over.

    ``instances`` counts the values the mean is over: for a paired difference
    (:func:`paired_bootstrap_ci`), the pairs where both sides are finite. ``clusters`` counts the
    clusters (tasks) of a two-stage cluster bootstrap; None for a plain bootstrap over pairs.
    """

    mean: float
    low: float
    high: float
    instances: int
    clusters: Optional[int] = None
    level: float = 0.95

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0."""
        return self.low > 0 or self.high < 0


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], seed: int,
                        resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> Interval:
    """The mean of ``b - a`` over pairs where both are finite, with a seeded percentile bootstrap CI.

    The result's ``instances`` is the number of pairs used; ``clusters`` is None.

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
        return Interval(float("nan"), float("nan"), float("nan"), 0, level=level)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[indices].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(diff.mean()), float(low), float(high), int(diff.size), level=level)


def sign_flip_p(differences: Sequence[float], seed: int, draws: int = BOOTSTRAP_RESAMPLES) -> float:
    """Two-sided sign-flip permutation p of a mean paired difference (H0: each difference is as likely
    negated): exact over all 2^n sign patterns for n <= 16, else over ``draws`` seeded random patterns (with
    the observed one counted). NaN without pairs."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return float("nan")
    observed = abs(d.mean())
    if d.size <= 16:
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
        means = np.abs((signs * d).mean(axis=1))
        return float((means >= observed - 1e-12).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(draws, d.size))
    means = np.abs((signs * d).mean(axis=1))
    return float((1 + (means >= observed - 1e-12).sum()) / (draws + 1))


def t_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of ``differences`` (NaN with fewer than 2, or with no spread)."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2 or not d.std(ddof=1) > 0:
        return float("nan"), float("nan")
    low, high = stats.t.interval(level, d.size - 1, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(d.size))
    return float(low), float(high)


def paired_summary(table: pd.DataFrame, pairs: dict[str, tuple[str, str]], seed: int) -> pd.DataFrame:
    """Mean paired difference (second - first column) with a 95% bootstrap CI for each named measure.

    ``mean_before`` and ``mean_after`` are over the same pairs as the difference (both sides finite), so
    ``mean_after - mean_before == mean_difference`` always; a row undefined on one side counts in neither.
    Beside the bootstrap CI: Student's t interval over the same differences (``t_ci_low``, ``t_ci_high``) and
    the two-sided sign-flip permutation p.
    """
    rows = []
    for name, (before, after) in pairs.items():
        a, b = table[before].to_numpy(dtype=np.float64), table[after].to_numpy(dtype=np.float64)
        both = np.isfinite(a) & np.isfinite(b)
        ci = paired_bootstrap_ci(a, b, seed=derive_seed(seed, "ci", name))
        differences = b[both] - a[both]
        rows.append({"measure": name, "mean_difference": ci.mean, "ci_low": ci.low, "ci_high": ci.high,
                     "pairs": ci.instances, "mean_before": float(a[both].mean()) if both.any() else float("nan"),
                     "mean_after": float(b[both].mean()) if both.any() else float("nan"),
                     **dict(zip(("t_ci_low", "t_ci_high"), t_interval(differences))),
                     "sign_flip_p": sign_flip_p(differences, derive_seed(seed, "sign-flip", name))})
    return pd.DataFrame(rows)


# --- Cluster bootstrap over tasks and instances, and tests over tasks (stage 6 and the report) ---

SIGNIFICANCE_LEVEL = 0.05  # alpha of the two-sided tests over tasks
TARGET_POWER = 0.8         # the power at which the smallest detectable win share is given
_CHUNK_DRAWS = 1 << 21     # resampled indices held in memory at once (bounds memory, not results)


def _percentiles(replicates: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail], axis=axis)
    return low, high


class ClusterBootstrap:
    """A two-stage (cluster) bootstrap of instance means: resample clusters, then instances within them.

    ``values`` is an ``(instances, columns)`` array (one column per model and metric, or a paired
    difference), ``clusters`` names each instance's cluster (a task). The statistic is the mean over
    all instances of a resample, as Tk-Instruct's overall score is a mean over instances, so a task
    counts with its number of instances.

    Stage 2 first: for every cluster, ``resamples`` resamples of its instances with replacement
    (seeded by ``(seed, cluster name)``, so a task's draws do not depend on which other tasks are
    present). They give each cluster's own percentile interval (:meth:`cluster_intervals`).
    Stage 1 (:meth:`interval`): each replicate draws as many clusters as there are, with
    replacement, and each drawn cluster contributes one of its stage-2 resamples picked at random
    (a Monte Carlo draw from the same two-stage distribution; a cluster drawn twice gets two
    independent picks). All columns share the same draws, so a difference column is paired.
    """

    def __init__(self, values: np.ndarray | Sequence[Sequence[float]], clusters: Sequence[Any], seed: int,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> None:

        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        labels = np.asarray([str(c) for c in clusters])
        if values.ndim != 2 or len(labels) != len(values):
            raise ValueError(f"values {values.shape} and clusters ({len(labels)}) must have one row per instance")
        if not np.isfinite(values).all():
            raise ValueError("values must be finite (drop undefined instances before bootstrapping)")
        self.seed, self.resamples = int(seed), int(resamples)
        self.names: tuple[str, ...] = tuple(sorted(set(labels.tolist())))
        self.sizes = np.zeros(len(self.names), dtype=np.int64)
        self.sums = np.zeros((len(self.names), values.shape[1]))
        self.within = np.zeros((len(self.names), self.resamples, values.shape[1]))
        for t, name in enumerate(self.names):
            block = values[labels == name]
            n = len(block)
            self.sizes[t], self.sums[t] = n, block.sum(axis=0)
            rng = np.random.default_rng(derive_seed(self.seed, "cluster_bootstrap", "within", name))
            step = max(1, _CHUNK_DRAWS // n)
            for start in range(0, self.resamples, step):
                rows = min(step, self.resamples - start)
                idx = rng.integers(0, n, size=(rows, n), dtype=np.uint16 if n < (1 << 16) else np.int64)
                offsets = (n * np.arange(rows, dtype=np.int64 if rows * n >= (1 << 31) else np.int32))[:, None]
                counts = np.bincount((idx + offsets).ravel(), minlength=rows * n)  # draws per instance, per row
                self.within[t, start:start + rows] = counts.reshape(rows, n).astype(np.float64) @ block

    def cluster_intervals(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per cluster (rows, in :attr:`names` order) and column: mean, low and high of an instance bootstrap."""
        means = self.within / self.sizes[:, None, None]
        low, high = _percentiles(means, level, axis=1)
        return self.sums / self.sizes[:, None], low, high

    def replicates(self, clusters: Sequence[str] | None = None, key: str = "all") -> np.ndarray:
        """``(resamples, columns)`` two-stage bootstrap means over ``clusters`` (all when None).

        ``key`` names the selection in the seed, so two selections draw independently.
        """

        index = np.arange(len(self.names)) if clusters is None else np.array(
            [self.names.index(str(c)) for c in clusters], dtype=np.int64)
        if index.size == 0:
            raise ValueError("no clusters to resample")
        rng = np.random.default_rng(derive_seed(self.seed, "cluster_bootstrap", "clusters", str(key)))
        chosen = index[rng.integers(0, index.size, size=(self.resamples, index.size))]
        picks = rng.integers(0, self.resamples, size=(self.resamples, index.size))
        out = np.empty((self.resamples, self.sums.shape[1]))
        step = max(1, _CHUNK_DRAWS // (index.size * self.sums.shape[1]))
        for start in range(0, self.resamples, step):
            rows = slice(start, start + step)
            totals = self.within[chosen[rows], picks[rows]].sum(axis=1)
            out[rows] = totals / self.sizes[chosen[rows]].sum(axis=1)[:, None]
        return out

    def interval(self, clusters: Sequence[str] | None = None, key: str = "all",
                 level: float = 0.95) -> list[Interval]:
        """Per column: the mean over the instances of ``clusters`` with its two-stage bootstrap interval."""
        index = [self.names.index(str(c)) for c in clusters] if clusters is not None else list(range(len(self.names)))
        n = int(self.sizes[index].sum())
        means = self.sums[index].sum(axis=0) / n
        low, high = _percentiles(self.replicates(clusters, key), level)
        return [Interval(float(m), float(lo), float(hi), n, len(index), level) for m, lo, hi in zip(means, low, high)]


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence[Any], seed: int,
                         resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> Interval:
    """The mean over all instances with a two-stage (clusters, then instances) bootstrap CI."""
    return ClusterBootstrap(np.asarray(values, dtype=np.float64)[:, None], clusters, seed, resamples).interval(
        level=level)[0]


def paired_cluster_bootstrap_ci(a: Sequence[float], b: Sequence[float], clusters: Sequence[Any], seed: int,
                                resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> Interval:
    """The mean of ``b - a`` over paired instances with a two-stage bootstrap CI (pairs resampled together)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    return cluster_bootstrap_ci(b - a, clusters, seed, resamples, level)


def win_share_interval(wins: int, tasks: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of the win share ``wins / tasks``; NaNs with no tasks."""
    from scipy.stats import binomtest

    if tasks <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(wins), int(tasks)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of ``wins`` among ``wins + losses`` (ties left out); NaN with none."""
    from scipy.stats import binomtest

    if wins + losses <= 0:
        return float("nan")
    return float(binomtest(int(wins), int(wins + losses), p=0.5, alternative="two-sided").pvalue)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the differences (zeros left out); NaN with none."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d) & (d != 0)]
    if d.size == 0:
        return float("nan")
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def sign_test_rejections(n: int, alpha: float = SIGNIFICANCE_LEVEL) -> np.ndarray:
    """The win counts ``k`` out of ``n`` for which the two-sided sign test rejects at ``alpha``."""
    from scipy.stats import binomtest

    return np.array([k for k in range(n + 1) if binomtest(k, n, p=0.5).pvalue <= alpha], dtype=np.int64)


def critical_wins(n: int, alpha: float = SIGNIFICANCE_LEVEL) -> int | None:
    """The fewest wins out of ``n`` that a two-sided sign test at ``alpha`` calls better than chance."""
    upper = [int(k) for k in sign_test_rejections(n, alpha) if 2 * k > n]
    return min(upper) if upper else None


def sign_test_power(n: int, true_share: float, alpha: float = SIGNIFICANCE_LEVEL) -> float:
    """Exact power of the two-sided sign test on ``n`` tasks when each is won with probability ``true_share``."""
    from scipy.stats import binom

    rejections = sign_test_rejections(n, alpha)
    return float(binom.pmf(rejections, n, true_share).sum()) if rejections.size else 0.0


def min_detectable_share(n: int, alpha: float = SIGNIFICANCE_LEVEL, power: float = TARGET_POWER) -> float:
    """The smallest true win share above 1/2 that ``n`` tasks detect with ``power`` (two-sided sign test).

    NaN when even a share of 1 is not detected with that power (too few tasks). Power rises with
    the share above 1/2, so the root is found by bisection (Brent's method).
    """
    from scipy.optimize import brentq

    if n <= 0 or sign_test_power(n, 1.0, alpha) < power:
        return float("nan")
    return float(brentq(lambda p: sign_test_power(n, p, alpha) - power, 0.5, 1.0, xtol=1e-9))


def tasks_improved_tests(wins: int, ties: int, losses: int, differences: Sequence[float],
                         alpha: float = SIGNIFICANCE_LEVEL, power: float = TARGET_POWER,
                         level: float = 0.95) -> dict[str, float | int | None]:
    """The tasks-improved share with its exact interval, the sign and Wilcoxon tests, and the test's power.

    The win share is ``wins / tasks`` (ties count as not won, as in "improves on X% of tasks"); the
    sign test uses wins among wins and losses; the Wilcoxon test uses the per-task differences
    (``differences``, ties given as 0 are left out); the detectable share is for ``tasks`` tasks.
    """
    tasks = wins + ties + losses
    low, high = win_share_interval(wins, tasks, level)
    return {
        "win_share": wins / tasks if tasks else float("nan"),
        "win_share_ci_low": low, "win_share_ci_high": high,
        "sign_test_p": sign_test(wins, losses),
        "wilcoxon_p": wilcoxon_p(differences),
        "alpha": alpha, "power": power,
        "critical_wins": critical_wins(tasks, alpha) if tasks else None,
        "min_detectable_win_share": min_detectable_share(tasks, alpha, power),
    }
