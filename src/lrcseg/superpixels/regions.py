"""Local regions for LRC: Felzenszwalb superpixels (or grid cells) inside the body.

Computed once on the un-augmented preprocessed slice (the soft-tissue window channel, values
in [0, 1], or several windows stacked as channels: ``SuperpixelConfig.windows_hu``); pixels
outside the body get id 0 (ignored by the loss), the others ids 1..R.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.segmentation import felzenszwalb

from lrcseg.config import SuperpixelConfig
from lrcseg.superpixels.felzenszwalb import felzenszwalb_fast

_RANGE_TOLERANCE = 1e-3


def min_size_pixels(min_size_mm2: float, spacing_mm: float) -> int:
    """Minimum region area in pixels: ``round(min_size_mm2 / spacing_mm**2)``."""
    return int(round(min_size_mm2 / (spacing_mm * spacing_mm)))


def windowed_float32(image: np.ndarray, what: str) -> np.ndarray:
    """``image`` as float32 after checking it is a windowed image: finite, values in [0, 1]
    (within a small tolerance). ValueError naming ``what`` ("slice", "volume") otherwise."""
    image = np.asarray(image).astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError(f"{what} holds {int((~np.isfinite(image)).sum())} NaN/inf values")
    lo, hi = float(image.min()), float(image.max())
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"{what} values span [{lo:.4g}, {hi:.4g}]: expected a windowed {what} in "
                         "[0, 1]")
    return image


def compute_regions(image: np.ndarray, body: np.ndarray, spacing_mm: float,
                    cfg: SuperpixelConfig) -> np.ndarray:
    """Region map of one slice: 0 outside the body, contiguous ids 1..R inside.

    image: (H, W) float in [0, 1], the soft-tissue window channel of the preprocessed slice,
        or (C, H, W) for C windows as channels (Felzenszwalb weighs an edge by the Euclidean
        distance of the C values); H, W >= 2; a constant image is legal and gives one region.
    body: (H, W) bool body mask.
    spacing_mm: in-plane pixel spacing; ``cfg.min_size_mm2`` and ``cfg.grid_cell_mm`` are
        converted to pixels with it.
    cfg.method "felzenszwalb": Felzenszwalb on the whole slice (``cfg.implementation`` "fast"
        = ours, "skimage" = the reference) with ``min_size = min_size_mm2 / spacing_mm**2``;
        "grid": square cells of side ``grid_cell_mm`` (ablation).
    The segmentation runs on the whole slice, then pixels outside the body are set to 0 and the
    remaining ids renumbered 1..R in raster order of first appearance. A region that the body
    mask cuts into disconnected parts keeps one id (it was one region on the image), and a
    region mostly outside the body may leave a fragment smaller than min_size inside it.
    Returns (H, W) int32.
    Raises ValueError for non-2D input, shape mismatch, sides < 2, non-finite values, values
    outside [0, 1] or a non-positive spacing.
    """
    image = np.asarray(image)
    body = np.asarray(body)
    if image.ndim not in (2, 3):
        raise ValueError(f"compute_regions needs an (H, W) or (C, H, W) slice, got shape {image.shape}")
    if body.shape != image.shape[-2:]:
        raise ValueError(f"body mask shape {body.shape} does not match image shape {image.shape}")
    if min(image.shape[-2:]) < 2:
        raise ValueError(f"slice of shape {image.shape} is too small: need H, W >= 2")
    if not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"Illegal spacing_mm {spacing_mm}: must be finite and > 0")
    image = windowed_float32(image, "slice")
    body = body.astype(bool, copy=False)

    if cfg.method == "grid":
        raw = grid_cells(body.shape, cfg.grid_cell_mm / spacing_mm)
    else:
        min_size = min_size_pixels(cfg.min_size_mm2, spacing_mm)
        segment = felzenszwalb_fast if cfg.implementation == "fast" else felzenszwalb
        channels_last = image if image.ndim == 2 else np.moveaxis(image, 0, -1)
        raw = segment(channels_last.astype(np.float64), scale=cfg.scale, sigma=cfg.sigma,
                      min_size=min_size)
    return relabel_inside(raw, body)


def grid_cells(shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Regular square cells of side ``cell_px`` pixels: (H, W) int64 cell index, row-major."""
    cell_px = max(float(cell_px), 1.0)
    h, w = shape
    rows = (np.arange(h) / cell_px).astype(np.int64)
    cols = (np.arange(w) / cell_px).astype(np.int64)
    n_cols = int(math.ceil(w / cell_px))
    return rows[:, None] * n_cols + cols[None, :]


def relabel_inside(raw: np.ndarray, body: np.ndarray) -> np.ndarray:
    """0 outside ``body``; the ids present inside renumbered 1..R in raster order. (H, W) int32."""
    out = np.zeros(raw.shape, np.int32)
    inside = raw[body]
    if inside.size == 0:
        return out
    ids, first, inverse = np.unique(inside, return_index=True, return_inverse=True)
    rank = np.empty(len(ids), np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(ids) + 1, dtype=np.int32)
    out[body] = rank[inverse.ravel()]
    return out
