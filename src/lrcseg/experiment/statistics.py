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

The primary endpoint (:func:`run_comparisons`) is therefore per run: with the n per-run
differences ``d_r`` (each run averaged over its cases first), the mean, a Student t 95%
interval (:func:`t_interval`), an exact sign-flip p (:func:`sign_flip_p`) beside the bootstrap
and Wilcoxon, the t-interval over pre-training seeds (each seed's runs averaged first) and an
equivalence reading (:func:`tost`, two one-sided t-tests with a margin).

Labelled sets: two draws of one K may pick the same cases; :func:`duplicate_draws` finds them
from the rows' "labelled_set" values and :func:`drop_draws` keeps the first draw only, so a
labelled set counts once in every table. Rows may carry a "phase" (the test case's contrast
phase); :func:`phases` lists them.

Compute-to-reach (:func:`compute_to_reach`): per run, the steps after which its learning curve
first reaches a fraction of the reference's (scratch's) final mean Dice at that K
(:func:`steps_to_reach`, linear interpolation between snapshots).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import t as student_t
from scipy.stats import ttest_1samp, wilcoxon

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
    runs = _paired_runs(rows, init, baseline, k, column)
    return (np.array([a for a, _ in runs.values()], dtype=np.float64),
            np.array([b for _, b in runs.values()], dtype=np.float64))


def _paired_runs(rows: Sequence[Mapping[str, Any]], init: str, baseline: str, k: int,
                 column: str) -> dict[tuple, tuple[float, float]]:
    """``{(draw, seed): (a_r, b_r)}`` of :func:`paired_run_values`, in sorted (draw, seed) order."""
    a, b = _by_case(rows, init, k, column), _by_case(rows, baseline, k, column)
    runs: dict[tuple, list[tuple]] = {}
    for key in sorted(set(a) & set(b)):
        runs.setdefault(key[:2], []).append(key)
    return {run: (float(np.mean([a[key] for key in keys])), float(np.mean([b[key] for key in keys])))
            for run, keys in runs.items()}


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


# --------------------------------------------------------------------------- per-run endpoint


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student t interval of the mean of ``values`` ``(n,)``.

    ``mean ± t_{(1 + confidence) / 2, n - 1} · s / sqrt(n)`` with s the sample standard
    deviation (ddof = 1), t the quantile of Student's t with n - 1 degrees of freedom
    (``scipy.stats.t.ppf``). n < 2 gives (NaN, NaN); n values all equal give (mean, mean).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"Illegal confidence {confidence}: need 0 < c < 1")
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    half = student_t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


#: sign-flip tests enumerate all 2^n sign assignments up to this n, sample them above it
SIGN_FLIP_EXACT_MAX_N = 20


def sign_flip_p(differences: Sequence[float], flips: int = 100_000, seed: int = 0,
                exact_max_n: int = SIGN_FLIP_EXACT_MAX_N, chunk: int = 1 << 16) -> float:
    """Two-sided sign-flip (permutation) p-value of paired differences ``d`` ``(n,)``.

    Under the null "init and baseline are exchangeable within each pair", every sign vector
    ``s in {-1, +1}^n`` is equally likely; the statistic is ``T(s) = |sum_i s_i d_i|`` and
    ``p = #{s : T(s) >= T(1)} / #s``. For n <= ``exact_max_n`` all 2^n sign vectors are
    enumerated (exact; by the symmetry T(s) = T(-s), the 2^(n-1) with s_1 = +1, in chunks of
    ``chunk``). Above it, ``flips`` random sign vectors ``(flips, n)`` from
    ``np.random.default_rng(seed)`` give ``p = (1 + #{T(s) >= T(1)}) / (1 + flips)`` (the
    observed assignment counted once, so p > 0). Ties are counted with a relative tolerance of
    1e-9 of ``sum |d|``. All-zero differences give p = 1; n = 0 gives NaN.
    ``scipy.stats.permutation_test(..., permutation_type="samples")`` gives the same exact p,
    about 100 times slower at n = 20.
    """
    if flips < 1:
        raise ValueError(f"Illegal flips {flips}: need >= 1")
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return math.nan
    observed = abs(d.sum())
    threshold = observed - 1e-9 * np.abs(d).sum()
    if d.size <= exact_max_n:
        n_free = d.size - 1  # s_1 = +1; the other half of the assignments mirrors these
        bits = np.arange(n_free)
        hits = 0
        for start in range(0, 1 << n_free, chunk):
            codes = np.arange(start, min(start + chunk, 1 << n_free))
            signs = 1.0 - 2.0 * ((codes[:, None] >> bits) & 1)
            hits += int(np.count_nonzero(np.abs(d[0] + signs @ d[1:]) >= threshold))
        return hits / (1 << n_free)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, flips, chunk):
        signs = rng.choice((-1.0, 1.0), size=(min(chunk, flips - start), d.size))
        hits += int(np.count_nonzero(np.abs(signs @ d) >= threshold))
    return (1 + hits) / (1 + flips)


def tost(differences: Sequence[float], margin: float, alpha: float = 0.05) -> dict[str, Any]:
    """Equivalence of paired differences ``d`` ``(n,)`` within ``±margin``: two one-sided t-tests.

    H0- "mean <= -margin" against "mean > -margin" and H0+ "mean >= +margin" against
    "mean < +margin" (``scipy.stats.ttest_1samp``, n - 1 degrees of freedom);
    ``p_tost = max(p-, p+)``, equivalence concluded when ``p_tost < alpha``. ``bound`` is the
    equivalence bound the data support: the smallest margin for which TOST concludes at this
    alpha, ``max(|low|, |high|)`` of the ``1 - 2 alpha`` t interval. Returns {"margin",
    "p_tost", "equivalent", "bound"}; n < 2 gives NaN p and bound, not equivalent.
    """
    if margin <= 0:
        raise ValueError(f"Illegal equivalence margin {margin}: need > 0")
    if not 0 < alpha < 0.5:
        raise ValueError(f"Illegal alpha {alpha}: need 0 < alpha < 0.5")
    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2:
        return {"margin": margin, "p_tost": math.nan, "equivalent": False, "bound": math.nan}
    if np.all(d == d[0]):  # no spread: the t statistic is infinite, the answer is the mean
        p = 0.0 if abs(d[0]) < margin else 1.0
        return {"margin": margin, "p_tost": p, "equivalent": p < alpha, "bound": abs(float(d[0]))}
    p_lower = float(ttest_1samp(d, -margin, alternative="greater").pvalue)
    p_upper = float(ttest_1samp(d, margin, alternative="less").pvalue)
    low, high = t_interval(d, 1 - 2 * alpha)
    p = max(p_lower, p_upper)
    return {"margin": margin, "p_tost": p, "equivalent": p < alpha,
            "bound": max(abs(low), abs(high))}


def seed_means(run_differences: Mapping[tuple, float]) -> dict[int, float]:
    """``{seed: mean of its runs' differences}`` from ``{(draw, seed): d_r}``, ascending seeds:
    the unit for an interval over pre-training seeds (n = number of seeds)."""
    by_seed: dict[int, list[float]] = {}
    for (_, seed), d in run_differences.items():
        by_seed.setdefault(int(seed), []).append(d)
    return {seed: float(np.mean(v)) for seed, v in sorted(by_seed.items())}


def run_comparisons(rows: Sequence[Mapping[str, Any]], inits: Sequence[str],
                    baselines: Sequence[str], ks: Sequence[int], column: str = "mean",
                    margin: float = 0.02, resamples: int = 10000, seed: int = 0,
                    flips: int = 100_000) -> list[dict[str, Any]]:
    """The primary endpoint: per-run paired differences of every initialisation against every
    baseline per K (comparisons without a pair left out).

    Runs are paired on (draw, seed) and averaged over the cases both sides have
    (:func:`paired_run_values`; drop duplicate labelled sets first, :func:`drop_draws`, so a
    draw stands for its labelled set). With the n per-run differences d_r: "mean_diff",
    :func:`t_interval` ("t_low", "t_high"), :func:`sign_flip_p` ("p_sign_flip", exact for
    n <= SIGN_FLIP_EXACT_MAX_N, else ``flips`` Monte Carlo flips from ``seed``), the bootstrap
    interval and Wilcoxon p of :func:`paired_difference` ("ci_low", "ci_high", "p_wilcoxon"),
    the t interval over pre-training seeds of :func:`seed_means` ("seeds", "seed_low",
    "seed_high") and :func:`tost` with ``margin`` ("margin", "p_tost", "equivalent", "bound").
    """
    out = []
    for init, baseline, k in _pairs(inits, baselines, ks):
        runs = _paired_runs(rows, init, baseline, k, column)
        if not runs:
            continue
        a = np.array([v[0] for v in runs.values()])
        b = np.array([v[1] for v in runs.values()])
        d = a - b
        t_low, t_high = t_interval(d)
        by_seed = seed_means({run: float(x) for run, x in zip(runs, d, strict=True)})
        seed_low, seed_high = t_interval(list(by_seed.values()))
        out.append({"init": init, "baseline": baseline, "K": k, "column": column,
                    **paired_difference(a, b, resamples, seed), "t_low": t_low,
                    "t_high": t_high, "p_sign_flip": sign_flip_p(d, flips, seed),
                    "seeds": len(by_seed), "seed_low": seed_low, "seed_high": seed_high,
                    **tost(d, margin)})
    return out


# --------------------------------------------------------------------------- labelled sets, phases


def labelled_sets(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[int, int], str]:
    """``{(K, draw): labelled set}`` from the rows' "labelled_set" values (the sorted ids of
    the K training cases joined by "+"); rows without one are left out."""
    return {(int(r["K"]), int(r["draw"])): r["labelled_set"] for r in rows
            if r.get("labelled_set")}


def duplicate_draws(sets: Mapping[tuple[int, int], str]) -> dict[tuple[int, int], int]:
    """``{(K, draw): earlier draw}`` for every draw whose labelled set an earlier draw of the
    same K already has (the first draw, in ascending order, is the one kept)."""
    first: dict[tuple[int, str], int] = {}
    out = {}
    for (k, draw), cases in sorted(sets.items()):
        kept = first.setdefault((k, cases), draw)
        if kept != draw:
            out[(k, draw)] = kept
    return out


def drop_draws(rows: Sequence[Mapping[str, Any]], duplicates: Mapping[tuple[int, int], int]
               ) -> list[Mapping[str, Any]]:
    """The rows whose (K, draw) is not a duplicate (:func:`duplicate_draws`)."""
    return [r for r in rows if (int(r["K"]), int(r["draw"])) not in duplicates]


def phases(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The contrast phases the rows record ("phase", empty/None = not recorded), sorted."""
    return sorted({r["phase"] for r in rows if r.get("phase")})


# --------------------------------------------------------------------------- learning curves


def mean_curves(curves: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (initialisation, K): mean Dice over runs at each step, on the steps every run of
    it has.

    curves: one per run, {"init", "K", "draw", "seed", "points": [(step, mean Dice)]} (each run
    averaged over its cases). Returns [{"init", "K", "runs", "points": [(step, mean)],
    "last_doubling"}] in first-seen order; last_doubling = mean at the last step minus the
    mean at half of it (the previous step if half is not a snapshot; NaN with one step).
    """
    groups: dict[tuple[str, int], list[dict[int, float]]] = {}
    for c in curves:
        groups.setdefault((c["init"], int(c["K"])), []).append(dict(c["points"]))
    out = []
    for (init, k), runs in groups.items():
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        if not steps:
            continue
        points = [(s, float(np.mean([r[s] for r in runs]))) for s in steps]
        means = dict(points)
        half = means.get(steps[-1] // 2, points[-2][1] if len(points) > 1 else math.nan)
        out.append({"init": init, "K": k, "runs": len(runs), "points": points,
                    "last_doubling": points[-1][1] - half})
    return out


def steps_to_reach(points: Sequence[tuple[int, float]], target: float) -> float | None:
    """The first step at which a learning curve ``[(step, Dice)]`` reaches ``target``.

    Linear interpolation between the last snapshot below the target and the first at or
    above it: ``s0 + (target - v0) (s1 - s0) / (v1 - v0)``. A curve whose first snapshot is
    already there gives that snapshot's step (an upper bound: nothing earlier was measured);
    one that never reaches it gives None.
    """
    points = sorted(points)
    for i, (step, value) in enumerate(points):
        if value >= target:
            if i == 0:
                return float(step)
            s0, v0 = points[i - 1]
            return float(s0 + (target - v0) * (step - s0) / (value - v0))
    return None


def compute_to_reach(curves: Sequence[Mapping[str, Any]], final_step: int,
                     reference: str = "scratch", fraction: float = 0.9) -> dict[str, Any]:
    """Steps each run needs to reach ``fraction`` of the reference's final mean Dice at its K.

    curves: one per run, as :func:`mean_curves` reads them. The target at K is ``fraction ×``
    the mean over the reference's runs of their Dice at ``final_step`` (K without such a run
    has no target). Per run: :func:`steps_to_reach` (None = not reached). Per
    (initialisation, K): runs, reached, mean steps over the runs that reached it with its
    :func:`t_interval`, and against the reference, paired on (draw, seed) over the pairs
    where both reached: n, mean difference in steps and its t interval.
    Returns {"targets": {K: target}, "runs": [{"init", "K", "draw", "seed", "steps",
    "upper_bound" (reached at the first snapshot)}],
    "summary": [{"init", "K", "runs", "reached", "mean_steps", "low", "high", "pairs",
    "diff", "diff_low", "diff_high"}]}.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"Illegal reach fraction {fraction}: need 0 < f <= 1")
    finals: dict[int, list[float]] = {}
    for c in curves:
        final = dict(c["points"]).get(final_step)
        if c["init"] == reference and final is not None:
            finals.setdefault(int(c["K"]), []).append(final)
    targets = {k: fraction * float(np.mean(v)) for k, v in sorted(finals.items())}
    runs = []
    for c in curves:
        if int(c["K"]) in targets:
            reached = steps_to_reach(c["points"], targets[int(c["K"])])
            runs.append({"init": c["init"], "K": int(c["K"]), "draw": c["draw"], "seed": c["seed"],
                         "steps": reached, "upper_bound": reached == min(c["points"])[0]})
    steps = {(r["init"], r["K"], r["draw"], r["seed"]): r["steps"] for r in runs}
    summary_rows = []
    for init, k in dict.fromkeys((r["init"], r["K"]) for r in runs):
        mine = {key[2:]: s for key, s in steps.items() if key[:2] == (init, k)}
        reached = [s for s in mine.values() if s is not None]
        ref = {key[2:]: s for key, s in steps.items() if key[:2] == (reference, k)}
        diffs = [s - ref[run] for run, s in sorted(mine.items())
                 if s is not None and ref.get(run) is not None]
        low, high = t_interval(reached)
        diff_low, diff_high = t_interval(diffs)
        summary_rows.append({
            "init": init, "K": k, "runs": len(mine), "reached": len(reached),
            "mean_steps": float(np.mean(reached)) if reached else math.nan, "low": low,
            "high": high, "pairs": len(diffs),
            "diff": float(np.mean(diffs)) if diffs else math.nan,
            "diff_low": diff_low, "diff_high": diff_high})
    return {"targets": targets, "runs": runs, "summary": summary_rows}


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
