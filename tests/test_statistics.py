"""The experiment report's statistics (lrcseg.experiment.statistics) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import paired_result_rows
from scipy.stats import wilcoxon

from lrcseg.experiment.statistics import (
    bootstrap_mean_ci,
    comparisons,
    hd95_summary,
    paired_difference,
    paired_run_values,
    paired_values,
    per_seed_differences,
    pooled_hd95,
    seed_agreement,
    summary,
    wilcoxon_p,
)


def test_wilcoxon_matches_scipy_and_the_exact_distribution():
    d = [0.05, -0.01, 0.03, 0.07, 0.02, -0.025, 0.04, 0.06]
    assert wilcoxon_p(d) == pytest.approx(wilcoxon(d).pvalue)
    # Six positive differences with distinct ranks: the exact two-sided p is 2 / 2**6.
    assert wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx(2 / 64)
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(wilcoxon_p([]))


def test_bootstrap_interval_by_hand_and_deterministic():
    # Two values {0, 1}: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% quantiles of many resamples are 0 and 1.
    assert bootstrap_mean_ci([0.0, 1.0], resamples=10000, seed=3) == (0.0, 1.0)
    assert bootstrap_mean_ci([0.2] * 7, resamples=500) == pytest.approx((0.2, 0.2))
    assert bootstrap_mean_ci([0.3], resamples=100) == (0.3, 0.3)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))
    rng = np.random.default_rng(0)
    d = 0.03 + 0.05 * rng.standard_normal(60)
    low, high = bootstrap_mean_ci(d, resamples=10000, seed=7)
    assert low < d.mean() < high
    # The normal-theory interval mean +/- 1.96 s / sqrt(n) is close to the percentile one.
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert low == pytest.approx(d.mean() - half, abs=0.25 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.25 * half)
    assert bootstrap_mean_ci(d, resamples=10000, seed=7) == (low, high)
    assert bootstrap_mean_ci(d, resamples=10000, seed=8) != (low, high)
    # Chunking does not change the draws' use: the same seed and chunking gives the same.
    assert bootstrap_mean_ci(d, 3000, seed=1, chunk=1000) == bootstrap_mean_ci(d, 3000, seed=1, chunk=1000)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci(d, confidence=1.5)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean_ci(d, resamples=0)


def test_bootstrap_draws_the_resamples_scipy_draws():
    # scipy.stats.bootstrap (percentile, same batch) resamples the same indices from the same
    # generator; only its quantile interpolation may differ in the last bits.
    from scipy.stats import bootstrap

    d = np.random.default_rng(4).normal(0.01, 0.05, 23)
    ref = bootstrap((d,), np.mean, n_resamples=5000, batch=2000, vectorized=True,
                    method="percentile", random_state=np.random.default_rng(11))
    low, high = bootstrap_mean_ci(d, resamples=5000, seed=11, chunk=2000)
    assert low == pytest.approx(ref.confidence_interval.low, rel=1e-12)
    assert high == pytest.approx(ref.confidence_interval.high, rel=1e-12)


def test_paired_difference_values():
    a = [0.80, 0.70, 0.90, 0.60]
    b = [0.75, 0.72, 0.80, 0.50]
    r = paired_difference(a, b, resamples=2000, seed=0)
    assert r["n"] == 4
    assert r["mean_diff"] == pytest.approx((0.05 - 0.02 + 0.10 + 0.10) / 4)
    assert r["p_wilcoxon"] == pytest.approx(wilcoxon(np.subtract(a, b)).pvalue)
    assert r["ci_low"] <= r["mean_diff"] <= r["ci_high"]
    with pytest.raises(ValueError, match="same 1D shape"):
        paired_difference([1.0, 2.0], [1.0])


def _rows():
    return paired_result_rows()


def test_summary_mean_and_sample_std_by_hand():
    table = summary(_rows(), ["liver", "mean"])
    mean, std, n = table[("A", 1)]["liver"]
    assert (mean, n) == (pytest.approx(0.7), 3)  # None is left out
    assert std == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / 2)
    mean, std, n = table[("B", 1)]["mean"]
    assert mean == pytest.approx(0.5333333) and n == 3
    assert std == pytest.approx(np.std([0.4, 0.6, 0.6], ddof=1))


def test_pairs_match_on_draw_seed_case():
    a, b = paired_values(_rows(), "A", "B", 1, "liver")
    np.testing.assert_allclose(a, [0.5, 0.7, 0.9])
    np.testing.assert_allclose(b, [0.4, 0.6, 0.6])
    (r,) = comparisons(_rows(), ["A", "B"], ["B"], [1], ["mean"], resamples=1000)
    assert (r["init"], r["baseline"], r["n"]) == ("A", "B", 3)
    assert r["mean_diff"] == pytest.approx((0.1 + 0.1 + 0.3) / 3)


def test_per_run_pairs_average_the_same_cases_on_both_sides():
    a, b = paired_run_values(_rows(), "A", "B", 1, "mean")
    # draw 0: both have c1 and c2; draw 1: A lacks c2, so B's c2 is left out as well.
    np.testing.assert_allclose(a, [(0.5 + 0.7) / 2, 0.9])
    np.testing.assert_allclose(b, [(0.4 + 0.6) / 2, 0.6])
    (r,) = comparisons(_rows(), ["A", "B"], ["B"], [1], ["mean"], resamples=1000, per_run=True)
    assert r["n"] == 2 and r["mean_diff"] == pytest.approx((0.1 + 0.3) / 2)


def test_per_seed_differences_and_their_sign_agreement():
    rows = _rows() + [{**r, "seed": 1, "mean": r["mean"] if r["init"] == "A" else 0.95}
                      for r in _rows() if r["mean"] is not None]
    # seed 0: pairs (0, c1) +0.1, (0, c2) +0.1, (1, c1) +0.3; seed 1: B is 0.95 everywhere.
    diffs = per_seed_differences(rows, "A", "B", 1)
    assert list(diffs) == [0, 1]
    assert diffs[0] == pytest.approx(0.5 / 3)
    assert diffs[1] == pytest.approx(((0.5 - 0.95) + (0.7 - 0.95) + (0.9 - 0.95)) / 3)
    (r,) = seed_agreement(rows, ["A", "B"], ["B"], [1, 2])  # K = 2 has no pair: left out
    assert (r["init"], r["baseline"], r["K"], r["same_sign"]) == ("A", "B", 1, False)
    (r,) = seed_agreement(_rows(), ["A", "B"], ["B"], [1])
    assert r["same_sign"] and r["differences"] == pytest.approx({0: 0.5 / 3})


def _hd95_result(liver, spleen, missed):
    return {"organs": ["liver", "spleen"],
            "cases": {"a": {"liver": {"hd95_mm": liver}, "spleen": {"hd95_mm": spleen}}},
            "counts": {"liver": {"missed": 0, "false_positive": 0},
                       "spleen": {"missed": missed, "false_positive": 0}}}


def test_pooled_hd95_counts_caps_and_takes_the_median_over_cells():
    pooled = pooled_hd95([_hd95_result(2.0, 500.0, 1), _hd95_result(4.0, None, 0)])
    assert pooled == {"mean": (2.0 + 500.0 + 4.0) / 3, "median": 4.0, "capped": 1, "n": 3}
    assert pooled_hd95([]) == {"mean": None, "median": None, "capped": 0, "n": 0}


def test_hd95_summary_per_organ():
    h = hd95_summary(_hd95_result(2.0, None, 1))
    assert h["liver"] == {"mean": 2.0, "median": 2.0, "capped": 0, "n": 1}
    assert h["spleen"] == {"mean": None, "median": None, "capped": 1, "n": 0}
