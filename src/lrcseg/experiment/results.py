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
from lrcseg.data.splits import split_cases
from lrcseg.evaluate.predict import predict_labels
from lrcseg.experiment.cells import Cell, cell_dir, cells, curve_steps, metrics_path
from lrcseg.experiment.statistics import pooled_hd95
from lrcseg.io_utils import atomic_write_text
from lrcseg.models.load import load_finetuned
from lrcseg.viz import representative_slice


def load_results(cfg: ExperimentConfig, out_dir: Path, kind: str = "finetune",
                 step: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished cell and evaluated case, organ Dice (None if absent in both).

    kind: "finetune" (the cells' metrics.json; with ``step``, their learning-curve snapshot
    at that step) or "probe" (the probes; seed = the pre-training seed).
    Row keys: init, K, draw, seed, case, each organ, and "mean" (the mean over the organs
    with a Dice on that case). Returns (rows, organs).
    """
    rows: list[dict[str, Any]] = []
    organs: list[str] = []
    for cell in cells(cfg):
        path = metrics_path(out_dir, cell, kind, step)
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        organs = organs or list(metrics["organs"])
        for case_id, per_organ in metrics["cases"].items():
            dice = {o: per_organ.get(o, {}).get("dice") for o in organs}
            values = [v for v in dice.values() if v is not None]
            rows.append({"init": cell.init, "K": cell.labeled, "draw": cell.draw,
                         "seed": cell.seed, "case": case_id, **dice,
                         "mean": sum(values) / len(values) if values else None})
    return rows, organs


def _csv_number(value: float | None) -> str:
    """A Dice for results.csv: six decimals; empty for no value (None or NaN)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def write_results_csv(cfg: ExperimentConfig, out_dir: Path, kind: str = "finetune") -> Path:
    """results.csv (probe_results.csv for kind "probe"): init, K, draw, seed, case, organ
    Dice columns, mean (empty = no value)."""
    rows, organs = load_results(cfg, out_dir, kind)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["init", "K", "draw", "seed", "case", *organs, "mean"])
    for row in rows:
        writer.writerow([row["init"], row["K"], row["draw"], row["seed"], row["case"],
                         *(_csv_number(row[o]) for o in [*organs, "mean"])])
    path = out_dir / ("probe_results.csv" if kind == "probe" else "results.csv")
    atomic_write_text(path, buf.getvalue())
    return path


def hd95_rows(cfg: ExperimentConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Per (initialisation, K): HD95 mean, median and capped count pooled over the finished
    fine-tuning cells (``report.hd95_markdown`` rows)."""
    rows = []
    for spec in cfg.initialisations:
        for k in cfg.labeled:
            paths = [metrics_path(out_dir, c, "finetune", None) for c in cells(cfg)
                     if c.init == spec.name and c.labeled == k]
            results = [json.loads(p.read_text()) for p in paths if p.is_file()]
            if results:
                rows.append({"init": spec.name, "K": k, "cells": len(results),
                             **pooled_hd95(results)})
    return rows


def _run_means(cfg: ExperimentConfig, out_dir: Path, init: str, k: int, step: int
               ) -> dict[tuple[int, int], float]:
    """(draw, seed) -> the run's mean Dice over its cases at ``step`` (the full budget: its
    metrics.json), for the runs of (``init``, ``k``) that have that point."""
    rows, _ = load_results(cfg, out_dir, step=None if step == cfg.finetune_steps else step)
    runs: dict[tuple, list[float]] = {}
    for r in rows:
        if r["init"] == init and r["K"] == k and r["mean"] is not None:
            runs.setdefault((r["draw"], r["seed"]), []).append(r["mean"])
    return {key: sum(v) / len(v) for key, v in runs.items()}


def learning_curves(cfg: ExperimentConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Per learning-curve initialisation and K: mean Dice (over runs, each run averaged over
    its cases) at 1/4, 1/2 and the whole budget, on the runs that have every point.

    Returns [{"init", "K", "runs", "points": [(step, mean Dice)], "last_doubling": change}].
    """
    steps = [*curve_steps(cfg), cfg.finetune_steps]
    out = []
    for init in cfg.learning_curve:
        for k in cfg.labeled:
            per_step = {step: _run_means(cfg, out_dir, init, k, step) for step in steps}
            common = set.intersection(*(set(v) for v in per_step.values())) if per_step else set()
            if not common:
                continue
            points = [(step, sum(per_step[step][key] for key in common) / len(common))
                      for step in steps]
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
