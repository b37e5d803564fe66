"""Tables, figures and the markdown of an experiment report (``results.csv`` -> ``report.md``).

The numbers (summaries, paired comparisons, bootstrap intervals, Wilcoxon tests, pooled HD95)
come from :mod:`lrcseg.experiment.statistics`; this module formats them. ``write_report``
composes report.md from one function per section, each returning its markdown lines:
title, fine-tuning convergence, frozen-feature probe, machine and time, fine-tuning Dice and
paired differences, figures, configuration, pooled HD95.
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
from lrcseg.experiment.statistics import SummaryTable, comparisons, seed_agreement, summary
from lrcseg.io_utils import atomic_write_text
from lrcseg.viz import new_figure, overlay_labels, save_figure, show_image

KEY_COLUMNS = ("init", "K", "draw", "seed", "case")


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
    steps = [step for step, _ in curves[0]["points"]]
    lines = ["| init | K | runs | " + " | ".join(f"{s} steps" for s in steps)
             + " | last doubling |", "|---|---|---|" + "---|" * len(steps) + "---|"]
    for c in curves:
        lines.append(f"| {c['init']} | {c['K']} | {c['runs']} | "
                     + " | ".join(f"{v:.3f}" for _, v in c["points"])
                     + f" | {c['last_doubling']:+.3f} |")
    return "\n".join(lines) + "\n"


# Each section below returns its markdown lines, ending with the empty line that separates it
# from the next; write_report joins them with newlines.


def _lines(markdown: str) -> list[str]:
    """The lines of a markdown block (a trailing newline adds no empty line)."""
    return markdown.removesuffix("\n").split("\n")


def _title_section(cfg: ExperimentConfig, rows: Sequence[Mapping[str, Any]],
                   inits: Sequence[str], ks: Sequence[int]) -> list[str]:
    """Title, how many cells finished of the matrix, the budgets and the network."""
    expected = len(inits) * len(ks) * len(cfg.draws) * len(cfg.seeds)
    finished = len({(r["init"], r["K"], r["draw"], r["seed"]) for r in rows})
    return ["# Experiment report", "",
            f"{finished} of {expected} cells finished ({len(inits)} initialisations × K ∈ {ks} ×",
            f"{len(cfg.draws)} draws × {len(cfg.seeds)} seeds), evaluated on the `{cfg.eval_split}` split.",
            f"Every fine-tune: {cfg.finetune_steps} steps; every pre-training: {cfg.pretrain_steps} steps;",
            f"{finetune_backend(cfg).describe()}.", "",
            f"**Configurations tried before this one: {cfg.configurations_tried}.**", ""]


def _convergence_section(curves: Sequence[Mapping[str, Any]]) -> list[str]:
    """The learning-curve table (``results.learning_curves`` rows) and how to read it."""
    return ["## Fine-tuning convergence", "",
            "Mean Dice (per run, over its cases) after 1/4, 1/2 and all of the budget, on the runs that",
            "have every point. A budget is converged enough to compare initialisations when the last",
            "doubling changes the mean Dice by less than 0.02. The earlier points are snapshots of the",
            "same run, taken while its cosine schedule still has a high learning rate, not separately",
            "annealed shorter runs (which usually score higher than the snapshot): read the change as a",
            "conservative measure of what doubling a budget still adds.", "",
            *_lines(curves_markdown(curves)), ""]


def _probe_section(cfg: ExperimentConfig, probe_path: Path | None, inits: Sequence[str],
                   ks: Sequence[int]) -> list[str]:
    """The probe's Dice per initialisation and K, per-run paired differences (pairs =
    (draw, pre-training seed)) and the sign of each difference per pre-training seed."""
    if not probe_path:
        return [""]  # no section, but the empty line the report has always had here
    head = ["## Frozen-feature probe", ""]
    rows, organs = read_results_csv(probe_path)
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
    table = summary(rows, [*organs, "mean"])
    lines = [*_title_section(cfg, rows, inits, ks),
             *_convergence_section(curves or []),
             *_probe_section(cfg, probe_path, inits, ks),
             *_machine_section(machine, timings),
             *_finetune_section(cfg, rows, organs, inits, ks, table),
             *_figures_section(out_dir / "figures", rows, organs, inits, ks, table, qualitative),
             *_configuration_section(cfg),
             *_hd95_section(hd95 or [])]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
