"""The numbers behind an experiment report: summaries, paired comparisons and HD95 pooling.

Unit of analysis: one row = one (initialisation, K, draw, seed, test case) of results.csv, a
mapping with the keys "init", "K", "draw", "seed", "case", one per organ and "mean" (the
per-case mean over organs); a missing value is None.

Summary: for each initialisation and K, mean and sample standard deviation (ddof = 1) of each
column over the rows.

Paired comparison of initialisation A with baseline B at the same K: rows are matched on
(draw, seed, case), so both saw the same labelled cases, seed and test case. With the
n differences ``d_i = Dice_A,i - Dice_B,i``:

- mean difference ``mean(d)``;
- Wilcoxon signed-rank test of ``d`` (``scipy.stats.wilcoxon``, two-sided, zero differences
  dropped, exact distribution for small n without ties);
- percentile bootstrap 95% interval of ``mean(d)``: R resamples of the n differences with
  replacement (``numpy.random.default_rng(seed)``, vectorised), the 2.5th and 97.5th
  percentiles of the R resampled means.

The conservative per-run view first averages each fine-tuned run (draw, seed) over the cases
both sides have, then pairs the runs.

Rows sharing a draw/seed are not independent (same fine-tuned model across test cases), so
the per-case tests treat test-case variation as if it were independent: read them as a
description of consistency, not as a population claim (docs/EXPERIMENTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

#: {(init, K): {column: (mean, std, n)}}, what :func:`summary` returns
SummaryTable = dict[tuple[str, int], dict[str, tuple[float, float, int]]]


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences ``(n,)``.

    ``scipy.stats.wilcoxon(d).pvalue``: the statistic is the smaller of the rank sums of the
    positive and of the negative differences (zeros dropped); exact null distribution for
    small n without ties, normal approximation otherwise. All-zero differences give p = 1 (no
    evidence of a difference); n = 0 gives NaN.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return math.nan
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d).pvalue)


def bootstrap_mean_ci(differences: Sequence[float], resamples: int = 10000, seed: int = 0,
                      confidence: float = 0.95, chunk: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` ``(n,)``.

    Draws an ``(R, n)`` index matrix, R = ``resamples`` (in chunks of ``chunk`` rows), from
    ``np.random.default_rng(seed)``; the r-th resampled mean is ``mean_j d[idx[r, j]]``.
    Returns the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (numpy's
    linear interpolation) of those R means as (low, high). Deterministic for a given seed.
    n = 0 gives (NaN, NaN); n = 1 gives (d, d).

    ``scipy.stats.bootstrap(..., method="percentile", batch=chunk)`` draws the same resamples,
    but how it interpolates the quantiles has changed between scipy versions (1.17 through
    ``scipy.stats.quantile``, which differs from numpy's in the last bits); numpy's quantile
    keeps an interval, its printed sign near 0 ("-0.000") and the "excludes 0" mark
    independent of the installed scipy.
    """
    if resamples < 1:
        raise ValueError(f"Illegal resamples {resamples}: need >= 1")
    if not 0 < confidence < 1:
        raise ValueError(f"Illegal confidence {confidence}: need 0 < c < 1")
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = 10000,
                      seed: int = 0) -> dict[str, float]:
    """Paired comparison of matched values ``a`` and ``b``, both ``(n,)``.

    With ``d = a - b``: ``mean(d)``, its :func:`bootstrap_mean_ci` (``resamples``, ``seed``,
    95%) and :func:`wilcoxon_p`. Returns {"n", "mean_diff", "ci_low", "ci_high",
    "p_wilcoxon"} (mean_diff NaN when n = 0).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need the same 1D shape, got {a.shape} and {b.shape}")
    d = a - b
    low, high = bootstrap_mean_ci(d, resamples, seed)
    return {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan,
            "ci_low": low, "ci_high": high, "p_wilcoxon": wilcoxon_p(d)}


def summary(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> SummaryTable:
    """Mean and sample standard deviation per (initialisation, K) and column.

    For the n rows of (init, K) with a value in ``column``: ``mean = sum(x) / n`` and
    ``std = sqrt(sum((x - mean)^2) / (n - 1))`` (NaN when n < 2; mean NaN when n = 0).
    Returns ``{(init, K): {column: (mean, std, n)}}``.
    """
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["init"], int(row["K"])), []).append(row)
    out: SummaryTable = {}
    for key, group in groups.items():
        out[key] = {}
        for col in columns:
            values = np.array([r[col] for r in group if r[col] is not None], dtype=np.float64)
            mean = float(values.mean()) if values.size else math.nan
            std = float(values.std(ddof=1)) if values.size > 1 else math.nan
            out[key][col] = (mean, std, int(values.size))
    return out


def _by_case(rows: Sequence[Mapping[str, Any]], init: str, k: int, column: str
             ) -> dict[tuple, float]:
    """``{(draw, seed, case): value}`` of ``column`` for ``init`` at K = ``k`` (None dropped)."""
    return {(r["draw"], r["seed"], r["case"]): r[column] for r in rows
            if r["init"] == init and int(r["K"]) == k and r[column] is not None}


def paired_values(rows: Sequence[Mapping[str, Any]], init: str, baseline: str, k: int,
                  column: str) -> tuple[np.ndarray, np.ndarray]:
    """Matched ``(n,)`` float64 arrays of ``column`` for ``init`` and ``baseline`` at K = ``k``.

    Paired on (draw, seed, case), in sorted key order; pairs where either value is missing
    are dropped, so n is the number of (draw, seed, case) both sides have.
    """
    a, b = _by_case(rows, init, k, column), _by_case(rows, baseline, k, column)
    keys = sorted(set(a) & set(b))
    return (np.array([a[key] for key in keys], dtype=np.float64),
            np.array([b[key] for key in keys], dtype=np.float64))


def paired_run_values(rows: Sequence[Mapping[str, Any]], init: str, baseline: str, k: int,
                      column: str) -> tuple[np.ndarray, np.ndarray]:
    """Matched ``(runs,)`` arrays: one value per fine-tuned run (draw, seed).

    For run r with C_r the cases that both ``init`` and ``baseline`` have (so both sides
    average the same cases): ``a_r = mean_{c in C_r} value_init(r, c)``, likewise ``b_r``;
    runs in sorted (draw, seed) order.

    One value per fine-tuned run is the conservative analysis: the pairs are independent up to
    the labelled cases a draw shares (docs/EXPERIMENTS.md).
    """
    a, b = _by_case(rows, init, k, column), _by_case(rows, baseline, k, column)
    runs: dict[tuple, list[tuple]] = {}
    for key in sorted(set(a) & set(b)):
        runs.setdefault(key[:2], []).append(key)
    return (np.array([np.mean([a[key] for key in keys]) for keys in runs.values()]),
            np.array([np.mean([b[key] for key in keys]) for keys in runs.values()]))


def per_seed_differences(rows: Sequence[Mapping[str, Any]], init: str, baseline: str, k: int,
                         column: str = "mean") -> dict[int, float]:
    """Mean paired difference per seed at K = ``k``: whether a difference has the same sign
    for every (pre-training) seed.

    For seed s with P_s its (draw, case) pairs that both sides have:
    ``mean_{p in P_s} (value_init(p) - value_baseline(p))``. Returns ``{seed: difference}``
    in ascending seed order (seeds without a pair left out).
    """
    a, b = _by_case(rows, init, k, column), _by_case(rows, baseline, k, column)
    by_seed: dict[int, list[float]] = {}
    for key in sorted(set(a) & set(b)):
        by_seed.setdefault(int(key[1]), []).append(a[key] - b[key])
    return {seed: float(np.mean(d)) for seed, d in sorted(by_seed.items())}


def _pairs(inits: Sequence[str], baselines: Sequence[str], ks: Sequence[int]
           ) -> Iterator[tuple[str, str, int]]:
    """(init, baseline, K) of every initialisation against every other baseline, in the
    reports' order: by baseline, then initialisation, then K."""
    for baseline in baselines:
        for init in inits:
            if init == baseline:
                continue
            for k in ks:
                yield init, baseline, k


def comparisons(rows: Sequence[Mapping[str, Any]], inits: Sequence[str], baselines: Sequence[str],
                ks: Sequence[int], columns: Sequence[str], resamples: int = 10000, seed: int = 0,
                per_run: bool = False) -> list[dict[str, Any]]:
    """:func:`paired_difference` of every initialisation against every baseline, per K and
    column (comparisons without a pair left out).

    per_run: pair per fine-tuned run (:func:`paired_run_values`) instead of per case
    (:func:`paired_values`). Returns one dict per comparison: {"init", "baseline", "K",
    "column", "n", "mean_diff", "ci_low", "ci_high", "p_wilcoxon"}.
    """
    pairing = paired_run_values if per_run else paired_values
    out = []
    for init, baseline, k in _pairs(inits, baselines, ks):
        for col in columns:
            a, b = pairing(rows, init, baseline, k, col)
            if a.size == 0:
                continue
            out.append({"init": init, "baseline": baseline, "K": k, "column": col,
                        **paired_difference(a, b, resamples, seed)})
    return out


def seed_agreement(rows: Sequence[Mapping[str, Any]], inits: Sequence[str],
                   baselines: Sequence[str], ks: Sequence[int], column: str = "mean"
                   ) -> list[dict[str, Any]]:
    """:func:`per_seed_differences` of every initialisation against every baseline per K,
    and whether all of them have the same strict sign (all > 0 or all < 0; a zero breaks
    agreement). Returns [{"init", "baseline", "K", "differences": {seed: d}, "same_sign"}],
    comparisons without a pair left out."""
    out = []
    for init, baseline, k in _pairs(inits, baselines, ks):
        diffs = per_seed_differences(rows, init, baseline, k, column)
        if not diffs:
            continue
        same = all(d > 0 for d in diffs.values()) or all(d < 0 for d in diffs.values())
        out.append({"init": init, "baseline": baseline, "K": k, "differences": diffs,
                    "same_sign": same})
    return out


def hd95_summary(result: Mapping[str, Any]) -> dict[str, dict[str, float | int | None]]:
    """HD95 per organ of one evaluation result (``SegmentationMetrics.result()``).

    For organ o, over the n scored cases (HD95 not None): mean and median (mm), None when
    n = 0; capped = missed + false-positive cases (those are given the field-of-view
    diagonal). Returns ``{organ: {"mean", "median", "capped", "n"}}``.
    """
    out = {}
    for organ in result["organs"]:
        values = [c[organ]["hd95_mm"] for c in result["cases"].values()
                  if c[organ]["hd95_mm"] is not None]
        counts = result["counts"][organ]
        out[organ] = {"mean": float(np.mean(values)) if values else None,
                      "median": float(np.median(values)) if values else None,
                      "capped": counts["missed"] + counts["false_positive"], "n": len(values)}
    return out


def pooled_hd95(results: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """HD95 pooled over every scored (case, organ) of several evaluation results (the cells
    of one initialisation and K).

    Mean and median (mm) over all n scored values (None when n = 0); capped = missed + false
    positives summed over results and organs. Returns {"mean", "median", "capped", "n"}.
    """
    values, capped = [], 0
    for result in results:
        for organ in result["organs"]:
            values += [c[organ]["hd95_mm"] for c in result["cases"].values()
                       if c[organ]["hd95_mm"] is not None]
            capped += result["counts"][organ]["missed"] + result["counts"][organ]["false_positive"]
    return {"mean": float(np.mean(values)) if values else None,
            "median": float(np.median(values)) if values else None,
            "capped": capped, "n": len(values)}
