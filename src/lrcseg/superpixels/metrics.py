"""Quality of a region map against an organ label map.

Both measures follow the definitions used for the figures in docs/METHOD.md section 2
(measured on real abdominal CT): ASA and organ-boundary recall, on body pixels only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries


def achievable_segmentation_accuracy(regions: np.ndarray, labels: np.ndarray) -> float:
    """ASA: share of body pixels labelled right if each region takes its majority label.

    regions: int array (H, W), 0 = outside the body (ignored), 1..R region ids.
    labels: int array (H, W), organ ids (0 = body tissue that is no organ, still a class).
    Returns a float in [0, 1]; NaN if there are no body pixels.
    """
    regions, labels = _check_pair(regions, labels)
    body = regions > 0
    n = int(body.sum())
    if n == 0:
        return float("nan")
    r = regions[body].astype(np.int64)
    lab = labels[body].astype(np.int64)
    n_lab = int(lab.max()) + 1
    counts = np.bincount(r * n_lab + lab, minlength=(int(r.max()) + 1) * n_lab)
    return float(counts.reshape(-1, n_lab).max(axis=1).sum() / n)


def boundary_recall(regions: np.ndarray, labels: np.ndarray, tolerance_px: float = 2.0) -> float:
    """Share of organ-boundary pixels within ``tolerance_px`` of a region boundary.

    Organ boundaries are label boundaries inside the body (``find_boundaries`` mode "inner"
    of the label map, restricted to regions > 0); region boundaries likewise from the region
    map. Returns NaN when the slice holds no organ boundary.
    """
    regions, labels = _check_pair(regions, labels)
    body = regions > 0
    organ_edges = find_boundaries(labels, mode="inner") & body
    if not organ_edges.any():
        return float("nan")
    region_edges = find_boundaries(regions, mode="inner")
    if not region_edges.any():
        return 0.0
    dist = ndimage.distance_transform_edt(~region_edges)
    return float((dist[organ_edges] <= tolerance_px).mean())


def region_stats(regions: np.ndarray, pixel_area_mm2: float = 1.0) -> dict[str, float]:
    """Number of regions and their size distribution (mm^2) for one region map (H, W)."""
    ids, sizes = np.unique(regions[regions > 0], return_counts=True)
    if len(ids) == 0:
        return {"regions": 0, "size_min_mm2": 0.0, "size_median_mm2": 0.0, "size_max_mm2": 0.0}
    area = sizes * pixel_area_mm2
    return {
        "regions": int(len(ids)),
        "size_min_mm2": float(area.min()),
        "size_median_mm2": float(np.median(area)),
        "size_max_mm2": float(area.max()),
    }


def _check_pair(regions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    regions = np.asarray(regions)
    labels = np.asarray(labels)
    if regions.shape != labels.shape or regions.ndim != 2:
        raise ValueError(f"regions {regions.shape} and labels {labels.shape} must be equal 2D shapes")
    if regions.min(initial=0) < 0 or labels.min(initial=0) < 0:
        raise ValueError("regions and labels must be non-negative integers")
    return regions, labels
