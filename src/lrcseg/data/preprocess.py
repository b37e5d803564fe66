"""From a CT volume in HU to network-ready axial slices (docs/METHOD.md, data flow step 1).

Steps, in this order:
1. In-plane resampling of each axial slice ``(X, Y)`` to the target spacing ``s``:
   output size ``(H, W) = (round(X * sx / s), round(Y * sy / s))``; z is untouched unless
   ``slice_spacing_mm`` is set (then resampled along z to it: ``resample_slices``). Images use
   bilinear interpolation (antialiased when shrinking), labels nearest neighbour; pixel
   centres are aligned as in ``align_corners=False`` (the field of view is kept).
2. Windowing: each HU window ``(lo, hi)`` gives a channel ``clip((hu - lo) / (hi - lo), 0, 1)``.
3. Body mask per slice: ``hu > body_threshold_hu``, a binary opening (radius ~2 mm) that breaks
   thin bridges to the couch, the largest connected component, holes filled (lungs, bowel gas
   inside the body stay in). Air and the couch are outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lrcseg.config import PreprocessConfig
from lrcseg.data.readers import Volume

# Radius of the opening that separates the couch from the body, in mm.
_OPENING_RADIUS_MM = 2.0


@dataclass
class PreprocessedVolume:
    """A volume as slices at the target in-plane spacing.

    image: ``(Z, W_n, H, W)`` float32 in [0, 1]; W_n = number of HU windows, (H, W) = (X, Y).
    body: ``(Z, H, W)`` bool body mask.
    label: ``(Z, H, W)`` int16 (nearest-neighbour resampled) or None.
    spacing_mm: ``(s, s, z)`` after resampling.
    original_shape: ``(X, Y, Z)`` before resampling.
    affine: ``(4, 4)`` the original voxel -> RAS affine.
    """

    image: np.ndarray
    body: np.ndarray
    label: np.ndarray | None
    spacing_mm: tuple[float, float, float]
    original_shape: tuple[int, int, int]
    affine: np.ndarray


def resampled_size(shape_xy: tuple[int, int], spacing_xy: tuple[float, float],
                   target_mm: float) -> tuple[int, int]:
    """``(round(X * sx / s), round(Y * sy / s))``, at least 1 pixel each."""
    return tuple(max(1, int(round(n * sp / target_mm))) for n, sp in zip(shape_xy, spacing_xy, strict=True))


def resample_inplane(volume_xyz: np.ndarray, spacing_xy: tuple[float, float], target_mm: float,
                     mode: str = "linear") -> np.ndarray:
    """Resample ``(X, Y, Z)`` slice-wise to ``(Z, H, W)`` at ``target_mm`` in-plane spacing.

    mode: "linear" (bilinear, antialiased when shrinking; float32 out) or "nearest"
    (labels; the input dtype is kept).
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"Illegal resampling mode {mode!r}: 'linear' or 'nearest'")
    if target_mm <= 0:
        raise ValueError(f"Illegal target spacing {target_mm}: must be > 0")
    size = resampled_size(volume_xyz.shape[:2], spacing_xy, target_mm)
    slices = np.ascontiguousarray(np.moveaxis(volume_xyz, -1, 0))  # (Z, X, Y)
    if size == tuple(volume_xyz.shape[:2]):
        return slices.astype(np.float32) if mode == "linear" else slices
    x = torch.from_numpy(slices.astype(np.float32))[:, None]  # (Z, 1, X, Y)
    if mode == "linear":
        shrinking = size[0] < x.shape[2] or size[1] < x.shape[3]
        out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
        return out[:, 0].numpy()
    out = F.interpolate(x, size=size, mode="nearest-exact")
    return out[:, 0].numpy().astype(volume_xyz.dtype)


def resample_slices(volume_zhw: np.ndarray, spacing_z: float, target_mm: float,
                    mode: str = "linear") -> np.ndarray:
    """Resample ``(Z, H, W)`` along z from ``spacing_z`` to ``target_mm`` slices:
    ``round(Z * spacing_z / target_mm)`` slices (at least 1), centres aligned as in
    ``align_corners=False``; "linear" (float32 out) or "nearest" (labels; dtype kept)."""
    if mode not in ("linear", "nearest"):
        raise ValueError(f"Illegal resampling mode {mode!r}: 'linear' or 'nearest'")
    if target_mm <= 0 or spacing_z <= 0:
        raise ValueError(f"Illegal slice spacing {spacing_z} -> {target_mm}: must be > 0")
    z = volume_zhw.shape[0]
    size = max(1, int(round(z * spacing_z / target_mm)))
    if size == z:
        return volume_zhw.astype(np.float32) if mode == "linear" else volume_zhw
    x = torch.from_numpy(np.ascontiguousarray(volume_zhw).astype(np.float32))
    x = x.permute(1, 2, 0).reshape(1, -1, z)  # (1, H*W, Z): interpolate along the last axis
    if mode == "linear":
        out = F.interpolate(x, size=size, mode="linear", align_corners=False)
    else:
        out = F.interpolate(x, size=size, mode="nearest-exact")
    out = out.reshape(volume_zhw.shape[1], volume_zhw.shape[2], size).permute(2, 0, 1).numpy()
    return out if mode == "linear" else out.astype(volume_zhw.dtype)


def apply_windows(hu: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """HU ``(...)`` -> ``(W_n, ...)`` float32: ``clip((hu - lo) / (hi - lo), 0, 1)`` per window."""
    out = np.empty((len(windows), *hu.shape), dtype=np.float32)
    for c, (lo, hi) in enumerate(windows):
        if not lo < hi:
            raise ValueError(f"Illegal HU window ({lo}, {hi}): need lo < hi")
        np.clip((hu - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0, out=out[c])
    return out


def body_mask(hu_slice: np.ndarray, threshold_hu: float, spacing_mm: float) -> np.ndarray:
    """``(H, W)`` HU -> ``(H, W)`` bool body mask (see module doc, step 3)."""
    above = hu_slice > threshold_hu
    if not above.any():
        return above
    radius = max(1, int(round(_OPENING_RADIUS_MM / spacing_mm)))
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    opened = ndimage.binary_opening(above, structure=(xx**2 + yy**2) <= radius**2)
    if not opened.any():  # only thin structures: keep the unopened mask
        opened = above
    components, n = ndimage.label(opened)
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        opened = components == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(opened)


def preprocess_volume(image: Volume, cfg: PreprocessConfig,
                      label: Volume | None = None) -> PreprocessedVolume:
    """Resample, window and mask ``image`` (and resample ``label``) per ``cfg``.

    image.array ``(X, Y, Z)`` HU -> PreprocessedVolume.image ``(Z, W_n, H, W)``, body
    ``(Z, H, W)``, label ``(Z, H, W)`` int16; ``H = round(X * sx / s)``, ``W = round(Y * sy / s)``.
    """
    if label is not None and label.array.shape != image.array.shape:
        raise ValueError(f"label shape {label.array.shape} != image shape {image.array.shape}")
    sx, sy, sz = image.spacing
    hu = resample_inplane(image.array, (sx, sy), cfg.spacing_mm, "linear")  # (Z, H, W)
    if cfg.slice_spacing_mm is not None:
        hu = resample_slices(hu, sz, cfg.slice_spacing_mm, "linear")
    body = np.stack([body_mask(s, cfg.body_threshold_hu, cfg.spacing_mm) for s in hu])
    windowed = np.moveaxis(apply_windows(hu, cfg.windows), 0, 1)  # (Z, W_n, H, W)
    lab = None
    if label is not None:
        lab = resample_inplane(label.array.astype(np.int16), (sx, sy), cfg.spacing_mm, "nearest")
        if cfg.slice_spacing_mm is not None:
            lab = resample_slices(lab, sz, cfg.slice_spacing_mm, "nearest")
    z_mm = float(sz) if cfg.slice_spacing_mm is None else float(cfg.slice_spacing_mm)
    return PreprocessedVolume(
        image=np.ascontiguousarray(windowed),
        body=body,
        label=lab,
        spacing_mm=(float(cfg.spacing_mm), float(cfg.spacing_mm), z_mm),
        original_shape=image.shape,
        affine=image.affine.copy(),
    )


def stack_context(image: np.ndarray, z: int, k: int) -> np.ndarray:
    """2.5D input: slices ``z - k//2 .. z + k//2`` of ``image`` ``(Z, W_n, H, W)`` as channels.

    Returns ``(W_n * k, H, W)``, slice-major (all windows of the lowest slice first); indices
    beyond the volume are clamped to its first/last slice. Works on memmaps (copies k slices).
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"Illegal context size k={k}: must be odd and >= 1")
    nz = image.shape[0]
    if not 0 <= z < nz:
        raise IndexError(f"slice {z} out of range for {nz} slices")
    idx = np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, nz - 1)
    return np.asarray(image[idx]).reshape(-1, *image.shape[2:])
