"""The paired bootstrap CI on cases computed by hand, and its determinism."""

import numpy as np
import pandas as pd
import pytest

from refine_af_utils.stats import paired_bootstrap_ci


def test_constant_differences_give_a_point_interval():
    ci = paired_bootstrap_ci([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], seed=0)
    assert (ci.mean, ci.low, ci.high, ci.instances) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5), 3)
    assert ci.clusters is None  # a plain bootstrap over pairs, not over clusters
    assert ci.excludes_zero()


def test_two_pairs_by_hand():
    # differences 0 and 1: a resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles of 10,000 resamples are 0 and 1, and the mean is 0.5.
    ci = paired_bootstrap_ci([0.0, 0.0], [0.0, 1.0], seed=3)
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.0, 1.0)
    assert not ci.excludes_zero()


def test_nan_pairs_are_left_out_and_lengths_must_match():
    ci = paired_bootstrap_ci([0.0, np.nan, 1.0], [1.0, 5.0, np.nan], seed=0)
    assert ci.instances == 1 and ci.mean == 1.0
    assert paired_bootstrap_ci([np.nan], [1.0], seed=0).instances == 0
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


def test_paired_summary_columns_count_pairs():
    from refine_af_utils.stats import paired_summary

    table = pd.DataFrame({"a": [0.0, 1.0, np.nan], "b": [1.0, 1.0, 2.0]})
    summary = paired_summary(table, {"m": ("a", "b")}, seed=0)
    assert list(summary.columns) == ["measure", "mean_difference", "ci_low", "ci_high", "pairs",
                                     "mean_before", "mean_after", "t_ci_low", "t_ci_high", "sign_flip_p"]
    assert summary.loc[0, "pairs"] == 2 and summary.loc[0, "mean_difference"] == 0.5
    # the means beside the difference are over its pairs: b's 2.0 has no pair and counts in neither (the
    # unpaired mean of b, 1.33, minus a's 0.5 would read as 0.83 beside a difference of 0.5)
    assert (summary.loc[0, "mean_before"], summary.loc[0, "mean_after"]) == (0.5, 1.0)
    assert summary.loc[0, "sign_flip_p"] == 1.0  # differences 1 and 0: both sign patterns of 1 reach the mean


def test_the_t_interval_is_students_over_the_pairs():
    from scipy import stats

    from refine_af_utils.stats import paired_summary, t_interval

    d = np.array([0.5, -0.1, 0.3, 0.2, 0.0, 0.4])
    low, high = t_interval(d)
    half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)  # by hand: mean +- t * SE
    assert (low, high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert np.isnan(t_interval([1.0])).all() and np.isnan(t_interval([0.2, 0.2])).all()
    table = pd.DataFrame({"a": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, np.nan], "b": [*d, 9.0]})  # the unpaired 9.0 is left out
    row = paired_summary(table, {"m": ("a", "b")}, seed=0).iloc[0]
    assert (row["t_ci_low"], row["t_ci_high"]) == pytest.approx((low, high))


def test_the_sign_flip_p_is_exact_for_few_pairs_and_close_to_the_t_test_for_many():
    from scipy import stats

    from refine_af_utils.stats import sign_flip_p

    assert sign_flip_p([0.3, 0.1, 0.2, 0.4, 0.5], seed=0) == 2 / 32  # all of one sign: 2 of 2^5 patterns
    assert sign_flip_p([0.1, -0.1, 0.2, -0.2], seed=0) == 1.0
    differences = np.random.default_rng(1).normal(0.5, 1.0, 40)
    p = sign_flip_p(differences, seed=3)
    assert p == sign_flip_p(differences, seed=3) and 0 < p < 0.01  # seeded; a clear effect
    assert p == pytest.approx(stats.ttest_1samp(differences, 0).pvalue, abs=0.002)


# --- the cluster bootstrap and the tests over tasks ---

from refine_af_utils.stats import (  # noqa: E402
    ClusterBootstrap,
    cluster_bootstrap_ci,
    critical_wins,
    min_detectable_share,
    paired_cluster_bootstrap_ci,
    sign_test,
    sign_test_power,
    tasks_improved_tests,
    wilcoxon_p,
    win_share_interval,
)


def test_sign_test_and_exact_interval_by_hand():
    assert sign_test(3, 7) == pytest.approx(0.34375)  # 2 * (1 + 10 + 45 + 120) / 1024
    low, high = win_share_interval(3, 12)
    assert low == pytest.approx(0.0549, abs=5e-4) and high == pytest.approx(0.5719, abs=5e-4)
    assert np.isnan(sign_test(0, 0)) and all(np.isnan(win_share_interval(0, 0)))


def test_sign_test_power_with_twelve_tasks():
    # P(X >= 10 | n=12, p=1/2) = 79/4096, two-sided 0.039 <= 0.05; 9/12 gives 0.146
    assert critical_wins(12) == 10
    assert sign_test_power(12, 0.65) == pytest.approx(0.1521, abs=1e-3)
    share = min_detectable_share(12)
    assert sign_test_power(12, share) == pytest.approx(0.8, abs=1e-6)
    assert sign_test_power(12, share - 0.01) < 0.8 < sign_test_power(12, share + 0.01)
    assert np.isnan(min_detectable_share(5))  # 5/5 gives p = 1/16 > 0.05: nothing is ever detected
    assert min_detectable_share(119) < share


def test_wilcoxon_by_hand():
    # five positive differences with distinct ranks: only 1 of 32 sign patterns is as extreme each way
    assert wilcoxon_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert wilcoxon_p([0, 0, 1, 2, 3, 4, 5]) == pytest.approx(2 / 32)  # zeros (ties) left out
    assert np.isnan(wilcoxon_p([0.0, 0.0]))


def test_tasks_improved_tests_on_the_issue_numbers():
    tests = tasks_improved_tests(3, 2, 7, [1, 2, 3, 0, 0, -1, -2, -3, -4, -5, -6, -7])
    assert tests["sign_test_p"] == pytest.approx(0.34375) and tests["critical_wins"] == 10
    assert tests["win_share"] == 0.25 and tests["win_share_ci_low"] == pytest.approx(0.0549, abs=5e-4)
    assert 0 < tests["wilcoxon_p"] < 1 and tests["min_detectable_win_share"] == pytest.approx(min_detectable_share(12))


def test_cluster_bootstrap_by_hand_weights_instances():
    # task a: one instance scoring 0; task b: three scoring 1. The mean over instances is 3/4.
    # Drawing two tasks: aa -> 0 (1/4), ab or ba -> 3/4 (1/2), bb -> 1 (1/4); instances within a task are constant.
    values, clusters = [0.0, 1.0, 1.0, 1.0], ["a", "b", "b", "b"]
    ci = cluster_bootstrap_ci(values, clusters, seed=1)
    assert (ci.mean, ci.low, ci.high, ci.instances, ci.clusters) == (0.75, 0.0, 1.0, 4, 2)
    replicates = ClusterBootstrap(np.array(values)[:, None], clusters, seed=1).replicates()[:, 0]
    assert set(np.round(replicates, 12)) == {0.0, 0.75, 1.0}
    assert np.mean(replicates == 0.75) == pytest.approx(0.5, abs=0.02)


def test_one_cluster_is_the_instance_bootstrap():
    ci = cluster_bootstrap_ci([0.0, 1.0], ["t", "t"], seed=3)  # as test_two_pairs_by_hand
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.0, 1.0)
    boot = ClusterBootstrap(np.array([[0.0], [1.0], [2.0], [2.0]]), ["t", "t", "u", "u"], seed=3)
    means, low, high = boot.cluster_intervals()
    assert boot.names == ("t", "u") and means[:, 0].tolist() == [0.5, 2.0]
    assert (low[0, 0], high[0, 0], low[1, 0], high[1, 0]) == (0.0, 1.0, 2.0, 2.0)


def test_paired_cluster_difference():
    ci = paired_cluster_bootstrap_ci([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5], ["a", "a", "b", "b"], seed=0)
    assert (ci.mean, ci.low, ci.high) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))
    assert ci.excludes_zero()
    with pytest.raises(ValueError, match="differ in length"):
        paired_cluster_bootstrap_ci([1.0], [1.0, 2.0], ["a"], seed=0)


def test_cluster_bootstrap_same_seed_same_interval():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(300, 2))
    clusters = np.repeat([f"task{i}" for i in range(10)], 30)
    first = ClusterBootstrap(values, clusters, seed=7).interval()
    assert first == ClusterBootstrap(values, clusters, seed=7).interval()
    assert first[0].low != ClusterBootstrap(values, clusters, seed=8).interval()[0].low
    # a task's own interval does not depend on which other tasks are present
    alone = ClusterBootstrap(values[:30], clusters[:30], seed=7).cluster_intervals()
    together = ClusterBootstrap(values, clusters, seed=7).cluster_intervals()
    assert np.array_equal(alone[1][0], together[1][0]) and np.array_equal(alone[2][0], together[2][0])
