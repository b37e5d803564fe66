"""How much a phantom dataset behaves like real abdominal CT, by measured criteria.

Two measures, both on slices preprocessed like network input (the
:class:`~lrcseg.config.PreprocessConfig` defaults: 1.5 mm in-plane, window -175..250 HU, body
mask; :func:`lrcseg.data.preprocess.preprocess_volume`):

1. **Intensity-interval Dice.** For each organ, the single HU interval ``[lo, hi]`` (5 HU
   grid over the window) that maximises ``Dice(body & lo <= HU <= hi, organ)`` on the fit
   case, found exhaustively from cumulative histograms: with ``C_o``, ``C_b`` the cumulative
   organ / body counts, ``Dice(i, j) = 2 (C_o[j+1] - C_o[i]) / (C_b[j+1] - C_b[i] + |organ|)``.
   The interval is then applied unchanged to the other cases. If organs could be told apart by
   intensity alone, these Dice values would be high.
2. **Superpixel quality.** Felzenszwalb regions of each windowed slice at scale 100 and 200
   through :func:`lrcseg.superpixels.regions.compute_regions` with the other
   :class:`~lrcseg.config.SuperpixelConfig` defaults (sigma 0.8, min_size 110 mm^2 in pixels,
   0 outside the body) and skimage's implementation, the reference the real-CT figures were
   measured with; per slice the region count, ASA and organ-boundary recall within 2 px
   (:mod:`lrcseg.superpixels.metrics`).

:data:`REAL_CT` holds the same figures measured on real CT and :data:`TARGETS` the accepted
ranges for phantoms (issue 3).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from lrcseg.config import PreprocessConfig, SuperpixelConfig
from lrcseg.data.layouts import Case, load_dataset
from lrcseg.data.preprocess import preprocess_volume
from lrcseg.data.readers import read_image, read_label
from lrcseg.errors import DataError
from lrcseg.io_utils import atomic_write_json
from lrcseg.superpixels.metrics import achievable_segmentation_accuracy, boundary_recall
from lrcseg.superpixels.regions import compute_regions, min_size_pixels

# The preprocessing and superpixel defaults, which the real-CT figures were measured with.
WINDOW_HU = PreprocessConfig().window_hu
SPACING_MM = PreprocessConfig().spacing_mm
SUPERPIXELS = SuperpixelConfig(implementation="skimage")
# Felzenszwalb scales of the report: the default and a coarser one (REAL_CT has both).
SCALES = (SUPERPIXELS.scale, 200.0)
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
    """Read and preprocess one labelled case: returns ``(hu, windowed, body, label)``, each
    ``(Z, H, W)``: float HU recovered from the window, the float32 [0, 1] window channel, the
    bool body mask and the integer label map."""
    image = read_image(image_path)
    label = read_label(label_path, image)
    pre = preprocess_volume(image, cfg, label)
    hu = WINDOW_HU[0] + pre.image[:, 0] * (WINDOW_HU[1] - WINDOW_HU[0])  # (Z, H, W)
    return hu, pre.image[:, 0], pre.body, pre.label


def realism_report(dataset_dir: str | os.PathLike, max_cases: int = 4, slices_per_case: int = 12,
                   out_json: str | os.PathLike | None = None, spacing_mm: float = SPACING_MM) -> dict:
    """Measure a phantom (or any labelled) dataset against real-CT figures.

    dataset_dir: a dataset with label names that :func:`lrcseg.data.layouts.load_dataset` reads
    (an nnU-Net raw folder: dataset.json, imagesTr, labelsTr). The first labelled training case
    (in the layout's order: sorted ids for nnU-Net) is the fit case for the intensity
    intervals; up to ``max_cases`` labelled training cases are read; ``slices_per_case`` evenly
    spaced slices holding organs are superpixelised per case.
    spacing_mm: in-plane spacing of the preprocessed slices (1.5 mm like the real-CT figures;
    min_size stays 110 mm^2, i.e. ``round(110 / spacing_mm^2)`` pixels).
    Writes ``out_json`` (default ``<dataset_dir>/realism.json``) and returns the dict:
    ``{"intensity_interval": {organ: {"interval_hu", "dice_fit", "dice_other"}},
    "superpixels": {"scale_100": {"regions_median", "asa", "boundary_recall"}, "scale_200": ...},
    "real_ct", "targets", "within_targets", ...}``.
    Raises ValueError for max_cases < 2, slices_per_case < 1 or spacing_mm <= 0, DataError for
    a dataset without label names or with fewer than 2 labelled training cases.
    """
    if max_cases < 2 or slices_per_case < 1:
        raise ValueError(f"Illegal max_cases {max_cases} (need >= 2) or slices_per_case {slices_per_case}")
    if spacing_mm <= 0:
        raise ValueError(f"Illegal spacing_mm {spacing_mm}: must be > 0")
    root = Path(dataset_dir)
    organ_ids, cases = _report_cases(root, max_cases)
    cfg = PreprocessConfig(window_hu=WINDOW_HU, spacing_mm=spacing_mm)
    superpixels = {scale: replace(SUPERPIXELS, scale=scale) for scale in SCALES}

    fits: dict[str, tuple[int, int]] = {}  # organ -> HU bins (i, j) fit on the first case
    interval: dict[str, dict] = {}
    other: dict[str, list[float]] = {}  # organ -> Dice of its fit interval on each other case
    per_scale = {scale: {"regions": [], "asa": [], "recall": []} for scale in SCALES}
    for k, case in enumerate(cases):
        hu, windowed, body, lab = _load_case(case.image, case.label, cfg)
        if k == 0:
            fits, interval = _fit_intervals(hu, body, lab, organ_ids)
            other = {name: [] for name in fits}
        else:
            for name, fit in fits.items():
                other[name].append(_interval_dice(hu, body, (lab == organ_ids[name]) & body, fit))
        for z in _organ_slice_picks(lab, slices_per_case):
            if body[z].any():
                _add_superpixel_quality(per_scale, windowed[z], body[z], lab[z], spacing_mm, superpixels)
    for name, values in other.items():
        finite = [v for v in values if np.isfinite(v)]
        interval[name]["dice_other"] = float(np.mean(finite)) if finite else float("nan")
    report = {
        "dataset": str(root),
        "cases": [c.id for c in cases],
        "fit_case": cases[0].id,
        "preprocess": {"spacing_mm": spacing_mm, "window_hu": list(WINDOW_HU)},
        "superpixel_settings": {"sigma": SUPERPIXELS.sigma,
                                "min_size_px": min_size_pixels(SUPERPIXELS.min_size_mm2, spacing_mm),
                                "min_size_mm2": SUPERPIXELS.min_size_mm2},
        "intensity_interval": interval,
        "superpixels": {f"scale_{int(scale)}": _summarise_scale(stats) for scale, stats in per_scale.items()},
        "real_ct": REAL_CT,
        "targets": TARGETS,
    }
    report["within_targets"] = _within_targets(report)
    atomic_write_json(Path(out_json) if out_json is not None else root / "realism.json", report)
    return report


def _report_cases(root: Path, max_cases: int) -> tuple[dict[str, int], list[Case]]:
    """The dataset's ids of :data:`INTERVAL_ORGANS` it labels (name -> id, in that order) and
    its first ``max_cases`` labelled training cases."""
    dataset = load_dataset(root)
    if not dataset.labels:
        raise DataError(root, "the realism report needs a dataset with label names "
                              "(nnU-Net dataset.json or datalist 'labels')")
    cases = [c for c in dataset.cases if c.label is not None][:max_cases]
    if len(cases) < 2:
        raise DataError(root, f"need at least 2 labelled training cases for the realism report, "
                              f"found {len(cases)}")
    organ_ids = {name: dataset.labels[name] for name in INTERVAL_ORGANS if name in dataset.labels}
    return organ_ids, cases


def _fit_intervals(hu: np.ndarray, body: np.ndarray, lab: np.ndarray, organ_ids: dict[str, int]
                   ) -> tuple[dict[str, tuple[int, int]], dict[str, dict]]:
    """Best HU interval per organ present on the fit case: (bin index pairs ``(i, j)``,
    report rows ``{"interval_hu": [lo, hi], "dice_fit"}``). hu, body, lab: ``(Z, H, W)``."""
    fits, rows = {}, {}
    for name, label_id in organ_ids.items():
        organ = (lab == label_id) & body
        if not organ.any():
            continue
        dice, edges = interval_dice_table(hu, organ, body)
        i, j = np.unravel_index(np.nanargmax(dice), dice.shape)
        fits[name] = (int(i), int(j))
        rows[name] = {"interval_hu": [float(edges[i]), float(edges[j] + HU_STEP)],
                      "dice_fit": float(dice[i, j])}
    return fits, rows


def _interval_dice(hu: np.ndarray, body: np.ndarray, organ: np.ndarray, fit: tuple[int, int]) -> float:
    """Dice of ``body & bins i..j`` (``fit = (i, j)``) vs ``organ``; NaN if both are empty."""
    i, j = fit
    bins = _hu_bins(hu, HU_STEP, len(np.arange(*WINDOW_HU, HU_STEP)))
    pred = body & (bins >= i) & (bins <= j)
    denom = pred.sum() + organ.sum()
    return float(2.0 * (pred & organ).sum() / denom) if denom else float("nan")


def _organ_slice_picks(lab: np.ndarray, slices_per_case: int) -> np.ndarray:
    """Up to ``slices_per_case`` evenly spaced z indices among the slices of ``lab``
    ``(Z, H, W)`` that hold an organ label (none if no slice does)."""
    organ_slices = np.flatnonzero((lab > 0).any(axis=(1, 2)))
    if organ_slices.size == 0:
        return organ_slices
    picks = np.unique(np.linspace(0, organ_slices.size - 1, slices_per_case).round().astype(int))
    return organ_slices[picks]


def _add_superpixel_quality(per_scale: dict[float, dict[str, list]], windowed: np.ndarray,
                            body: np.ndarray, lab: np.ndarray, spacing_mm: float,
                            superpixels: dict[float, SuperpixelConfig]) -> None:
    """Append one slice's region count, ASA and boundary recall (2 px) at every scale.
    windowed: ``(H, W)`` float in [0, 1]; body, lab: ``(H, W)``."""
    for scale, cfg in superpixels.items():
        regions = compute_regions(windowed, body, spacing_mm, cfg)  # ids 1..R inside the body
        per_scale[scale]["regions"].append(int(regions.max()))
        per_scale[scale]["asa"].append(achievable_segmentation_accuracy(regions, lab))
        per_scale[scale]["recall"].append(boundary_recall(regions, lab, 2.0))


def _summarise_scale(stats: dict[str, list]) -> dict:
    """Median region count, mean ASA and boundary recall over the slices (NaN if none)."""
    return {
        "regions_median": float(np.median(stats["regions"])) if stats["regions"] else float("nan"),
        "asa": float(np.nanmean(stats["asa"])) if stats["asa"] else float("nan"),
        "boundary_recall": float(np.nanmean(stats["recall"])) if stats["recall"] else float("nan"),
        "slices": len(stats["regions"]),
    }


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
    settings = report["superpixel_settings"]
    lines += ["", f"Felzenszwalb superpixels (sigma {settings['sigma']:g}, min_size "
              f"{settings['min_size_mm2']:g} mm^2, {report['preprocess']['spacing_mm']:g} mm)", "",
              "| scale | regions/slice (median) | ASA | boundary recall (2 px) | real CT | target |",
              "|---|---|---|---|---|---|"]
    for key, row in report["superpixels"].items():
        real = REAL_CT.get(key, {})
        lines.append(f"| {key.split('_')[1]} | {row['regions_median']:.0f} | {row['asa']:.3f} "
                     f"| {row['boundary_recall']:.3f} | {real.get('regions_median', '-')}, "
                     f"{real.get('asa', '-')}, {real.get('boundary_recall', '-')} "
                     f"| 40-130, 0.90-0.97, 0.75-0.92 |")
    return "\n".join(lines)
