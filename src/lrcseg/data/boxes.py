"""Torch dataset of 3D boxes of cached volumes with their supervoxels (3D pre-training).

The 3D counterpart of ``data.slices.PretrainSlices``: an item is a fixed box of one volume,
not a slice. Boxes tile each volume's body on a regular grid (stride half a box by default),
so the item list is a pure function of the volumes and the box size, and every random choice
(where the two views are cut inside the box, their transforms) stays in the augmentation,
drawn from the step's generator, as in 2D. A box reaching past the volume is zero-padded
(image 0 = the bottom of the window, regions 0 = ignore, organs -1 = unlabelled) so items of
different volumes stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def box_starts(length: int, box: int, stride: int) -> list[int]:
    """Start indices of boxes of side ``box`` along an axis of ``length`` voxels.

    A grid from 0 in steps of ``stride``, the last box flush with the end; an axis shorter
    than the box gets one box centred on it (a negative start: padded on both sides).
    """
    if box < 1 or stride < 1 or length < 1:
        raise ValueError(f"Illegal box {box}, stride {stride} or length {length}: need >= 1")
    if length <= box:
        return [-((box - length) // 2)]
    starts = list(range(0, length - box + 1, stride))
    if starts[-1] != length - box:
        starts.append(length - box)
    return starts


def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill) -> np.ndarray:
    """``array[..., z0:z0+d, y0:y0+h, x0:x0+w]`` over its last three axes, with ``fill``
    where the box reaches past the array (starts may be negative)."""
    lead = array.shape[:-3]
    out = np.full((*lead, *size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, length in zip(start, size, array.shape[-3:], strict=True):
        lo, hi = max(s, 0), min(s + n, length)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(..., *dst)] = array[(..., *src)]
    return out


def body_boxes(body: np.ndarray, box: tuple[int, int, int], stride: tuple[int, int, int],
               min_body_fraction: float) -> list[tuple[int, int, int]]:
    """Starts (z0, y0, x0) of the grid boxes of a (Z, H, W) body mask whose body share is at
    least ``min_body_fraction`` (and above 0), in raster order."""
    grids = [box_starts(n, b, s) for n, b, s in zip(body.shape, box, stride, strict=True)]
    starts = []
    for z0 in grids[0]:
        for y0 in grids[1]:
            for x0 in grids[2]:
                inside = crop_padded(body, (z0, y0, x0), box, False).mean()
                if inside >= min_body_fraction and inside > 0:
                    starts.append((z0, y0, x0))
    return starts


class PretrainBoxes(Dataset):
    """Boxes of preprocessed volumes with their supervoxel maps, for 3D pre-training.

    volumes: ``PreprocessedVolume``-like objects (image (Z, W_n, H, W) in [0, 1], body
    (Z, H, W) bool, label (Z, H, W) or None); supervoxels: one (Z, H, W) int map per volume
    (0 outside the body, ids 1..R inside: ``superpixels.supervoxel_cache``); box: (d, h, w)
    voxels; stride: grid step per axis (default half the box); min_body_fraction: boxes whose
    body covers less are left out.

    Item: {"image": (W_n, d, h, w) float16, "regions": (d, h, w) int32 (the volume's own
    supervoxel ids, 0 = ignore), "position": () float32, the box centre's relative height in
    its volume's body (0 = lowest body slice, 1 = highest), "spacing": (3,) float32, the
    voxel size in mm along d, h, w (from the volume's ``spacing_mm`` (s_h, s_w, s_z); 1 mm
    when it has none)} and, with ``with_organs``,
    "organs": (d, h, w) int16 (-1 unlabelled). ``max_region_id`` bounds every id (the LRC
    loss sizes its tables with it, no host-device sync).
    """

    def __init__(self, volumes: Sequence, supervoxels: Sequence[np.ndarray],
                 box: tuple[int, int, int], stride: tuple[int, int, int] | None = None,
                 with_organs: bool = False, min_body_fraction: float = 0.1):
        if len(volumes) != len(supervoxels):
            raise ValueError(f"{len(volumes)} volumes but {len(supervoxels)} supervoxel maps")
        if len(box) != 3 or any(int(b) < 1 for b in box):
            raise ValueError(f"Illegal box {box}: three sides >= 1 voxel (d, h, w)")
        self.box = tuple(int(b) for b in box)
        self.stride = tuple(int(s) for s in (stride or [max(1, b // 2) for b in self.box]))
        if len(self.stride) != 3 or min(self.stride) < 1:
            raise ValueError(f"Illegal stride {stride}: three steps >= 1 voxel")
        if not 0 <= min_body_fraction < 1:
            raise ValueError(f"Illegal min_body_fraction {min_body_fraction}: in [0, 1)")
        self.volumes, self.supervoxels = list(volumes), list(supervoxels)
        for i, (v, s) in enumerate(zip(self.volumes, self.supervoxels, strict=True)):
            if tuple(s.shape) != tuple(v.body.shape):
                raise ValueError(f"volume {i}: supervoxels {tuple(s.shape)} != body "
                                 f"{tuple(v.body.shape)}")
        self.with_organs = with_organs
        self.canvas = self.box  # what a run card reports as the item size
        self.index: list[tuple[int, tuple[int, int, int]]] = []
        self._height: dict[int, tuple[int, int]] = {}
        for i, v in enumerate(self.volumes):
            body = np.asarray(v.body, dtype=bool)
            zs = np.flatnonzero(body.reshape(body.shape[0], -1).any(axis=1))
            if zs.size == 0:
                continue
            self._height[i] = (int(zs[0]), int(zs[-1]))
            self.index += [(i, start) for start in
                           body_boxes(body, self.box, self.stride, min_body_fraction)]
        #: the largest supervoxel id of the data
        self.max_region_id = max((int(np.max(s)) for s in self.supervoxels if np.size(s)),
                                 default=0)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v, start = self.index[i]
        volume = self.volumes[v]
        image = np.moveaxis(np.asarray(volume.image), 1, 0)  # (W_n, Z, H, W), a view
        item = {
            "image": torch.from_numpy(crop_padded(image, start, self.box, 0).astype(np.float16)),
            "regions": torch.from_numpy(
                crop_padded(np.asarray(self.supervoxels[v], dtype=np.int32), start, self.box, 0)),
        }
        lo, hi = self._height[v]
        centre = start[0] + self.box[0] / 2 - 0.5
        position = 0.5 if hi == lo else min(1.0, max(0.0, (centre - lo) / (hi - lo)))
        item["position"] = torch.tensor(position, dtype=torch.float32)
        s_h, s_w, s_z = getattr(volume, "spacing_mm", (1.0, 1.0, 1.0))
        item["spacing"] = torch.tensor((s_z, s_h, s_w), dtype=torch.float32)
        if self.with_organs:
            label = volume.label
            if label is None:
                organs = np.full(self.box, -1, dtype=np.int16)
            else:
                organs = crop_padded(np.asarray(label, dtype=np.int16), start, self.box, -1)
            item["organs"] = torch.from_numpy(organs)
        return item
