"""Whole-slice prediction with class probabilities mapped back to the original voxel grid.

For a volume ``(X, Y, Z)`` with spacing ``(sx, sy, sz)`` and a 2D segmentation network:

1. ``preprocess_volume`` resamples each axial slice to ``(H, W) = (round(X sx / s),
   round(Y sy / s))`` at the training spacing ``s`` and windows it to [0, 1]; 2.5D context
   (``cfg.context_slices``) is stacked as channels with ``stack_context``.
2. Each whole slice is zero-padded (0 = the bottom of the window, i.e. air) to ``(H_p, W_p)``,
   the next multiples of 32, split evenly on both sides. Never cropped, so every voxel is
   predicted with its full field of view.
3. Logits ``(B, K, H_p, W_p)`` -> softmax -> the padding removed -> ``(B, K, H, W)``.
4. The class probabilities are resampled bilinearly (``align_corners=False``, the same pixel
   centre convention as the preprocessing) back to ``(B, K, X, Y)`` BEFORE the argmax, so the
   label boundary is placed at sub-voxel precision of the network's grid rather than by
   nearest-neighbour upsampling of labels.

The model runs in eval mode under ``torch.inference_mode``; on CUDA under bf16 autocast
(probabilities are computed in float32).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrcseg.config import PreprocessConfig
from lrcseg.data.preprocess import preprocess_volume, stack_context
from lrcseg.data.readers import Volume, is_nifti, to_source_grid, write_nifti

# Network input sides must be multiples of this (5 stride-2 stages of the U-Net encoder).
PAD_MULTIPLE = 32


def pad_amounts(size: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int]:
    """``(before, after)`` zero padding that brings ``size`` to the next multiple of ``multiple``,
    split evenly (the extra pixel after)."""
    total = (-size) % multiple
    return total // 2, total - total // 2


def _iter_slice_probs(model: nn.Module, volume: Volume, cfg: PreprocessConfig,
                      device: str | torch.device, batch_size: int,
                      num_classes: int | None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(z_range, probs)`` with probs ``(B, K, X, Y)`` float32 on ``device``, for
    consecutive batches of axial slices (steps 1-4 of the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"Illegal batch_size {batch_size}: must be >= 1")
    device = torch.device(device)
    pre = preprocess_volume(volume, cfg)
    n_z, _, h, w = pre.image.shape
    x_size, y_size, _ = volume.shape
    (top, bottom), (left, right) = pad_amounts(h), pad_amounts(w)
    use_autocast = device.type == "cuda"
    model.eval()
    with torch.inference_mode():
        for z0 in range(0, n_z, batch_size):
            zs = range(z0, min(z0 + batch_size, n_z))
            batch = np.stack([stack_context(pre.image, z, cfg.context_slices) for z in zs])
            x = torch.from_numpy(batch).to(device)  # (B, C, H, W)
            if x.shape[1] != cfg.in_channels:
                raise ValueError(f"preprocessing gave {x.shape[1]} channels, config expects "
                                 f"{cfg.in_channels}")
            x = F.pad(x, (left, right, top, bottom), value=0.0)  # (B, C, H_p, W_p)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_autocast):
                logits = model(x)
            if logits.ndim != 4 or logits.shape[2:] != x.shape[2:]:
                raise ValueError(f"model output shape {tuple(logits.shape)}: expected "
                                 f"(B, K, {x.shape[2]}, {x.shape[3]})")
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(f"model predicts {logits.shape[1]} classes, expected "
                                 f"{num_classes}")
            probs = torch.softmax(logits.float(), dim=1)[:, :, top:top + h, left:left + w]
            if (h, w) != (x_size, y_size):
                probs = F.interpolate(probs, size=(x_size, y_size), mode="bilinear",
                                      align_corners=False)
            yield slice(zs.start, zs.stop), probs


def predict_volume(model: nn.Module, volume: Volume, cfg: PreprocessConfig,
                   device: str | torch.device = "cpu", batch_size: int = 8,
                   num_classes: int | None = None) -> np.ndarray:
    """Class probabilities of every voxel of ``volume`` on its ORIGINAL grid.

    model: 2D network ``(B, C, H_p, W_p) -> (B, K, H_p, W_p)`` logits, ``C = cfg.in_channels``.
    volume: the CT in HU, ``(X, Y, Z)`` RAS+. cfg: the preprocessing the model was trained with.
    num_classes: if given, the model's K must equal it.
    Returns ``(K, X, Y, Z)`` float32; each voxel's K values sum to 1.
    """
    out: np.ndarray | None = None
    for zr, probs in _iter_slice_probs(model, volume, cfg, device, batch_size, num_classes):
        if out is None:
            out = np.empty((probs.shape[1], *volume.shape), dtype=np.float32)
        out[..., zr] = probs.permute(1, 2, 3, 0).cpu().numpy()  # (K, X, Y, B)
    assert out is not None  # a Volume has at least one slice
    return out


def predict_labels(model: nn.Module, volume: Volume, cfg: PreprocessConfig,
                   device: str | torch.device = "cpu", batch_size: int = 8,
                   num_classes: int | None = None) -> np.ndarray:
    """``argmax_k`` of :func:`predict_volume`'s probabilities: ``(X, Y, Z)`` uint8 label ids.

    Computed batch by batch, so the ``(K, X, Y, Z)`` probabilities are never held in memory.
    """
    labels = np.empty(volume.shape, dtype=np.uint8)
    for zr, probs in _iter_slice_probs(model, volume, cfg, device, batch_size, num_classes):
        if probs.shape[1] > 256:
            raise ValueError(f"{probs.shape[1]} classes do not fit uint8 label ids")
        labels[..., zr] = probs.argmax(dim=1).permute(1, 2, 0).to(torch.uint8).cpu().numpy()
    return labels


def write_prediction(labels: np.ndarray, volume: Volume, path: str | os.PathLike) -> None:
    """Write ``labels`` ``(X, Y, Z)`` (canonical grid) as a NIfTI mask on the input's grid.

    For a NIfTI input the mask has the input file's own voxel order, shape and affine (so
    voxel-wise tools line up); for a DICOM series the series' geometry in RAS as read by
    ``read_dicom_series``. Written atomically; a path that is not ``.nii``/``.nii.gz`` raises
    ValueError before writing.
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} differs from image shape {volume.shape} "
                         f"of {volume.path}")
    if not is_nifti(path):
        raise ValueError(f"{path}: prediction output must end in .nii or .nii.gz")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int16).max):
        raise ValueError(f"label ids out of range [0, {np.iinfo(np.int16).max}]")
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.int16
    array, affine = to_source_grid(labels, volume)
    write_nifti(path, np.ascontiguousarray(array), affine, dtype=dtype)


def is_complete_prediction(path: str | os.PathLike, source: str | os.PathLike) -> bool:
    """True if ``path`` is a whole mask :func:`write_prediction` could have written for the
    input ``source``: a 3D NIfTI whose data decodes to the end (a gzip stream's checksum
    included) and, for a NIfTI input, with the input's shape and affine (header only; a DICOM
    series is not read). A missing, truncated or foreign file gives False.
    """
    import nibabel as nib

    try:
        mask = nib.load(os.fspath(path))
        data = np.asanyarray(mask.dataobj)
        reference = nib.load(os.fspath(source)) if is_nifti(source) else None
    except Exception:  # any unreadable file is simply not a complete mask
        return False
    if data.ndim != 3:
        return False
    return reference is None or (tuple(reference.shape[:3]) == data.shape
                                 and np.allclose(reference.affine, mask.affine, atol=1e-3))
