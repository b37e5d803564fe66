"""What the report reads from an experiment folder: the finished cells' metrics as rows.

results.csv / probe_results.csv (one row per finished cell and evaluated case), the pooled
HD95 rows, the learning curves, and the qualitative example (each initialisation's
prediction on one test slice).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from lrcseg.config import ExperimentConfig
from lrcseg.data.labels import apply_label_map
from lrcseg.data.layouts import load_dataset
from lrcseg.data.readers import read_image, read_label
from lrcseg.data.splits import case_phases, split_cases
from lrcseg.evaluate.predict import predict_labels
from lrcseg.experiment.cells import (
    Cell,
    cell_dir,
    cells,
    curve_steps,
    dataset_path,
    metrics_path,
)
from lrcseg.experiment.statistics import duplicate_draws, labelled_sets, pooled_hd95
from lrcseg.io_utils import atomic_write_text
from lrcseg.models.load import load_finetuned
from lrcseg.viz import representative_slice


def load_results(cfg: ExperimentConfig, out_dir: Path, kind: str = "finetune",
                 step: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished cell and evaluated case, organ Dice (None if absent in both).

    kind: "finetune" (the cells' metrics.json; with ``step``, their learning-curve snapshot
    at that step) or "probe" (the probes; seed = the pre-training seed).
    Row keys: init, K, draw, seed, case, each organ, "mean" (the mean over the organs
    with a Dice on that case), "labelled_set" (the cell's K labelled cases, sorted and joined
    by "+"; None where the folder no longer records them) and "phase" (the case's contrast
    phase where the dataset records phases, else None). Returns (rows, organs).
    """
    rows: list[dict[str, Any]] = []
    organs: list[str] = []
    phases = case_phases(dataset_path(cfg, out_dir))
    for cell in cells(cfg):
        path = metrics_path(out_dir, cell, kind, step)
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        organs = organs or list(metrics["organs"])
        labelled = _labelled_set(metrics, path.parent)
        for case_id, per_organ in metrics["cases"].items():
            dice = {o: per_organ.get(o, {}).get("dice") for o in organs}
            values = [v for v in dice.values() if v is not None]
            rows.append({"init": cell.init, "K": cell.labeled, "draw": cell.draw,
                         "seed": cell.seed, "case": case_id, **dice,
                         "mean": sum(values) / len(values) if values else None,
                         "labelled_set": labelled, "phase": phases.get(case_id)})
    return rows, organs


def _labelled_set(metrics: dict[str, Any], run_dir: Path) -> str | None:
    """A cell's labelled cases as "a+b": from its metrics ("labelled_cases") or its run
    folder's split.json; None if neither records them."""
    cases = metrics.get("labelled_cases")
    if cases is None and (run_dir / "split.json").is_file():
        cases = json.loads((run_dir / "split.json").read_text())["labeled"]
    return "+".join(sorted(cases)) if cases else None


def _csv_number(value: float | None) -> str:
    """A Dice for results.csv: six decimals; empty for no value (None or NaN)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def write_results_csv(cfg: ExperimentConfig, out_dir: Path, kind: str = "finetune") -> Path:
    """results.csv (probe_results.csv for kind "probe"): init, K, draw, seed, case, organ
    Dice columns, mean, labelled_set, phase (empty = no value)."""
    rows, organs = load_results(cfg, out_dir, kind)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["init", "K", "draw", "seed", "case", *organs, "mean", "labelled_set",
                     "phase"])
    for row in rows:
        writer.writerow([row["init"], row["K"], row["draw"], row["seed"], row["case"],
                         *(_csv_number(row[o]) for o in [*organs, "mean"]),
                         row["labelled_set"] or "", row["phase"] or ""])
    path = out_dir / ("probe_results.csv" if kind == "probe" else "results.csv")
    atomic_write_text(path, buf.getvalue())
    return path


def hd95_rows(cfg: ExperimentConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Per (initialisation, K): HD95 mean, median and capped count pooled over the finished
    fine-tuning cells (``report.hd95_markdown`` rows), a labelled set counted once (draws
    repeating an earlier draw's recorded cases left out, ``recorded_labelled_sets``)."""
    duplicates = duplicate_draws(recorded_labelled_sets(cfg, out_dir))
    rows = []
    for spec in cfg.initialisations:
        for k in cfg.labeled:
            paths = [metrics_path(out_dir, c, "finetune", None) for c in cells(cfg)
                     if c.init == spec.name and c.labeled == k
                     and (c.labeled, c.draw) not in duplicates]
            results = [json.loads(p.read_text()) for p in paths if p.is_file()]
            if results:
                rows.append({"init": spec.name, "K": k, "cells": len(results),
                             **pooled_hd95(results)})
    return rows


def _run_means(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[tuple[int, int], float]]:
    """(init, K) -> {(draw, seed): the run's mean Dice over its cases} from one step's rows."""
    runs: dict[tuple[str, int], dict[tuple[int, int], list[float]]] = {}
    for r in rows:
        if r["mean"] is not None:
            runs.setdefault((r["init"], r["K"]), {}).setdefault((r["draw"], r["seed"]),
                                                                []).append(r["mean"])
    return {arm: {key: sum(v) / len(v) for key, v in by_run.items()}
            for arm, by_run in runs.items()}


def learning_curves(cfg: ExperimentConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Per learning-curve initialisation (``cfg.curve_inits()``: "all" = every one) and K:
    mean Dice (over runs, each run averaged over its cases) at each of ``curve_steps`` and
    the whole budget, on the runs that have every point.

    Returns [{"init", "K", "runs", "points": [(step, mean Dice)], "last_doubling": the change
    between the last two points}].
    """
    steps = [*curve_steps(cfg), cfg.finetune_steps]
    per_step = [_run_means(load_results(
        cfg, out_dir, step=None if step == cfg.finetune_steps else step)[0]) for step in steps]
    out = []
    for init in cfg.curve_inits():
        for k in cfg.labeled:
            arm = [runs.get((init, k), {}) for runs in per_step]
            common = set.intersection(*(set(runs) for runs in arm))
            if not common:
                continue
            points = [(step, sum(runs[key] for key in common) / len(common))
                      for step, runs in zip(steps, arm, strict=True)]
            change = points[-1][1] - points[-2][1] if len(points) >= 2 else math.nan
            out.append({"init": init, "K": k, "runs": len(common), "points": points,
                        "last_doubling": change})
    return out


def qualitative_rows(cfg: ExperimentConfig, data: Path, out_dir: Path, device
                     ) -> dict[str, Any] | None:
    """Image, reference and each initialisation's prediction on one test slice.

    Uses the first draw and seed and the smallest K; the slice is the test case's axial slice
    with the most reference foreground. Returns None if any of those cells is missing.
    Arrays: "image" (X, Y) float in [0, 1] (the model's window), "reference" and each of
    "predictions" (X, Y) integer label ids, on the case's original grid.
    """
    k, draw, seed = min(cfg.labeled), cfg.draws[0], cfg.seeds[0]
    runs = {s.name: cell_dir(out_dir, Cell(s.name, k, draw, seed))
            for s in cfg.initialisations}
    if not all((r / "final.pt").is_file() for r in runs.values()):
        return None  # not finished, or its weights were deleted (keep_checkpoints false)
    dataset = load_dataset(data)
    case = split_cases(dataset, cfg.eval_split)[0]
    image = read_image(case.image)
    predictions = {}
    labels: dict[str, int] = {}
    for name, run_dir in runs.items():
        model, meta = load_finetuned(run_dir, device)
        labels = meta["labels"]
        predictions[name] = predict_labels(model, image, meta["preprocess"], device=device,
                                           num_classes=max(labels.values()) + 1)
    ref = apply_label_map(read_label(case.label, image).array, dataset.labels, labels, None)
    z, grey = representative_slice(image.array, ref, meta["preprocess"].window_hu)
    return {"case": case.id, "z": z, "K": k, "draw": draw, "seed": seed,
            "image": grey,
            "reference": ref[:, :, z], "labels": labels,
            "predictions": {n: p[:, :, z] for n, p in predictions.items()},
            "spacing_xy": image.spacing[:2]}


def run_curves(cfg: ExperimentConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Every fine-tuned run's learning curve: its mean Dice (over its cases) at each snapshot
    (``metrics_step<N>.json``) and at the full budget (``metrics.json``, step =
    ``finetune_steps``), for the finished runs (metrics.json written) that have a snapshot.

    Returns [{"init", "K", "draw", "seed", "points": [(step, mean Dice)]}] in cell order
    (``statistics.mean_curves`` / ``statistics.compute_to_reach`` rows).
    """
    steps = sorted({int(p.stem.removeprefix("metrics_step")) for cell in cells(cfg)
                    for p in cell_dir(out_dir, cell).glob("metrics_step*.json")})
    by_run: dict[tuple, dict[int, list[float]]] = {}
    for step in steps:
        for r in load_results(cfg, out_dir, step=step)[0]:
            if r["mean"] is not None:
                by_run.setdefault((r["init"], r["K"], r["draw"], r["seed"]), {}
                                  ).setdefault(step, []).append(r["mean"])
    for r in load_results(cfg, out_dir)[0] if by_run else []:
        run = (r["init"], r["K"], r["draw"], r["seed"])
        if run in by_run and r["mean"] is not None:
            by_run[run].setdefault(cfg.finetune_steps, []).append(r["mean"])
    return [{"init": init, "K": k, "draw": draw, "seed": seed,
             "points": [(step, sum(v) / len(v)) for step, v in sorted(points.items())]}
            for (init, k, draw, seed), points in by_run.items() if cfg.finetune_steps in points]


def recorded_labelled_sets(cfg: ExperimentConfig, out_dir: Path) -> dict[tuple[int, int], str]:
    """``{(K, draw): labelled set}`` as the run folders record it (the "labelled_set" of
    :func:`load_results` rows, fine-tunes and probes), for a results.csv that predates its
    "labelled_set" column; (K, draw) without a record are left out."""
    return labelled_sets([*load_results(cfg, out_dir)[0], *load_results(cfg, out_dir, "probe")[0]])
