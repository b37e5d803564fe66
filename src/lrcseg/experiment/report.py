"""Tables, figures and the markdown of an experiment report (``results.csv`` -> ``report.md``).

The numbers (summaries, paired comparisons, bootstrap intervals, Wilcoxon tests, pooled HD95)
come from :mod:`lrcseg.experiment.statistics`; this module formats them. ``write_report``
composes report.md from one function per section, each returning its markdown lines:
title, the primary endpoint (per-run paired differences, equivalence, the interval over
pre-training seeds), fine-tuning convergence, Dice against steps (compute-to-reach),
frozen-feature probe, machine and time, fine-tuning Dice and paired differences, Dice per
contrast phase, figures, configuration, pooled HD95.

Every table counts a labelled set once: draws of one K that picked the same cases (the rows'
"labelled_set", or what the run folders recorded) are dropped after the first, and the report
says how many.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lrcseg.config import ExperimentConfig, to_dict
from lrcseg.experiment.backends import finetune_backend
from lrcseg.experiment.results import recorded_labelled_sets, run_curves
from lrcseg.experiment.statistics import (
    SIGN_FLIP_EXACT_MAX_N,
    SummaryTable,
    comparisons,
    compute_to_reach,
    drop_draws,
    duplicate_draws,
    labelled_sets,
    mean_curves,
    phases,
    run_comparisons,
    seed_agreement,
    summary,
)
from lrcseg.io_utils import atomic_write_text
from lrcseg.viz import new_figure, overlay_labels, save_figure, show_image

KEY_COLUMNS = ("init", "K", "draw", "seed", "case")
#: text columns of results.csv that are not organs: the test case's contrast phase and the
#: run's labelled set (sorted case ids joined by "+"); absent from older folders
TEXT_COLUMNS = ("phase", "labelled_set")
#: Monte Carlo sign flips when a comparison has more than SIGN_FLIP_EXACT_MAX_N runs
SIGN_FLIPS = 100_000
#: compute-to-reach: the fraction of scratch's final mean Dice the runs must reach
REACH_FRACTION = 0.9


# --------------------------------------------------------------------------- results.csv


def read_results_csv(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of results.csv with typed values (empty cells -> None) and the organ columns.

    The text columns of TEXT_COLUMNS ("phase", "labelled_set") are kept as strings (empty ->
    None) where the file has them; older files without them give rows without those keys.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        organs = [c for c in header if c not in (*KEY_COLUMNS, *TEXT_COLUMNS, "mean")]
        texts = [c for c in TEXT_COLUMNS if c in header]
        rows = []
        for raw in reader:
            row: dict[str, Any] = {"init": raw["init"], "K": int(raw["K"]),
                                   "draw": int(raw["draw"]), "seed": int(raw["seed"]),
                                   "case": raw["case"]}
            for col in [*organs, "mean"]:
                row[col] = float(raw[col]) if raw[col] != "" else None
            for col in texts:
                row[col] = raw[col] or None
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


def summary_markdown(table: SummaryTable,
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


def dice_vs_k_figure(table: SummaryTable,
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


def organ_bars_figure(table: SummaryTable,
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


def dice_vs_steps_figure(curves: Sequence[Mapping[str, Any]], k: int, target: float | None,
                         path: Path) -> None:
    """Mean Dice (over runs) against fine-tuning steps at one K, a line per initialisation
    (``statistics.mean_curves`` rows), and the compute-to-reach target as a dashed line."""
    fig = new_figure(5.5, 4.0)
    ax = fig.subplots()
    for c in curves:
        if c["K"] == k:
            steps, values = zip(*c["points"], strict=True)
            ax.plot(steps, values, marker="o", label=f"{c['init']} ({c['runs']} runs)")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1,
                   label=f"{REACH_FRACTION:g} × scratch's final ({target:.3f})")
    ax.set_xlim(left=0)
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("mean Dice over organs (mean over runs)")
    ax.set_title(f"K = {k}", fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)



# --------------------------------------------------------------------------- report.md


def seed_agreement_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown of :func:`~lrcseg.experiment.statistics.seed_agreement`: the mean difference
    per pre-training seed and whether all seeds agree in sign."""
    lines = ["| K | init | baseline | Δ mean Dice per pre-training seed | same sign |",
             "|---|---|---|---|---|"]
    for r in results:
        cells = ", ".join(f"s{seed}: {d:+.3f}" for seed, d in r["differences"].items())
        lines.append(f"| {r['K']} | {r['init']} | {r['baseline']} | {cells} | "
                     f"{'yes' if r['same_sign'] else 'no'} |")
    return "\n".join(lines)


def curves_markdown(curves: Sequence[Mapping[str, Any]]) -> str:
    """Learning-curve table: mean Dice at each budget point and the last doubling's change."""
    if not curves:
        return "No learning curve recorded.\n"
    steps = sorted({step for c in curves for step, _ in c["points"]})
    lines = ["| init | K | runs | " + " | ".join(f"{s} steps" for s in steps)
             + " | last doubling |", "|---|---|---|" + "---|" * len(steps) + "---|"]
    for c in curves:
        points = dict(c["points"])
        lines.append(f"| {c['init']} | {c['K']} | {c['runs']} | "
                     + " | ".join(f"{points[s]:.3f}" if s in points else "—" for s in steps)
                     + f" | {c['last_doubling']:+.3f} |")
    return "\n".join(lines) + "\n"


def _interval(low: float, high: float) -> str:
    return "—" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"


def run_comparisons_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """The primary endpoint's table (:func:`~lrcseg.experiment.statistics.run_comparisons`):
    per-run Δ, its t 95% interval, sign-flip p, bootstrap 95% interval and Wilcoxon p.
    ``*`` marks t intervals that exclude 0."""
    lines = ["| K | init | baseline | runs | Δ Dice | t 95% CI | sign-flip p | bootstrap 95% CI "
             "| Wilcoxon p |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        excl = " *" if r["t_low"] > 0 or r["t_high"] < 0 else ""
        boot = _interval(r["ci_low"], r["ci_high"]) if r["n"] > 1 else "—"
        lines.append(f"| {r['K']} | {r['init']} | {r['baseline']} | {r['n']} | "
                     f"{r['mean_diff']:+.3f}{excl} | {_interval(r['t_low'], r['t_high'])} | "
                     f"{_p(r['p_sign_flip'])} | {boot} | "
                     f"{_p(r['p_wilcoxon']) if r['n'] > 1 else '—'} |")
    return "\n".join(lines)


def equivalence_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """Per comparison: TOST p and verdict at its margin, the equivalence bound the data
    support, and the t 95% interval over pre-training seeds."""
    lines = ["| K | init | baseline | runs | Δ Dice | TOST p (± margin) | equivalent | "
             "bound supported | seeds | seeds' t 95% CI |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        bound = "—" if math.isnan(r["bound"]) else f"±{r['bound']:.3f}"
        verdict = "—" if math.isnan(r["p_tost"]) else ("yes" if r["equivalent"] else "no")
        lines.append(f"| {r['K']} | {r['init']} | {r['baseline']} | {r['n']} | "
                     f"{r['mean_diff']:+.3f} | {_p(r['p_tost'])} (±{r['margin']:.3f}) | {verdict} | "
                     f"{bound} | {r['seeds']} | {_interval(r['seed_low'], r['seed_high'])} |")
    return "\n".join(lines)


def phase_summary_markdown(rows: Sequence[Mapping[str, Any]], inits: Sequence[str],
                           ks: Sequence[int]) -> str:
    """Mean ± sample std of the per-case mean Dice per (K, initialisation, contrast phase),
    n = test cases (rows) of that phase."""
    lines = ["| K | init | phase | n | mean Dice |", "|---|---|---|---|---|"]
    by_phase = {p: summary([r for r in rows if r.get("phase") == p], ["mean"])
                for p in phases(rows)}
    for k in ks:
        for init in inits:
            for phase, table in by_phase.items():
                if (init, k) in table:
                    mean, std, n = table[(init, k)]["mean"]
                    lines.append(f"| {k} | {init} | {phase} | {n} | {_pm(mean, std)} |")
    return "\n".join(lines)


def phase_comparisons_markdown(by_phase: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Per contrast phase, the per-run Δ (each run averaged over its cases of that phase), its
    t 95% interval and sign-flip p (``run_comparisons`` rows per phase)."""
    lines = ["| K | phase | init | baseline | runs | Δ Dice | t 95% CI | sign-flip p |",
             "|---|---|---|---|---|---|---|---|"]
    keyed = sorted(((r["K"], i, phase, r) for phase, results in by_phase.items()
                    for i, r in enumerate(results)), key=lambda x: x[:3])
    for k, _, phase, r in keyed:
        lines.append(f"| {k} | {phase} | {r['init']} | {r['baseline']} | {r['n']} | "
                     f"{r['mean_diff']:+.3f} | {_interval(r['t_low'], r['t_high'])} | "
                     f"{_p(r['p_sign_flip'])} |")
    return "\n".join(lines)


def _steps(run: Mapping[str, Any]) -> str:
    """A run's steps to reach: "≤ N" when already reached at its first snapshot."""
    if run["steps"] is None:
        return "not reached"
    return f"{'≤ ' if run['upper_bound'] else ''}{run['steps']:.0f}"


def reach_markdown(reach: Mapping[str, Any], reference: str = "scratch") -> str:
    """Compute-to-reach (:func:`~lrcseg.experiment.statistics.compute_to_reach`): per
    (K, initialisation) the runs that reached the target, their mean steps with a t 95%
    interval, the paired difference in steps against ``reference``, and each run's steps."""
    lines = ["| K | init | target | reached / runs | mean steps [t 95% CI] | "
             f"Δ steps vs {reference} [t 95% CI] (pairs) |", "|---|---|---|---|---|---|"]
    for s in sorted(reach["summary"], key=lambda r: r["K"]):
        mean = "—" if math.isnan(s["mean_steps"]) else f"{s['mean_steps']:.0f}"
        ci = "" if math.isnan(s["low"]) else f" [{s['low']:.0f}, {s['high']:.0f}]"
        if s["init"] == reference or s["pairs"] == 0:
            diff = "—"
        else:
            diff_ci = ("" if math.isnan(s["diff_low"])
                       else f" [{s['diff_low']:+.0f}, {s['diff_high']:+.0f}]")
            diff = f"{s['diff']:+.0f}{diff_ci} ({s['pairs']})"
        lines.append(f"| {s['K']} | {s['init']} | {reach['targets'][s['K']]:.3f} | "
                     f"{s['reached']} / {s['runs']} | {mean}{ci} | {diff} |")
    lines += ["", "| K | init | steps to reach per run (draw/seed) |", "|---|---|---|"]
    per_run: dict[tuple, list[str]] = {}
    for r in sorted(reach["runs"], key=lambda r: (r["K"], r["draw"], r["seed"])):
        per_run.setdefault((r["K"], r["init"]), []).append(
            f"d{r['draw']}/s{r['seed']}: {_steps(r)}")
    for (k, init), cells in sorted(per_run.items(), key=lambda x: x[0][0]):
        lines.append(f"| {k} | {init} | {', '.join(cells)} |")
    return "\n".join(lines)


# Each section below returns its markdown lines, ending with the empty line that separates it
# from the next; write_report joins them with newlines.


def _lines(markdown: str) -> list[str]:
    """The lines of a markdown block (a trailing newline adds no empty line)."""
    return markdown.removesuffix("\n").split("\n")


def _title_section(cfg: ExperimentConfig, rows: Sequence[Mapping[str, Any]],
                   inits: Sequence[str], ks: Sequence[int], labelled: list[str]) -> list[str]:
    """Title, how many cells finished of the matrix (``rows``: all of them, duplicates
    included), the budgets, the network and what de-duplication did (``labelled``)."""
    expected = len(inits) * len(ks) * len(cfg.draws) * len(cfg.seeds)
    finished = len({(r["init"], r["K"], r["draw"], r["seed"]) for r in rows})
    return ["# Experiment report", "",
            f"{finished} of {expected} cells finished ({len(inits)} initialisations × K ∈ {ks} ×",
            f"{len(cfg.draws)} draws × {len(cfg.seeds)} seeds), evaluated on the `{cfg.eval_split}` split.",
            f"Every fine-tune: {cfg.finetune_steps} steps; every pre-training: {cfg.pretrain_steps} steps;",
            f"{finetune_backend(cfg).describe()}.", "",
            f"**Configurations tried before this one: {cfg.configurations_tried}.**", "",
            *labelled]


def _runs(rows: Sequence[Mapping[str, Any]]) -> set[tuple]:
    """The (init, K, draw, seed) runs of results rows (or of learning curves)."""
    return {(r["init"], int(r["K"]), int(r["draw"]), int(r["seed"])) for r in rows}


def _labelled_set_lines(sets: Mapping[tuple[int, int], str],
                        duplicates: Mapping[tuple[int, int], int],
                        rows: Sequence[Mapping[str, Any]],
                        probe_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What de-duplication by labelled set did: which draws it dropped and how many runs, or
    why it could not tell (``rows``, ``probe_rows``: before de-duplication)."""
    draws = sorted({(int(r["K"]), int(r["draw"])) for r in [*rows, *probe_rows]})
    if not draws:
        return []
    unknown = [d for d in draws if d not in sets]
    if len(unknown) == len(draws):
        return ["Labelled sets: not recorded (no `labelled_set` column in results.csv and no split",
                "record in the run folders), so two draws of one K that picked the same cases would",
                "both be counted: no duplicate could be dropped.", ""]
    if duplicates:
        dropped = ", ".join(f"K = {k} draw {d} (= draw {first}: {sets[(k, d)]})"
                            for (k, d), first in sorted(duplicates.items()))
        runs = len({r for r in _runs(rows) if r[1:3] in duplicates})
        probes = len({r for r in _runs(probe_rows) if r[1:3] in duplicates})
        text = [f"Labelled sets: {len(duplicates)} draw(s) repeat an earlier draw's cases and are left",
                f"out of every table, curve and comparison (the first draw is kept): {dropped};",
                f"{runs} fine-tuned run(s) and {probes} probe(s) dropped."]
    else:
        text = ["Labelled sets: every draw of a K has its own (no duplicate dropped)."]
    if unknown:
        text.append("Without a record (counted as they are): "
                    + ", ".join(f"K = {k} draw {d}" for k, d in unknown) + ".")
    return [*text, ""]


def _primary_section(cfg: ExperimentConfig, rows: Sequence[Mapping[str, Any]],
                     inits: Sequence[str], ks: Sequence[int], margin: float) -> list[str]:
    """The primary endpoint: per-run paired differences with a t interval, sign-flip p,
    bootstrap and Wilcoxon; then TOST at ``margin`` and the interval over pre-training seeds."""
    if not rows:
        return []
    results = run_comparisons(rows, inits, cfg.baselines, ks, "mean", margin,
                              cfg.bootstrap_resamples, cfg.bootstrap_seed, SIGN_FLIPS)
    return ["## Primary endpoint: per-run paired differences", "",
            "Each fine-tuned run's Dice (per-case mean over organs) averaged over its evaluated cases",
            "first, then paired on (labelled set, seed) at the same K: n = paired runs, Δ = init −",
            "baseline. Student t 95% interval of the mean difference (n − 1 degrees of freedom; `*`",
            "marks intervals that exclude 0); two-sided sign-flip (permutation) p, exact over all 2^n",
            f"sign assignments for n ≤ {SIGN_FLIP_EXACT_MAX_N}, else {SIGN_FLIPS} random ones "
            f"(seed {cfg.bootstrap_seed});",
            f"beside them the percentile bootstrap 95% interval ({cfg.bootstrap_resamples} resamples) "
            "and the Wilcoxon",
            "signed-rank p. With few runs the bootstrap interval is narrower than the t interval:",
            "read the t interval.", "",
            *_lines(run_comparisons_markdown(results)), "",
            "### Equivalence and the interval over pre-training seeds", "",
            f"TOST: two one-sided t-tests of the per-run differences against ±{margin:g}",
            "(`equivalence_margin`), equivalent when p_TOST < 0.05. Bound supported: the smallest",
            "margin for which TOST would conclude equivalence at α = 0.05 (the larger end, in",
            "absolute value, of the 90% t interval), so a difference beyond it is excluded. Seeds:",
            "each pre-training seed's paired runs averaged first (n = seeds), t 95% interval over seeds.", "",
            *_lines(equivalence_markdown(results)), ""]


def _convergence_section(curves: Sequence[Mapping[str, Any]]) -> list[str]:
    """The learning-curve table (``statistics.mean_curves`` rows) and how to read it."""
    return ["## Fine-tuning convergence", "",
            "Mean Dice (per run, over its cases) at each learning-curve snapshot and at the whole",
            "budget, on the runs that have every point. A budget is converged enough to compare",
            "initialisations when the last doubling changes the mean Dice by less than 0.02. The earlier",
            "points are snapshots of the same run, taken while its cosine schedule still has a high",
            "learning rate, not separately annealed shorter runs (which usually score higher than the",
            "snapshot): read the change as a conservative measure of what doubling a budget still adds.", "",
            *_lines(curves_markdown(curves)), ""]


def _steps_section(cfg: ExperimentConfig, figures: Path, curves: Sequence[Mapping[str, Any]],
                   ks: Sequence[int]) -> list[str]:
    """Dice against steps: one figure per K (a line per initialisation) and compute-to-reach
    against scratch's final Dice. curves: one per run (``results.run_curves``), de-duplicated;
    nothing without them."""
    if not curves:
        return []
    means = mean_curves(curves)
    scratch = next((s.name for s in cfg.initialisations if s.method == "scratch"), None)
    reach = (compute_to_reach(curves, cfg.finetune_steps, scratch, REACH_FRACTION)
             if scratch else {"targets": {}, "runs": [], "summary": []})
    links = []
    for k in ks:
        if any(c["K"] == k for c in means):
            dice_vs_steps_figure(means, k, reach["targets"].get(k), figures / f"dice_vs_steps_K{k}.png")
            links += [f"![Dice against steps, K = {k}](figures/dice_vs_steps_K{k}.png)", ""]
    lines = ["## Dice against steps", "",
             "Mean Dice (each run averaged over its cases, then over the runs that have every point)",
             "at each learning-curve snapshot, one line per initialisation.", "", *links]
    if not reach["summary"]:
        return [*lines, f"Compute-to-reach: no {scratch or 'scratch'} run has a learning curve "
                f"up to the full budget ({cfg.finetune_steps} steps).", ""]
    return [*lines,
            f"Compute-to-reach: the steps a run needs to reach {REACH_FRACTION:g} × {scratch}'s "
            "final mean Dice at its K",
            f"(the mean over {scratch}'s runs at {cfg.finetune_steps} steps), linearly interpolated "
            "between snapshots.",
            "A run already there at its first snapshot counts that snapshot's step (≤, an upper",
            "bound); runs that never reach it are \"not reached\", left out of the mean and of the",
            f"pairs. Δ steps: paired with {scratch} on (labelled set, seed) over the pairs where both",
            "reached, Student t 95% interval.", "",
            *_lines(reach_markdown(reach, scratch)), ""]


def _probe_section(cfg: ExperimentConfig, probe: tuple[list, list[str]] | None,
                   inits: Sequence[str], ks: Sequence[int]) -> list[str]:
    """The probe's Dice per initialisation and K, per-run paired differences (pairs =
    (draw, pre-training seed)) and the sign of each difference per pre-training seed.
    probe: (rows, organs) of probe_results.csv, de-duplicated; None without probes."""
    if probe is None:
        return [""]  # no section, but the empty line the report has always had here
    head = ["## Frozen-feature probe", ""]
    rows, organs = probe
    if not rows:
        return [*head, "No probe finished yet.", ""]
    columns = [*organs, "mean"]
    per_run = comparisons(rows, inits, cfg.baselines, ks, ["mean"], cfg.bootstrap_resamples,
                          cfg.bootstrap_seed, per_run=True)
    return [*head,
            "Frozen features (the probed network is never trained on the labels); a",
            f"class-balanced softmax classifier on {cfg.probe_pixels} pixels of the K labelled cases",
            f"(`lrcseg probe`, docs/METHOD.md), scored like fine-tuning on the `{cfg.eval_split}` split.",
            "Scratch = a random network per seed.", "",
            *_lines(summary_markdown(summary(rows, columns), inits, ks, columns)), "",
            "Per run (each (draw, pre-training seed) averaged over its cases first):", "",
            *_lines(comparisons_markdown(per_run, "mean")), "",
            *_lines(seed_agreement_markdown(seed_agreement(rows, inits, cfg.baselines, ks))), ""]


def _machine_section(machine: Mapping[str, str], timings: Mapping[str, Any]) -> list[str]:
    """The machine (platform, CPU, GPU, torch) and the time summed over the invocations."""
    wall = _duration(float(timings.get("total_seconds", 0.0)))
    invocations = len(timings.get("invocations", []))
    return [f"Machine: {machine.get('platform')}; CPU {machine.get('cpu')}; GPU {machine.get('gpu')};",
            f"torch {machine.get('torch')}. Time: {wall} summed over {invocations}",
            "invocation(s), counting parallel ones separately (`timings.json`).", ""]


def _finetune_section(cfg: ExperimentConfig, rows: Sequence[Mapping[str, Any]],
                      organs: Sequence[str], inits: Sequence[str], ks: Sequence[int],
                      table: SummaryTable) -> list[str]:
    """Fine-tuning Dice per initialisation and K (``table``), the paired differences against
    the baselines per case and per run, and per organ."""
    if not rows:
        return ["## Fine-tuning", "", "No fine-tuning cell finished yet.", ""]
    columns = [*organs, "mean"]
    results = comparisons(rows, inits, cfg.baselines, ks, columns, cfg.bootstrap_resamples,
                          cfg.bootstrap_seed)
    per_run = comparisons(rows, inits, cfg.baselines, ks, ["mean"], cfg.bootstrap_resamples,
                          cfg.bootstrap_seed, per_run=True)
    return ["## Dice per initialisation and K", "",
            'Mean ± sample std (ddof = 1) over (draw, seed, test case); "mean" = per-case mean over organs.', "",
            *_lines(summary_markdown(table, inits, ks, columns)), "",
            "## Paired differences against the baselines", "",
            "Pairs matched on (draw, seed, test case) at the same K. Δ = init − baseline (mean Dice over",
            "organs per case); percentile bootstrap 95% interval of the mean difference",
            f"({cfg.bootstrap_resamples} resamples, seed {cfg.bootstrap_seed}); two-sided Wilcoxon",
            "signed-rank p-value (scipy). `*` marks intervals that exclude 0. Rows of one fine-tuned model",
            "share its draw and seed, so they are not independent: see docs/EXPERIMENTS.md.", "",
            *_lines(comparisons_markdown(results, "mean")), "",
            "### Per fine-tuned run (the conservative view)", "",
            "Each run's Dice averaged over its evaluated cases first, then paired on (draw, seed): n is",
            "the number of paired runs, not of cases. Claim a difference only where both views agree.", "",
            *_lines(comparisons_markdown(per_run, "mean")), "",
            "### Per organ: Δ Dice [bootstrap 95% CI]", "",
            *_lines(organ_comparisons_markdown(results, organs)), ""]


def _phase_section(cfg: ExperimentConfig, rows: Sequence[Mapping[str, Any]],
                   inits: Sequence[str], ks: Sequence[int], margin: float) -> list[str]:
    """Dice per (initialisation, K, contrast phase) and the per-run paired difference within
    each phase; nothing when the rows record no phase."""
    found = phases(rows)
    if not found:
        return []
    by_phase = {p: run_comparisons([r for r in rows if r.get("phase") == p], inits,
                                   cfg.baselines, ks, "mean", margin, cfg.bootstrap_resamples,
                                   cfg.bootstrap_seed, SIGN_FLIPS) for p in found}
    unrecorded = sum(1 for r in rows if not r.get("phase"))
    note = [f"{unrecorded} row(s) without a phase are left out of this section.", ""] if unrecorded else []
    return ["## Dice per contrast phase", "",
            "Mean ± sample std of the per-case mean Dice over the test cases of each contrast phase",
            "(n = cases × runs).", "", *note,
            *_lines(phase_summary_markdown(rows, inits, ks)), "",
            "Per run within each phase: each run averaged over its cases of that phase, then paired",
            "on (labelled set, seed) as in the primary endpoint.", "",
            *_lines(phase_comparisons_markdown(by_phase)), ""]


def _figures_section(figures: Path, rows: Sequence[Mapping[str, Any]], organs: Sequence[str],
                     inits: Sequence[str], ks: Sequence[int], table: SummaryTable,
                     qualitative: Mapping[str, Any] | None) -> list[str]:
    """Draws the figures into the folder ``figures`` and returns the section linking them."""
    links = []
    if rows:
        dice_vs_k_figure(table, inits, ks, figures / "dice_vs_k.png")
        organ_bars_figure(table, inits, ks, organs, figures / "organ_bars.png")
        links += ["![Dice vs K](figures/dice_vs_k.png)", "",
                  "![Dice per organ](figures/organ_bars.png)", ""]
    if qualitative is not None:
        qualitative_figure(qualitative, figures / "qualitative.png")
        links += ["![Qualitative](figures/qualitative.png)", ""]
    return ["## Figures", "", *(links or [""])]


def _configuration_section(cfg: ExperimentConfig) -> list[str]:
    """The whole ExperimentConfig as YAML, where the per-case numbers are, how HD95 is read."""
    return ["## Configuration", "", "```yaml",
            *yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip().split("\n"), "```", "",
            "Per-case numbers: `results.csv` (Dice); run folders: `runs/` (each evaluation's",
            f"`metrics.json` holds HD95 too). {HD95_CONVENTION}", ""]


def _hd95_section(hd95: Sequence[Mapping[str, Any]]) -> list[str]:
    """HD95 pooled per initialisation and K (``hd95_markdown`` rows); nothing without rows."""
    if not hd95:
        return []
    return ["HD95 over every scored organ and case of the finished cells:", "",
            *_lines(hd95_markdown(hd95)), ""]


def write_report(cfg: ExperimentConfig, out_dir: Path, results_path: Path, machine: Mapping[str, str],
                 timings: Mapping[str, Any], qualitative: Mapping[str, Any] | None = None,
                 probe_path: Path | None = None,
                 curves: Sequence[Mapping[str, Any]] | None = None,
                 hd95: Sequence[Mapping[str, Any]] | None = None,
                 per_run_curves: Sequence[Mapping[str, Any]] | None = None,
                 recorded_sets: Mapping[tuple[int, int], str] | None = None) -> Path:
    """Write report.md and figures/ of an experiment from its results.csv; returns the path.

    cfg: the ExperimentConfig (its settings, baselines, bootstrap parameters and
    ``equivalence_margin`` are used).
    probe_path: probe_results.csv (same layout) for the probe section; hd95: the
    ``hd95_markdown`` rows (per initialisation and K, pooled over cells, cases and organs).
    per_run_curves: every run's learning curve (``results.run_curves``; None = read them from
    ``out_dir``), for the convergence table, Dice against steps and compute-to-reach; curves:
    the ``results.learning_curves`` rows, the convergence table's fallback where no run has
    a curve. recorded_sets: ``{(K, draw): labelled set}`` the run folders recorded
    (``results.recorded_labelled_sets``; None = read them from ``out_dir``), for rows without
    a "labelled_set" value. Every table counts a labelled set once (the first draw that has
    it).
    """
    out_dir = Path(out_dir)
    margin = float(cfg.equivalence_margin)
    all_rows, organs = read_results_csv(results_path)
    probe_all = read_results_csv(probe_path) if probe_path else None
    if per_run_curves is None:
        per_run_curves = run_curves(cfg, out_dir)
    if recorded_sets is None:
        recorded_sets = recorded_labelled_sets(cfg, out_dir)
    sets = {**recorded_sets, **labelled_sets(probe_all[0] if probe_all else []),
            **labelled_sets(all_rows)}
    duplicates = duplicate_draws(sets)
    rows = drop_draws(all_rows, duplicates)
    probe = (drop_draws(probe_all[0], duplicates), probe_all[1]) if probe_all else None
    run_curve_rows = drop_draws(per_run_curves, duplicates)
    inits = [s.name for s in cfg.initialisations]
    ks = list(cfg.labeled)
    table = summary(rows, [*organs, "mean"])
    labelled = _labelled_set_lines(sets, duplicates, all_rows, probe_all[0] if probe_all else [])
    lines = [*_title_section(cfg, all_rows, inits, ks, labelled),
             *_primary_section(cfg, rows, inits, ks, margin),
             *_convergence_section(mean_curves(run_curve_rows) if run_curve_rows else curves or []),
             *_steps_section(cfg, out_dir / "figures", run_curve_rows, ks),
             *_probe_section(cfg, probe, inits, ks),
             *_machine_section(machine, timings),
             *_finetune_section(cfg, rows, organs, inits, ks, table),
             *_phase_section(cfg, rows, inits, ks, margin),
             *_figures_section(out_dir / "figures", rows, organs, inits, ks, table, qualitative),
             *_configuration_section(cfg),
             *_hd95_section(hd95 or [])]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
