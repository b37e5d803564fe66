"""Local regions in 3D: Felzenszwalb supervoxels of a whole preprocessed volume, inside the body.

The volume-level counterpart of :func:`lrcseg.superpixels.regions.compute_regions`: the same
config (``SuperpixelConfig``: scale, sigma, minimum size, windows as channels), read so that it
means in 3D what it means on a slice (docs/METHOD.md, "Supervoxels (3D)"). Voxels outside the
body get id 0, the others ids 1..R.
"""

from __future__ import annotations

import numpy as np

from lrcseg.config import SuperpixelConfig
from lrcseg.superpixels.felzenszwalb import felzenszwalb_3d
from lrcseg.superpixels.regions import relabel_inside, windowed_float32


def supervoxel_sigma(sigma_px: float, spacing_mm: tuple[float, float, float]) -> tuple[float, float, float]:
    """Per-axis smoothing (z, h, w) in voxels for ``sigma_px`` in-plane pixels, the same length in mm
    on every axis: ``sigma_px * s_h / s_axis``, so that in-plane it is exactly ``sigma_px``."""
    s_h, s_w, s_z = spacing_mm
    return (sigma_px * (s_h / s_z), sigma_px, sigma_px * (s_h / s_w))


def min_size_voxels(min_size_mm3: float, spacing_mm: tuple[float, float, float]) -> int:
    """Minimum region volume in voxels: ``round(min_size_mm3 / (s_h * s_w * s_z))``."""
    s_h, s_w, s_z = spacing_mm
    return int(round(min_size_mm3 / (s_h * s_w * s_z)))


def compute_supervoxels(image: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float],
                        cfg: SuperpixelConfig, min_size_mm3: float | None = None) -> np.ndarray:
    """Region map of one preprocessed volume: 0 outside the body, contiguous ids 1..R inside.

    image: (Z, H, W) float in [0, 1], the soft-tissue window channel of the preprocessed volume
        (``PreprocessedVolume.image[:, 0]``), or (Z, C, H, W) for C windows as channels (its
        layout ``(Z, W_n, H, W)``); Z >= 1, H, W >= 2.
    body: (Z, H, W) bool body mask.
    spacing_mm: (s_h, s_w, s_z), the order of ``PreprocessedVolume.spacing_mm``.
    cfg: ``cfg.scale`` as on a slice (k = scale / 255, region sizes counted in voxels), but
        the same scale gives larger supervoxels than superpixels: about a third of the 2D
        scale gives as many voxels per region (33 for the default 100 at 1.5 x 1.5 x 3 mm), and
        coarse scales merge organs (docs/METHOD.md); ``cfg.sigma`` in in-plane pixels, applied
        as the same length in mm along z (:func:`supervoxel_sigma`); ``cfg.windows_hu`` are the
        caller's channels, as in 2D. ``cfg.implementation`` is not used: both implementations
        give the same 2D regions, and only ours exists in 3D.
    min_size_mm3: minimum region volume; None = ``cfg.min_size_mm2 * s_z``, the smallest
        superpixel through one slice: the same number of voxels as the 2D minimum in pixels.
    Anisotropic voxels stay on their native grid, edge weights are plain intensity
    differences on every axis, and only smoothing and the minimum size use the spacing (why:
    :mod:`lrcseg.superpixels.felzenszwalb`, docs/METHOD.md "Supervoxels (3D)").
    The segmentation runs on the whole volume (6-connected, :func:`felzenszwalb_3d`), then
    voxels outside the body are set to 0 and the remaining ids renumbered 1..R in raster
    order of first appearance (z slowest). Every region of the whole volume is 6-connected and
    has at least the minimum number of voxels (unless the volume has fewer); as in 2D, a region
    the body mask cuts keeps one id, and its part inside the body may be smaller.
    Returns (Z, H, W) int32.
    Raises ValueError for input that is not (Z, H, W) or (Z, C, H, W), a shape mismatch,
    in-plane sides < 2, non-finite values, values outside [0, 1], a non-positive spacing, a
    negative ``min_size_mm3`` or ``cfg.method`` "grid" (no 3D grid yet).
    """
    image, body = _check_volume(image, body, spacing_mm)
    if cfg.method != "felzenszwalb":
        raise ValueError(f"supervoxels support method 'felzenszwalb' only, got {cfg.method!r}")
    if min_size_mm3 is None:
        min_size_mm3 = cfg.min_size_mm2 * spacing_mm[2]
    if not min_size_mm3 >= 0:
        raise ValueError(f"Illegal min_size_mm3 {min_size_mm3}: must be >= 0")
    channels_last = image if image.ndim == 3 else np.moveaxis(image, 1, -1)
    raw = felzenszwalb_3d(channels_last.astype(np.float64), scale=cfg.scale,
                          sigma=supervoxel_sigma(cfg.sigma, spacing_mm),
                          min_size=min_size_voxels(min_size_mm3, spacing_mm))
    return relabel_inside(raw, body)


def _check_volume(image: np.ndarray, body: np.ndarray,
                  spacing_mm: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    body = np.asarray(body)
    if image.ndim not in (3, 4):
        raise ValueError(f"compute_supervoxels needs a (Z, H, W) or (Z, C, H, W) volume, got shape {image.shape}")
    shape = image.shape if image.ndim == 3 else (image.shape[0], *image.shape[2:])
    if body.shape != shape:
        raise ValueError(f"body mask shape {body.shape} does not match image shape {image.shape}")
    if min(shape[1:]) < 2 or shape[0] < 1:
        raise ValueError(f"volume of shape {image.shape} is too small: need Z >= 1 and H, W >= 2")
    if len(spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_mm):
        raise ValueError(f"Illegal spacing_mm {spacing_mm}: need (s_h, s_w, s_z), finite and > 0")
    return windowed_float32(image, "volume"), body.astype(bool, copy=False)
