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
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold

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


# --------------------------------------------------------------------------- anatomy

# Body: HU above this, largest 3D component, holes filled per axial slice.
BODY_HU = -500.0
BODY_OPEN_MM = 6.0
# Bone of the vertebral body: voxels above BONE_HU and those above BONE_LOW_HU connected to
# them (hysteresis: the cancellous core, 100-250 HU in real CT, around its cortex).
BONE_HU = 200.0
BONE_LOW_HU = 120.0
# Where the vertebral body is looked for on each axial slice: within this many mm of the body's
# left-right centre, in the posterior AP_SEARCH share of the body (0 = posterior edge).
SPINE_SEARCH_LR_MM = 40.0
SPINE_AP_SEARCH = 0.7
# The vertebral body's inscribed radius is at least this (real lumbar bodies: 12-20 mm); a thinner
# midline bone (posterior arch, aorta wall, disc level) is not taken for it.
SPINE_MIN_RADIUS_MM = 8.0
# Gaps in the cortex up to about twice this are closed before the core is filled.
SPINE_CLOSE_MM = 3.0
# A slice's pick further than this from the running median of its neighbours (within
# SPINE_TRACK_MM along z) is dropped, and its position interpolated from the others.
SPINE_OUTLIER_MM = 12.0
SPINE_TRACK_MM = 40.0


def load_canonical_case(image_path: str | os.PathLike, label_path: str | os.PathLike
                        ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read an image and its label map in RAS+ voxel order (``nib.as_closest_canonical``
    through :func:`lrcseg.data.readers.read_image`): returns ``(hu, label, spacing_mm)``, hu
    float32 ``(X, Y, Z)`` (+x patient right, +y anterior, +z superior), label integer of the
    same shape, spacing ``(sx, sy, sz)`` mm."""
    image = read_image(image_path)
    label = read_label(label_path, image)
    return image.array, label.array, image.spacing


def anatomy_report(image: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float],
                   label_names: dict[str, int]) -> dict:
    """Where the organs lie: relative to the body outline and the spine, their volumes, contacts.

    image: float HU ``(X, Y, Z)`` and label: integer ids of the same shape, both in RAS+ voxel
    order (:func:`load_canonical_case`: +x patient right, +y anterior, +z superior).
    spacing: ``(sx, sy, sz)`` mm. label_names: organ name -> id ("background" is skipped).

    - **Body**: :func:`body_mask` (``HU > -500``, without the table, holes filled).
    - **Vertebral body** per axial slice: bone (hysteresis ``HU > 200`` grown over ``> 120``)
      within 40 mm of the body's LR centre in the posterior 70 % of the body, closed (3 mm),
      holes filled; the point deepest inside (distance transform ``d``) must be >= 8 mm in;
      the vertebral body is its component after an opening with a ``0.7 d`` disk (which cuts
      the pedicles to the posterior arch). Picks off the running median of their neighbours by > 12 mm are
      dropped and all slices interpolated along z.
    - Per organ: ``volume_ml``; ``lr_rel``, ``ap_rel`` (mean over its voxels of the position in
      its slice's body bounding box: 0 = patient left / posterior edge, 1 = right / anterior)
      and ``si_rel`` (in the body's z extent, 0 = lowest slice); ``from_spine_lr_mm``,
      ``from_spine_ap_mm``: the organ's centroid minus the vertebral body's centroid on the
      same slices (voxel-weighted; + = patient right / anterior); ``z_top_mm``,
      ``z_centroid_mm``, ``z_bottom_mm`` relative to the highest slice holding the liver (if
      labelled, else the top slice); ``enclosed_by``: other organs whose outline (mask with
      holes filled per axial slice) holds >= 5 % of its voxels, with that fraction.
    - ``touching``: organ pairs adjacent by 6-connectivity, with the number of shared voxel
      faces and their area in mm^2.
    - ``spine``: the vertebral body's ``lr_rel``, ``ap_rel`` (voxel mean over the slices it was
      found on), ``half_width_mm`` / ``half_depth_mm`` (median half extent LR / AP),
      ``slices_found`` of ``slices``; ``body``: median width and depth (mm), z extent (mm).
    Raises ValueError for mismatched shapes, bad spacing or an image without a body.
    """
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"Illegal image {image.shape} / label {label.shape}: need equal 3D shapes")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"Illegal spacing {spacing}: need three values > 0 mm")
    body = body_mask(image, spacing)
    if not body.any():
        raise ValueError("no body in the image: no voxel above -500 HU")
    box = _slice_boxes(body)
    spine = _vertebral_body_track(image, body, box, spacing)
    organs = {name: i for name, i in label_names.items() if name != "background" and (label == i).any()}
    liver_id = organs.get("liver")
    z_ref = (np.flatnonzero((label == liver_id).any(axis=(0, 1)))[-1] if liver_id is not None
             else image.shape[2] - 1)
    outlines = {name: _filled_per_slice(label == i) for name, i in organs.items()}
    rows = {}
    for name, i in organs.items():
        rows[name] = _organ_row(label == i, box, spine, spacing, z_ref)
        enclosed = {other: float(outline[label == i].mean()) for other, outline in outlines.items()
                    if other != name}
        rows[name]["enclosed_by"] = {k: round(v, 3) for k, v in enclosed.items() if v >= 0.05}
    zs = np.flatnonzero(box["valid"])
    found = spine["found"]
    return {
        "spacing_mm": list(spacing),
        "body": {"width_mm": float(np.median(box["width"][zs]) * spacing[0]),
                 "depth_mm": float(np.median(box["depth"][zs]) * spacing[1]),
                 "z_extent_mm": float((zs[-1] - zs[0]) * spacing[2])},
        "spine": {"lr_rel": spine["lr_rel"], "ap_rel": spine["ap_rel"],
                  "half_width_mm": spine["half_width_mm"], "half_depth_mm": spine["half_depth_mm"],
                  "slices_found": int(found.sum()), "slices": int(zs.size)},
        "organs": rows,
        "touching": touching_pairs(label, spacing, organs),
    }


def body_mask(image: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """``HU > -500`` opened per axial slice with a 6 mm disk (drops the table and cushions
    beneath the patient), its largest 3D connected component, holes filled per axial slice:
    bool ``(X, Y, Z)``. spacing: ``(sx, sy, sz)`` mm."""
    disk = _disk(BODY_OPEN_MM, spacing[0], spacing[1])[:, :, None]
    components, n = ndimage.label(ndimage.binary_opening(image > BODY_HU, disk))
    if n == 0:
        return np.zeros(image.shape, bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return _filled_per_slice(components == int(np.argmax(sizes)))


def touching_pairs(label: np.ndarray, spacing: tuple[float, float, float],
                   organs: dict[str, int]) -> list[dict]:
    """Organ pairs sharing voxel faces (6-connectivity): ``[{"organs": [a, b], "faces": n,
    "area_mm2": A}]``, a < b by id, sorted by area (largest first). label: ``(X, Y, Z)``."""
    names = {i: name for name, i in organs.items()}
    faces: dict[tuple[int, int], int] = {}
    areas: dict[tuple[int, int], float] = {}
    for axis in range(3):
        face_mm2 = float(np.prod([s for k, s in enumerate(spacing) if k != axis]))
        a = np.moveaxis(label, axis, 0)[:-1].ravel()
        b = np.moveaxis(label, axis, 0)[1:].ravel()
        keep = (a != b) & np.isin(a, list(names)) & np.isin(b, list(names))
        pairs = np.stack([np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])], axis=1)
        for (i, j), count in zip(*np.unique(pairs, axis=0, return_counts=True), strict=True):
            key = (int(i), int(j))
            faces[key] = faces.get(key, 0) + int(count)
            areas[key] = areas.get(key, 0.0) + int(count) * face_mm2
    rows = [{"organs": [names[i], names[j]], "faces": faces[(i, j)], "area_mm2": round(areas[(i, j)], 1)}
            for i, j in faces]
    return sorted(rows, key=lambda r: -r["area_mm2"])


def _filled_per_slice(mask: np.ndarray) -> np.ndarray:
    """Holes filled on every axial slice of a bool ``(X, Y, Z)`` mask."""
    out = np.zeros_like(mask)
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        out[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return out


def _slice_boxes(body: np.ndarray) -> dict[str, np.ndarray]:
    """Per axial slice, the body's bounding box in voxels: ``x0, x1, y0, y1`` (inclusive ends),
    ``width = x1 - x0``, ``depth = y1 - y0`` and ``valid`` (the slice holds body), each ``(Z,)``."""
    any_x = body.any(axis=1)  # (X, Z)
    any_y = body.any(axis=0)  # (Y, Z)
    valid = any_x.any(axis=0)
    x0 = np.where(valid, np.argmax(any_x, axis=0), 0)
    x1 = np.where(valid, body.shape[0] - 1 - np.argmax(any_x[::-1], axis=0), 0)
    y0 = np.where(valid, np.argmax(any_y, axis=0), 0)
    y1 = np.where(valid, body.shape[1] - 1 - np.argmax(any_y[::-1], axis=0), 0)
    return {"x0": x0, "x1": x1, "y0": y0, "y1": y1, "width": np.maximum(x1 - x0, 1),
            "depth": np.maximum(y1 - y0, 1), "valid": valid}


def _vertebral_body_track(image: np.ndarray, body: np.ndarray, box: dict[str, np.ndarray],
                          spacing: tuple[float, float, float]) -> dict:
    """The vertebral body on every axial slice (see :func:`anatomy_report`): returns
    ``{"x", "y"}`` its centroid in voxels ``(Z,)`` (interpolated where not found; NaN if found
    nowhere), ``found`` bool ``(Z,)``, and its mean ``lr_rel``, ``ap_rel``, median
    ``half_width_mm``, ``half_depth_mm`` (NaN if found nowhere)."""
    sx, sy, sz = spacing
    n_z = image.shape[2]
    cx, cy = np.full(n_z, np.nan), np.full(n_z, np.nan)
    half_w, half_d, lr_rel, ap_rel = (np.full(n_z, np.nan) for _ in range(4))
    ii = np.arange(image.shape[0])[:, None]
    jj = np.arange(image.shape[1])[None, :]
    for k in np.flatnonzero(box["valid"]):
        x_mid = (box["x0"][k] + box["x1"][k]) / 2.0
        band = (np.abs(ii - x_mid) * sx < SPINE_SEARCH_LR_MM) \
            & (jj < box["y0"][k] + SPINE_AP_SEARCH * box["depth"][k])
        seeds = (image[:, :, k] > BONE_HU) & body[:, :, k] & band
        if not seeds.any():
            continue
        crop = ndimage.find_objects(band.astype(np.uint8))[0]
        bone = apply_hysteresis_threshold(image[crop + (k,)], BONE_LOW_HU, BONE_HU) & band[crop]
        bone = np.pad(bone, 3)  # margin: closing and filling must not touch the edge
        solid = ndimage.binary_fill_holes(ndimage.binary_closing(bone, _disk(SPINE_CLOSE_MM, sx, sy)))
        depth = ndimage.distance_transform_edt(solid, sampling=(sx, sy))
        if depth.max() < SPINE_MIN_RADIUS_MM:
            continue
        # an opening by a disk smaller than the body's own inscribed circle keeps the body's
        # outline and cuts the thinner pedicles that join it to the posterior arch
        core = ndimage.binary_opening(solid, _disk(0.7 * depth.max(), sx, sy)) | (depth >= 0.7 * depth.max())
        components, _ = ndimage.label(core)
        # one voxel back onto the solid: the digital opening shaves the outline's extremes
        vb = ndimage.binary_dilation(components == components.flat[int(np.argmax(depth))]) & solid
        xs, ys = np.nonzero(vb)
        xs = xs - 3 + crop[0].start
        ys = ys - 3 + crop[1].start
        cx[k], cy[k] = xs.mean(), ys.mean()
        half_w[k] = (xs.max() - xs.min() + 1) * sx / 2.0
        half_d[k] = (ys.max() - ys.min() + 1) * sy / 2.0
        lr_rel[k] = (cx[k] - box["x0"][k]) / box["width"][k]
        ap_rel[k] = (cy[k] - box["y0"][k]) / box["depth"][k]
    picked = np.isfinite(cx)
    found = picked.copy()
    window = max(1, int(round(SPINE_TRACK_MM / sz)))
    for k in np.flatnonzero(picked):
        near = picked.copy()
        near[: max(0, k - window)] = False
        near[k + window + 1:] = False
        off = np.hypot((cx[k] - np.median(cx[near])) * sx, (cy[k] - np.median(cy[near])) * sy)
        if off > SPINE_OUTLIER_MM:
            found[k] = False
    track = {"found": found, "x": np.full(n_z, np.nan), "y": np.full(n_z, np.nan)}
    if found.any():
        z = np.arange(n_z)
        track["x"] = np.interp(z, z[found], cx[found])
        track["y"] = np.interp(z, z[found], cy[found])
    for key, values in (("lr_rel", lr_rel), ("ap_rel", ap_rel)):
        track[key] = float(np.mean(values[found])) if found.any() else float("nan")
    for key, values in (("half_width_mm", half_w), ("half_depth_mm", half_d)):
        track[key] = float(np.median(values[found])) if found.any() else float("nan")
    return track


def _disk(radius_mm: float, sx: float, sy: float) -> np.ndarray:
    """A bool disk of ``radius_mm`` on a grid of ``sx`` x ``sy`` mm pixels (at least 3 x 3)."""
    rx, ry = max(1, int(radius_mm / sx)), max(1, int(radius_mm / sy))
    x = np.arange(-rx, rx + 1)[:, None] * sx
    y = np.arange(-ry, ry + 1)[None, :] * sy
    return (x**2 + y**2) <= max(radius_mm, sx, sy) ** 2


def _organ_row(mask: np.ndarray, box: dict[str, np.ndarray], spine: dict,
               spacing: tuple[float, float, float], z_ref: int) -> dict:
    """One organ's volume, relative position in the body, offset from the vertebral body and
    z extent (see :func:`anatomy_report`). mask: bool ``(X, Y, Z)``."""
    sx, sy, sz = spacing
    xs, ys, zs = np.nonzero(mask)
    z_valid = np.flatnonzero(box["valid"])
    row = {
        "voxels": int(xs.size),
        "volume_ml": round(xs.size * sx * sy * sz / 1000.0, 2),
        "lr_rel": float(np.mean((xs - box["x0"][zs]) / box["width"][zs])),
        "ap_rel": float(np.mean((ys - box["y0"][zs]) / box["depth"][zs])),
        "si_rel": float(np.mean((zs - z_valid[0]) / max(z_valid[-1] - z_valid[0], 1))),
        "from_spine_lr_mm": float(np.mean(xs - spine["x"][zs]) * sx),
        "from_spine_ap_mm": float(np.mean(ys - spine["y"][zs]) * sy),
        "z_top_mm": float((zs.max() - z_ref) * sz),
        "z_centroid_mm": float((zs.mean() - z_ref) * sz),
        "z_bottom_mm": float((zs.min() - z_ref) * sz),
    }
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
