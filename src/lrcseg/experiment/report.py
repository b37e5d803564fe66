"""Tables, paired statistics and figures of an experiment (``results.csv`` -> ``report.md``).

Unit of analysis: one row of results.csv = one (initialisation, K, draw, seed, test case).

Summary: for each initialisation and K, mean +/- sample standard deviation (ddof = 1) of the
Dice over the rows, per organ and for the per-case mean over organs ("mean").

Paired comparison of initialisation A with baseline B at the same K: rows are matched on
(draw, seed, case), so both saw the same labelled cases, seed and test case. With the
n differences ``d_i = Dice_A,i - Dice_B,i``:

- mean difference ``mean(d)``;
- Wilcoxon signed-rank test of ``d`` (``scipy.stats.wilcoxon``, two-sided, zero differences
  dropped, exact distribution for small n without ties);
- percentile bootstrap 95% interval of ``mean(d)``: R resamples of the n differences with
  replacement (``numpy.random.default_rng(seed)``, vectorised), the 2.5th and 97.5th
  percentiles of the R resampled means.

Note that rows sharing a draw/seed are not independent (same fine-tuned model across test
cases), so the tests treat test-case variation as if it were independent: read them as a
description of consistency, not as a population claim.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.stats import wilcoxon

from lrcseg.config import ExperimentConfig, to_dict
from lrcseg.io_utils import atomic_write_text
from lrcseg.viz import new_figure, overlay_labels, save_figure, show_image

KEY_COLUMNS = ("init", "K", "draw", "seed", "case")


# --------------------------------------------------------------------------- statistics


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences ``(n,)``.

    All-zero differences give p = 1 (no evidence of a difference); n = 0 gives NaN.
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

    Draws an ``(R, n)`` index matrix (in chunks of ``chunk`` rows) from
    ``np.random.default_rng(seed)``, takes each row's mean and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those R means.
    Deterministic for a given seed. n = 0 gives (NaN, NaN).
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
    """Paired comparison of matched values ``a`` and ``b`` ``(n,)``: mean of a - b, its
    bootstrap 95% interval and the Wilcoxon p-value. Returns {"n", "mean_diff", "ci_low",
    "ci_high", "p_wilcoxon"}."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need the same 1D shape, got {a.shape} and {b.shape}")
    d = a - b
    low, high = bootstrap_mean_ci(d, resamples, seed)
    return {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan,
            "ci_low": low, "ci_high": high, "p_wilcoxon": wilcoxon_p(d)}


def summary(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
            ) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """``{(init, K): {column: (mean, std, n)}}`` over the rows with a value in that column;
    std is the sample standard deviation (ddof = 1), NaN when n < 2."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["init"], int(row["K"])), []).append(row)
    out: dict[tuple[str, int], dict[str, tuple[float, float, int]]] = {}
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
    """Matched ``(n,)`` arrays of ``column`` for ``init`` and ``baseline`` at K = ``k``, paired
    on (draw, seed, case); pairs where either value is missing are dropped."""
    a, b = _by_case(rows, init, k, column), _by_case(rows, baseline, k, column)
    keys = sorted(set(a) & set(b))
    return (np.array([a[key] for key in keys], dtype=np.float64),
            np.array([b[key] for key in keys], dtype=np.float64))


def paired_run_values(rows: Sequence[Mapping[str, Any]], init: str, baseline: str, k: int,
                      column: str) -> tuple[np.ndarray, np.ndarray]:
    """Matched ``(runs,)`` arrays: per (draw, seed), the mean of ``column`` over the cases that
    both ``init`` and ``baseline`` have (so both sides average the same cases).

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
    """``{seed: mean over its (draw, case) pairs of init - baseline}`` at K = ``k``: whether a
    difference has the same sign for every (pre-training) seed."""
    a, b = _by_case(rows, init, k, column), _by_case(rows, baseline, k, column)
    by_seed: dict[int, list[float]] = {}
    for key in sorted(set(a) & set(b)):
        by_seed.setdefault(int(key[1]), []).append(a[key] - b[key])
    return {seed: float(np.mean(d)) for seed, d in sorted(by_seed.items())}


def comparisons(rows: Sequence[Mapping[str, Any]], inits: Sequence[str], baselines: Sequence[str],
                ks: Sequence[int], columns: Sequence[str], resamples: int = 10000, seed: int = 0,
                per_run: bool = False) -> list[dict[str, Any]]:
    """:func:`paired_difference` of every initialisation against every baseline, per K and
    column; one dict per comparison with "init", "baseline", "K", "column" added.
    per_run: pair per fine-tuned run (:func:`paired_run_values`) instead of per case."""
    pairing = paired_run_values if per_run else paired_values
    out = []
    for baseline in baselines:
        for init in inits:
            if init == baseline:
                continue
            for k in ks:
                for col in columns:
                    a, b = pairing(rows, init, baseline, k, col)
                    if a.size == 0:
                        continue
                    out.append({"init": init, "baseline": baseline, "K": k, "column": col,
                                **paired_difference(a, b, resamples, seed)})
    return out


# --------------------------------------------------------------------------- results.csv


def read_results_csv(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of results.csv with typed values (empty cells -> None) and the organ columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        organs = [c for c in header if c not in KEY_COLUMNS and c != "mean"]
        rows = []
        for raw in reader:
            row: dict[str, Any] = {"init": raw["init"], "K": int(raw["K"]),
                                   "draw": int(raw["draw"]), "seed": int(raw["seed"]),
                                   "case": raw["case"]}
            for col in [*organs, "mean"]:
                row[col] = float(raw[col]) if raw[col] != "" else None
            rows.append(row)
    return rows, organs


# --------------------------------------------------------------------------- tables


#: how HD95 is computed, stated in every report that shows it
HD95_CONVENTION = (
    "HD95 (mm) is the larger of the two directed 95th-percentile surface distances "
    "(reference to prediction and back), as MONAI computes it; medpy's `hd95` pools both "
    "directions into one percentile, which reads lower on noisy masks. A missed organ or a pure false positive has no distance and is given the "
    "case's field-of-view diagonal (the cap), so the mean mixes caps with real distances: "
    "read it beside the median and the count of capped values.")


def hd95_summary(result: Mapping[str, Any]) -> dict[str, dict[str, float | int | None]]:
    """Per organ of an evaluation result (``SegmentationMetrics.result()``): HD95 mean and
    median (mm) over the scored cases, and how many of them are capped (missed organs and
    false positives): ``{organ: {"mean", "median", "capped", "n"}}``."""
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
    """HD95 over every scored (case, organ) of several evaluation results (the cells of one
    initialisation and K): {"mean", "median" (mm), "capped" (missed + false positives), "n"}."""
    values, capped = [], 0
    for result in results:
        for organ in result["organs"]:
            values += [c[organ]["hd95_mm"] for c in result["cases"].values()
                       if c[organ]["hd95_mm"] is not None]
            capped += result["counts"][organ]["missed"] + result["counts"][organ]["false_positive"]
    return {"mean": float(np.mean(values)) if values else None,
            "median": float(np.median(values)) if values else None,
            "capped": capped, "n": len(values)}


def hd95_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """rows: {"init", "K", "cells", "mean", "median", "capped", "n"} -> a markdown table."""
    lines = ["| init | K | cells | HD95 mean (mm) | HD95 median (mm) | capped / scored |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mean = "-" if r["mean"] is None else f"{r['mean']:.1f}"
        median = "-" if r["median"] is None else f"{r['median']:.1f}"
        lines.append(f"| {r['init']} | {r['K']} | {r['cells']} | {mean} | {median} | "
                     f"{r['capped']} / {r['n']} |")
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def summary_markdown(table: dict[tuple[str, int], dict[str, tuple[float, float, int]]],
                     inits: Sequence[str], ks: Sequence[int], columns: Sequence[str]) -> str:
    """Markdown: one row per (initialisation, K), mean ± std per column, n rows."""
    lines = ["| init | K | n | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for k in ks:
        for init in inits:
            if (init, k) not in table:
                continue
            cells = table[(init, k)]
            n = max(v[2] for v in cells.values())
            lines.append(f"| {init} | {k} | {n} | "
                         + " | ".join(_pm(*cells[c][:2]) for c in columns) + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _p(p: float) -> str:
    return "—" if math.isnan(p) else (f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}")


def comparisons_markdown(results: Sequence[Mapping[str, Any]], column: str) -> str:
    """Markdown of the comparisons of one column: Δ mean, 95% CI, Wilcoxon p, n."""
    lines = ["| K | init | baseline | n | Δ Dice | bootstrap 95% CI | Wilcoxon p |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["column"] != column:
            continue
        if r["n"] < 2:  # one pair: no interval and no test
            lines.append(f"| {r['K']} | {r['init']} | {r['baseline']} | {r['n']} | "
                         f"{r['mean_diff']:+.3f} | — | — |")
            continue
        excl = " *" if r["ci_low"] > 0 or r["ci_high"] < 0 else ""
        lines.append(f"| {r['K']} | {r['init']} | {r['baseline']} | {r['n']} | "
                     f"{r['mean_diff']:+.3f}{excl} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
                     f"{_p(r['p_wilcoxon'])} |")
    return "\n".join(lines)


def organ_comparisons_markdown(results: Sequence[Mapping[str, Any]], organs: Sequence[str]) -> str:
    """Markdown: per (K, init, baseline), Δ Dice [95% CI] for each organ."""
    by_pair: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for r in results:
        by_pair.setdefault((r["K"], r["init"], r["baseline"]), {})[r["column"]] = r
    lines = ["| K | init | baseline | " + " | ".join(organs) + " |",
             "|---|---|---|" + "---|" * len(organs)]
    for (k, init, baseline), cols in by_pair.items():
        cells = []
        for organ in organs:
            r = cols.get(organ)
            cells.append("—" if r is None else
                         f"{r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")
        lines.append(f"| {k} | {init} | {baseline} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def dice_vs_k_figure(table: dict[tuple[str, int], dict[str, tuple[float, float, int]]],
                     inits: Sequence[str], ks: Sequence[int], path: Path) -> None:
    """Mean Dice (per-case mean over organs) against K, one line per initialisation, error
    bars = ± 1 std over (draw, seed, case)."""
    fig = new_figure(5.5, 4.0)
    ax = fig.subplots()
    for j, init in enumerate(inits):
        xs = [k for k in ks if (init, k) in table]
        if not xs:
            continue
        means = [table[(init, k)]["mean"][0] for k in xs]
        stds = [np.nan_to_num(table[(init, k)]["mean"][1]) for k in xs]
        offset = (j - (len(inits) - 1) / 2) * 0.03 * max(1, max(ks) - min(ks))
        ax.errorbar([x + offset for x in xs], means, yerr=stds, marker="o", capsize=3, label=init)
    ax.set_xticks(list(ks))
    ax.set_xlabel("labelled training cases (K)")
    ax.set_ylabel("mean Dice over organs")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def organ_bars_figure(table: dict[tuple[str, int], dict[str, tuple[float, float, int]]],
                      inits: Sequence[str], ks: Sequence[int], organs: Sequence[str],
                      path: Path) -> None:
    """Grouped bars of mean Dice per organ (± 1 std), one panel per K, one bar per init."""
    fig = new_figure(max(6.0, 0.9 * len(organs) * max(1, len(inits)) / 2), 3.2 * len(ks))
    axes = fig.subplots(len(ks), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(inits))
    x = np.arange(len(organs))
    for ax, k in zip(axes, ks, strict=True):
        for j, init in enumerate(inits):
            if (init, k) not in table:
                continue
            cells = table[(init, k)]
            ax.bar(x + (j - (len(inits) - 1) / 2) * width, [cells[o][0] for o in organs],
                   width, yerr=[np.nan_to_num(cells[o][1]) for o in organs], capsize=2,
                   label=init)
        ax.set_xticks(x)
        ax.set_xticklabels(organs, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.set_title(f"K = {k}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=min(len(inits), 5))
    save_figure(fig, path)


def qualitative_figure(qualitative: Mapping[str, Any], path: Path) -> None:
    """One row: image, reference and each initialisation's prediction on the same slice.

    qualitative: {"image": (X, Y) in [0, 1], "reference": (X, Y) ids, "predictions":
    {init: (X, Y) ids}, "labels": {name: id}, "spacing_xy", "case", "z", "K"}.
    """
    panels = [("image", None), ("reference", qualitative["reference"]),
              *qualitative["predictions"].items()]
    n_colors = max(qualitative["labels"].values()) + 1
    fig = new_figure(2.6 * len(panels), 3.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, labels) in zip(axes, panels, strict=True):
        if labels is None:
            show_image(ax, qualitative["image"], qualitative["spacing_xy"], 0.0, 1.0)
        else:
            overlay_labels(ax, qualitative["image"], labels, spacing_xy=qualitative["spacing_xy"],
                           n_colors=n_colors, vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{qualitative['case']} z={qualitative['z']} (K={qualitative['K']}, "
                 f"draw {qualitative['draw']}, seed {qualitative['seed']})", fontsize=10)
    save_figure(fig, path)


# --------------------------------------------------------------------------- report.md


def probe_markdown(cfg: ExperimentConfig, probe_path: Path) -> str:
    """The probe section: Dice per initialisation and K, per-run paired differences (pairs =
    (draw, pre-training seed)) and the sign of each difference per pre-training seed."""
    rows, organs = read_results_csv(probe_path)
    if not rows:
        return "No probe finished yet.\n"
    inits = [s.name for s in cfg.initialisations]
    ks = list(cfg.labeled)
    columns = [*organs, "mean"]
    table = summary(rows, columns)
    per_run = comparisons(rows, inits, cfg.baselines, ks, ["mean"], cfg.bootstrap_resamples,
                          cfg.bootstrap_seed, per_run=True)
    sign_lines = ["| K | init | baseline | Δ mean Dice per pre-training seed | same sign |",
                  "|---|---|---|---|---|"]
    for baseline in cfg.baselines:
        for init in inits:
            if init == baseline:
                continue
            for k in ks:
                diffs = per_seed_differences(rows, init, baseline, k)
                if not diffs:
                    continue
                same = all(d > 0 for d in diffs.values()) or all(d < 0 for d in diffs.values())
                cells = ", ".join(f"s{seed}: {d:+.3f}" for seed, d in diffs.items())
                sign_lines.append(f"| {k} | {init} | {baseline} | {cells} | "
                                  f"{'yes' if same else 'no'} |")
    return f"""Frozen features (the probed network is never trained on the labels); a
class-balanced softmax classifier on {cfg.probe_pixels} pixels of the K labelled cases
(`lrcseg probe`, docs/METHOD.md), scored like fine-tuning on the `{cfg.eval_split}` split.
Scratch = a random network per seed.

{summary_markdown(table, inits, ks, columns)}

Per run (each (draw, pre-training seed) averaged over its cases first):

{comparisons_markdown(per_run, "mean")}

{chr(10).join(sign_lines)}
"""


def curves_markdown(curves: Sequence[Mapping[str, Any]]) -> str:
    """Learning-curve table: mean Dice at each budget point and the last doubling's change."""
    if not curves:
        return "No learning curve recorded.\n"
    steps = [step for step, _ in curves[0]["points"]]
    lines = ["| init | K | runs | " + " | ".join(f"{s} steps" for s in steps)
             + " | last doubling |", "|---|---|---|" + "---|" * len(steps) + "---|"]
    for c in curves:
        lines.append(f"| {c['init']} | {c['K']} | {c['runs']} | "
                     + " | ".join(f"{v:.3f}" for _, v in c["points"])
                     + f" | {c['last_doubling']:+.3f} |")
    return "\n".join(lines) + "\n"


def write_report(cfg: ExperimentConfig, out_dir: Path, results_path: Path, machine: Mapping[str, str],
                 timings: Mapping[str, Any], qualitative: Mapping[str, Any] | None = None,
                 probe_path: Path | None = None,
                 curves: Sequence[Mapping[str, Any]] | None = None,
                 hd95: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write report.md and figures/ of an experiment from its results.csv; returns the path.

    cfg: the ExperimentConfig (its settings, baselines and bootstrap parameters are used).
    probe_path: probe_results.csv (same layout) for the probe section; curves: the
    ``results.learning_curves`` rows for the convergence section; hd95: the
    ``hd95_markdown`` rows (per initialisation and K, pooled over cells, cases and organs).
    """
    out_dir = Path(out_dir)
    rows, organs = read_results_csv(results_path)
    inits = [s.name for s in cfg.initialisations]
    ks = list(cfg.labeled)
    columns = [*organs, "mean"]
    table = summary(rows, columns)
    results = comparisons(rows, inits, cfg.baselines, ks, columns, cfg.bootstrap_resamples,
                          cfg.bootstrap_seed)
    per_run = comparisons(rows, inits, cfg.baselines, ks, ["mean"], cfg.bootstrap_resamples,
                          cfg.bootstrap_seed, per_run=True)
    figures = out_dir / "figures"
    figure_lines = []
    if rows:
        dice_vs_k_figure(table, inits, ks, figures / "dice_vs_k.png")
        organ_bars_figure(table, inits, ks, organs, figures / "organ_bars.png")
        figure_lines += ["![Dice vs K](figures/dice_vs_k.png)", "",
                         "![Dice per organ](figures/organ_bars.png)", ""]
    if qualitative is not None:
        qualitative_figure(qualitative, figures / "qualitative.png")
        figure_lines += ["![Qualitative](figures/qualitative.png)", ""]
    finetune_sections = (f"""## Dice per initialisation and K

Mean ± sample std (ddof = 1) over (draw, seed, test case); "mean" = per-case mean over organs.

{summary_markdown(table, inits, ks, columns)}

## Paired differences against the baselines

Pairs matched on (draw, seed, test case) at the same K. Δ = init − baseline (mean Dice over
organs per case); percentile bootstrap 95% interval of the mean difference
({cfg.bootstrap_resamples} resamples, seed {cfg.bootstrap_seed}); two-sided Wilcoxon
signed-rank p-value (scipy). `*` marks intervals that exclude 0. Rows of one fine-tuned model
share its draw and seed, so they are not independent: see docs/EXPERIMENTS.md.

{comparisons_markdown(results, "mean")}

### Per fine-tuned run (the conservative view)

Each run's Dice averaged over its evaluated cases first, then paired on (draw, seed): n is
the number of paired runs, not of cases. Claim a difference only where both views agree.

{comparisons_markdown(per_run, "mean")}

### Per organ: Δ Dice [bootstrap 95% CI]

{organ_comparisons_markdown(results, organs)}

""" if rows else "## Fine-tuning\n\nNo fine-tuning cell finished yet.\n\n")
    expected = len(inits) * len(ks) * len(cfg.draws) * len(cfg.seeds)
    finished = len({(r["init"], r["K"], r["draw"], r["seed"]) for r in rows})
    wall = _duration(float(timings.get("total_seconds", 0.0)))
    hd95_text = ("\nHD95 over every scored organ and case of the finished cells:\n\n"
                 + hd95_markdown(hd95) + "\n") if hd95 else ""
    if getattr(cfg, "finetune_with", "lrcseg") == "nnunet":
        network = ("nnU-Net's 2d plans network (its patch, spacing and CTNormalization; "
                   "pre-training views of the patch's shorter side), fine-tuned by nnU-Net's "
                   f"trainer: {cfg.finetune_steps} iterations, batch "
                   f"{cfg.nnunet_batch_size or 'of the plans'}")
    else:
        network = (f"backbone {cfg.backbone}, {cfg.image_size} px crops, {cfg.spacing_mm} mm "
                   "in-plane spacing")
    text = f"""# Experiment report

{finished} of {expected} cells finished ({len(inits)} initialisations × K ∈ {ks} ×
{len(cfg.draws)} draws × {len(cfg.seeds)} seeds), evaluated on the `{cfg.eval_split}` split.
Every fine-tune: {cfg.finetune_steps} steps; every pre-training: {cfg.pretrain_steps} steps;
{network}.

**Configurations tried before this one: {cfg.configurations_tried}.**

## Fine-tuning convergence

Mean Dice (per run, over its cases) after 1/4, 1/2 and all of the budget, on the runs that
have every point. A budget is converged enough to compare initialisations when the last
doubling changes the mean Dice by less than 0.02. The earlier points are snapshots of the
same run, taken while its cosine schedule still has a high learning rate, not separately
annealed shorter runs (which usually score higher than the snapshot): read the change as a
conservative measure of what doubling a budget still adds.

{curves_markdown(curves or [])}
{"## Frozen-feature probe" + chr(10) + chr(10) + probe_markdown(cfg, probe_path) if probe_path else ""}
Machine: {machine.get('platform')}; CPU {machine.get('cpu')}; GPU {machine.get('gpu')};
torch {machine.get('torch')}. Time: {wall} summed over {len(timings.get('invocations', []))}
invocation(s), counting parallel ones separately (`timings.json`).

{finetune_sections}## Figures

{chr(10).join(figure_lines)}
## Configuration

```yaml
{yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip()}
```

Per-case numbers: `results.csv` (Dice); run folders: `runs/` (each evaluation's
`metrics.json` holds HD95 too). {HD95_CONVENTION}
{hd95_text}"""
    path = out_dir / "report.md"
    atomic_write_text(path, text)
    return path
