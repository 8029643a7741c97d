"""The paired bootstrap CI on cases computed by hand, and its determinism."""

import numpy as np
import pytest

from refine_af_utils.stats import paired_bootstrap_ci


def test_constant_differences_give_a_point_interval():
    ci = paired_bootstrap_ci([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], seed=0)
    assert (ci.mean, ci.low, ci.high, ci.pairs) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5), 3)
    assert ci.excludes_zero()


def test_two_pairs_by_hand():
    # differences 0 and 1: a resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles of 10,000 resamples are 0 and 1, and the mean is 0.5.
    ci = paired_bootstrap_ci([0.0, 0.0], [0.0, 1.0], seed=3)
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.0, 1.0)
    assert not ci.excludes_zero()


def test_nan_pairs_are_left_out_and_lengths_must_match():
    ci = paired_bootstrap_ci([0.0, np.nan, 1.0], [1.0, 5.0, np.nan], seed=0)
    assert ci.pairs == 1 and ci.mean == 1.0
    assert paired_bootstrap_ci([np.nan], [1.0], seed=0).pairs == 0
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci([1.0], [1.0, 2.0], seed=0)


def test_same_seed_same_interval_other_seed_other_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(0.3, size=40)
    assert paired_bootstrap_ci(a, b, seed=11) == paired_bootstrap_ci(a, b, seed=11)
    assert paired_bootstrap_ci(a, b, seed=11).low != paired_bootstrap_ci(a, b, seed=12).low
    ci = paired_bootstrap_ci(a, b, seed=11)
    se = np.std(b - a, ddof=1) / np.sqrt(40)
    assert ci.low == pytest.approx(ci.mean - 1.96 * se, abs=0.05)  # close to the normal interval
