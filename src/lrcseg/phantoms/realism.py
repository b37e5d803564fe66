"""How much a phantom dataset behaves like real abdominal CT, by measured criteria.

Two measures, both on slices preprocessed like network input (1.5 mm in-plane, window
-175..250 HU, body mask; :func:`lrcseg.data.preprocess.preprocess_volume`):

1. **Intensity-interval Dice.** For each organ, the single HU interval ``[lo, hi]`` (5 HU
   grid over the window) that maximises ``Dice(body & lo <= HU <= hi, organ)`` on the fit
   case, found exhaustively from cumulative histograms: with ``C_o``, ``C_b`` the cumulative
   organ / body counts, ``Dice(i, j) = 2 (C_o[j+1] - C_o[i]) / (C_b[j+1] - C_b[i] + |organ|)``.
   The interval is then applied unchanged to the other cases. If organs could be told apart by
   intensity alone, these Dice values would be high.
2. **Superpixel quality.** skimage Felzenszwalb (sigma 0.8, scale 100 and 200, min_size =
   110 mm^2 in pixels) on each windowed slice, pixels outside the body set to region 0; per
   slice the region count, ASA and organ-boundary recall within 2 px
   (:mod:`lrcseg.superpixels.metrics`).

:data:`REAL_CT` holds the same figures measured on real CT and :data:`TARGETS` the accepted
ranges for phantoms (issue 3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from skimage.segmentation import felzenszwalb

from lrcseg.config import PreprocessConfig
from lrcseg.data.preprocess import preprocess_volume
from lrcseg.data.readers import read_image, read_label
from lrcseg.errors import DataError
from lrcseg.io_utils import atomic_write_json
from lrcseg.superpixels.metrics import achievable_segmentation_accuracy, boundary_recall

WINDOW_HU = (-175.0, 250.0)
SPACING_MM = 1.5
MIN_SIZE_MM2 = 110.0
SCALES = (100.0, 200.0)
SIGMA = 0.8
HU_STEP = 5.0
INTERVAL_ORGANS = ("liver", "spleen", "stomach", "aorta", "ivc")

REAL_CT = {
    "interval_dice_fit": {"liver": 0.47, "spleen": 0.12, "stomach": 0.04, "aorta": 0.02, "ivc": 0.03},
    "interval_dice_other": {"liver": 0.11, "spleen": 0.01},
    "scale_100": {"regions_median": 77, "asa": 0.94, "boundary_recall": 0.85},
    "scale_200": {"regions_median": 47, "asa": 0.92, "boundary_recall": 0.76},
}
TARGETS = {
    "interval_dice_fit": {"liver": (0.0, 0.55), "spleen": (0.0, 0.35)},
    "regions_median": (40, 130),
    "asa": (0.90, 0.97),
    "boundary_recall": (0.75, 0.92),
}


def interval_dice_table(hu: np.ndarray, organ: np.ndarray, body: np.ndarray,
                        step_hu: float = HU_STEP) -> tuple[np.ndarray, np.ndarray]:
    """Dice of every HU interval on the grid: returns (dice (B, B), bin lower edges (B,)).

    hu: float HU of any shape, organ/body: bool masks of the same shape. ``dice[i, j]`` is the
    Dice of ``body & edge[i] <= HU < edge[j] + step`` vs ``organ & body``; NaN for i > j.
    Values outside the window fall into the end bins (the windowed image clips them).
    """
    edges = np.arange(WINDOW_HU[0], WINDOW_HU[1], step_hu)
    bins = _hu_bins(hu[body], step_hu, len(edges))
    in_organ = organ[body]
    c_body = np.concatenate([[0], np.cumsum(np.bincount(bins, minlength=len(edges)))])
    c_organ = np.concatenate([[0], np.cumsum(np.bincount(bins[in_organ], minlength=len(edges)))])
    n_organ = c_organ[-1]
    tp = c_organ[None, 1:] - c_organ[:-1, None]  # [i, j]: bins i..j
    pred = c_body[None, 1:] - c_body[:-1, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * tp / (pred + n_organ)
    dice[np.tril_indices(len(edges), -1)] = np.nan
    return dice, edges


def _hu_bins(hu: np.ndarray, step_hu: float, n_bins: int) -> np.ndarray:
    return np.clip(np.floor((hu - WINDOW_HU[0]) / step_hu), 0, n_bins - 1).astype(np.int64)


def _load_case(image_path: Path, label_path: Path, cfg: PreprocessConfig):
    image = read_image(image_path)
    label = read_label(label_path, image)
    pre = preprocess_volume(image, cfg, label)
    hu = WINDOW_HU[0] + pre.image[:, 0] * (WINDOW_HU[1] - WINDOW_HU[0])  # (Z, H, W)
    return hu, pre.image[:, 0], pre.body, pre.label


def realism_report(dataset_dir: str | os.PathLike, max_cases: int = 4, slices_per_case: int = 12,
                   out_json: str | os.PathLike | None = None, spacing_mm: float = SPACING_MM) -> dict:
    """Measure a phantom (or any labelled nnU-Net) dataset against real-CT figures.

    dataset_dir: folder with dataset.json, imagesTr, labelsTr. The first case (sorted ids) is
    the fit case for the intensity intervals; up to ``max_cases`` cases are read;
    ``slices_per_case`` evenly spaced slices holding organs are superpixelised per case.
    spacing_mm: in-plane spacing of the preprocessed slices (1.5 mm like the real-CT figures;
    min_size stays 110 mm^2, i.e. ``round(110 / spacing_mm^2)`` pixels).
    Writes ``out_json`` (default ``<dataset_dir>/realism.json``) and returns the dict:
    ``{"intensity_interval": {organ: {"interval_hu", "dice_fit", "dice_other"}},
    "superpixels": {"scale_100": {"regions_median", "asa", "boundary_recall"}, "scale_200": ...},
    "real_ct", "targets", "within_targets", ...}``.
    """
    root = Path(dataset_dir)
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
        labels = {k: int(v) for k, v in meta["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(meta_path, f"cannot read dataset labels ({exc})") from exc
    if max_cases < 2 or slices_per_case < 1:
        raise ValueError(f"Illegal max_cases {max_cases} (need >= 2) or slices_per_case {slices_per_case}")
    images = sorted((root / "imagesTr").glob("*_0000.nii.gz"))[:max_cases]
    if len(images) < 2:
        raise DataError(root / "imagesTr", f"need at least 2 cases for the realism report, found {len(images)}")
    if spacing_mm <= 0:
        raise ValueError(f"Illegal spacing_mm {spacing_mm}: must be > 0")
    cfg = PreprocessConfig(window_hu=WINDOW_HU, spacing_mm=spacing_mm)
    min_size = max(1, int(round(MIN_SIZE_MM2 / spacing_mm**2)))
    case_ids = [p.name[: -len("_0000.nii.gz")] for p in images]

    fit_intervals: dict[str, tuple[int, int]] = {}
    interval: dict[str, dict] = {}
    other: dict[str, list[float]] = {name: [] for name in INTERVAL_ORGANS}
    per_scale = {s: {"regions": [], "asa": [], "recall": []} for s in SCALES}
    for k, (case_id, image_path) in enumerate(zip(case_ids, images, strict=True)):
        hu, windowed, body, lab = _load_case(image_path, root / "labelsTr" / f"{case_id}.nii.gz", cfg)
        for name in INTERVAL_ORGANS:
            if name not in labels:
                continue
            organ = (lab == labels[name]) & body
            if k == 0:
                if not organ.any():
                    continue
                dice, edges = interval_dice_table(hu, organ, body)
                i, j = np.unravel_index(np.nanargmax(dice), dice.shape)
                fit_intervals[name] = (int(i), int(j))
                interval[name] = {"interval_hu": [float(edges[i]), float(edges[j] + HU_STEP)],
                                  "dice_fit": float(dice[i, j])}
            elif name in fit_intervals:
                i, j = fit_intervals[name]
                bins = _hu_bins(hu, HU_STEP, len(np.arange(*WINDOW_HU, HU_STEP)))
                pred = body & (bins >= i) & (bins <= j)
                denom = pred.sum() + organ.sum()
                other[name].append(float(2.0 * (pred & organ).sum() / denom) if denom else float("nan"))
        organ_slices = np.flatnonzero((lab > 0).any(axis=(1, 2)))
        if organ_slices.size == 0:
            continue
        picks = np.unique(np.linspace(0, organ_slices.size - 1, slices_per_case).round().astype(int))
        for z in organ_slices[picks]:
            if not body[z].any():
                continue
            for scale in SCALES:
                regions = felzenszwalb(windowed[z], scale=scale, sigma=SIGMA, min_size=min_size) + 1
                regions[~body[z]] = 0
                per_scale[scale]["regions"].append(int(np.unique(regions[regions > 0]).size))
                per_scale[scale]["asa"].append(achievable_segmentation_accuracy(regions, lab[z]))
                per_scale[scale]["recall"].append(boundary_recall(regions, lab[z], 2.0))
    for name in interval:
        values = [v for v in other[name] if np.isfinite(v)]
        interval[name]["dice_other"] = float(np.mean(values)) if values else float("nan")
    superpixels = {
        f"scale_{int(s)}": {
            "regions_median": float(np.median(v["regions"])) if v["regions"] else float("nan"),
            "asa": float(np.nanmean(v["asa"])) if v["asa"] else float("nan"),
            "boundary_recall": float(np.nanmean(v["recall"])) if v["recall"] else float("nan"),
            "slices": len(v["regions"]),
        }
        for s, v in per_scale.items()
    }
    report = {
        "dataset": str(root),
        "cases": case_ids,
        "fit_case": case_ids[0],
        "preprocess": {"spacing_mm": spacing_mm, "window_hu": list(WINDOW_HU)},
        "superpixel_settings": {"sigma": SIGMA, "min_size_px": min_size, "min_size_mm2": MIN_SIZE_MM2},
        "intensity_interval": interval,
        "superpixels": superpixels,
        "real_ct": REAL_CT,
        "targets": TARGETS,
    }
    report["within_targets"] = _within_targets(report)
    atomic_write_json(Path(out_json) if out_json is not None else root / "realism.json", report)
    return report


def _within_targets(report: dict) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    for name, (lo, hi) in TARGETS["interval_dice_fit"].items():
        value = report["intensity_interval"].get(name, {}).get("dice_fit", float("nan"))
        checks[f"interval_dice_fit_{name}"] = bool(lo <= value <= hi)
    for scale_key, stats in report["superpixels"].items():
        for metric in ("regions_median", "asa", "boundary_recall"):
            lo, hi = TARGETS[metric]
            checks[f"{scale_key}_{metric}"] = bool(lo <= stats[metric] <= hi)
    return checks


def format_realism_table(report: dict) -> str:
    """Markdown tables of the report beside the real-CT figures and targets."""
    lines = [f"Intensity-interval Dice (fit on {report['fit_case']}, applied to the other cases)", "",
             "| organ | interval HU | Dice fit | Dice other | real CT fit | real CT other | target fit |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["intensity_interval"].items():
        lo, hi = row["interval_hu"]
        target = TARGETS["interval_dice_fit"].get(name)
        target_text = f"<= {target[1]:.2f}" if target else "-"
        lines.append(f"| {name} | {lo:.0f}..{hi:.0f} | {row['dice_fit']:.3f} | {row['dice_other']:.3f} "
                     f"| {REAL_CT['interval_dice_fit'].get(name, float('nan')):.2f} "
                     f"| {REAL_CT['interval_dice_other'].get(name, float('nan')):.2f} "
                     f"| {target_text} |")
    lines += ["", f"Felzenszwalb superpixels (sigma 0.8, min_size 110 mm^2, "
              f"{report['preprocess']['spacing_mm']:g} mm)", "",
              "| scale | regions/slice (median) | ASA | boundary recall (2 px) | real CT | target |",
              "|---|---|---|---|---|---|"]
    for key, row in report["superpixels"].items():
        real = REAL_CT.get(key, {})
        lines.append(f"| {key.split('_')[1]} | {row['regions_median']:.0f} | {row['asa']:.3f} "
                     f"| {row['boundary_recall']:.3f} | {real.get('regions_median', '-')}, "
                     f"{real.get('asa', '-')}, {real.get('boundary_recall', '-')} "
                     f"| 40-130, 0.90-0.97, 0.75-0.92 |")
    return "\n".join(lines)
