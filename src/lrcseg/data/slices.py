"""Torch datasets of 2D slices read from the slice (and region) caches.

Slices of different volumes differ in size; each is centre-padded to one square canvas
(image 0 = the bottom of the window, regions 0 = ignore, labels 0 = background) so batches
stack. The canvas is the largest slice side in the data, rounded up to a multiple of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lrcseg.data.preprocess import stack_context


def canvas_size(volumes: Sequence, multiple: int = 32) -> int:
    """Smallest multiple of ``multiple`` holding every slice of ``volumes`` (H and W)."""
    side = max(max(v.image.shape[2], v.image.shape[3]) for v in volumes)
    return int(-(-side // multiple) * multiple)


def pad_to_canvas(array: np.ndarray, canvas: int) -> np.ndarray:
    """Centre-pad the last two axes of ``array`` (..., H, W) with zeros to (canvas, canvas)."""
    h, w = array.shape[-2:]
    if h > canvas or w > canvas:
        raise ValueError(f"slice {h}x{w} larger than canvas {canvas}")
    top, left = (canvas - h) // 2, (canvas - w) // 2
    pad = [(0, 0)] * (array.ndim - 2) + [(top, canvas - h - top), (left, canvas - w - left)]
    return np.pad(array, pad)


def body_slices(volumes: Sequence, min_body_fraction: float = 0.05) -> list[tuple[int, int]]:
    """(volume index, z) of every slice whose body covers at least ``min_body_fraction``."""
    index = []
    for i, v in enumerate(volumes):
        fraction = np.asarray(v.body).reshape(v.body.shape[0], -1).mean(axis=1)
        index.extend((i, int(z)) for z in np.flatnonzero(fraction >= min_body_fraction))
    return index


class _CanvasSlices(Dataset):
    """Body slices of cached volumes, centre-padded to one canvas (shared by the datasets)."""

    def __init__(self, volumes: Sequence, context_slices: int, canvas: int | None,
                 min_body_fraction: float):
        self.volumes = list(volumes)
        self.context_slices = context_slices
        self.canvas = canvas or canvas_size(self.volumes)
        self.index = body_slices(self.volumes, min_body_fraction)

    def __len__(self) -> int:
        return len(self.index)

    def _slice(self, i: int) -> tuple[int, int, torch.Tensor]:
        """(volume index, z, padded image (C, S, S) float16) of item ``i``."""
        v, z = self.index[i]
        image = stack_context(self.volumes[v].image, z, self.context_slices).astype(np.float16)
        return v, z, torch.from_numpy(pad_to_canvas(image, self.canvas))

    def _padded(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pad_to_canvas(array, self.canvas))


class PretrainSlices(_CanvasSlices):
    """Unlabelled slices with their superpixel regions for pre-training.

    Item: {"image": (C, S, S) float16 in [0, 1], "regions": (S, S) int32 (0 = ignore),
    "position": () float32, the slice's relative z among its volume's body slices (0 = the
    lowest, 1 = the highest; 0.5 for a single slice)} and, with ``with_organs``, "organs": (S, S) int16 organ labels (-1 for an unlabelled slice),
    where C = windows x context slices and S the canvas side. Items are kept compact (the
    cache's float16, 8 bytes per pixel in all) because the loader ships them between
    processes and to the GPU; the training step converts them on the device.
    """

    def __init__(self, volumes: Sequence, regions: Sequence[np.ndarray], context_slices: int,
                 canvas: int | None = None, with_organs: bool = False,
                 min_body_fraction: float = 0.05):
        if len(volumes) != len(regions):
            raise ValueError(f"{len(volumes)} volumes but {len(regions)} region maps")
        super().__init__(volumes, context_slices, canvas, min_body_fraction)
        self.regions = list(regions)
        self.with_organs = with_organs
        #: the largest region id in the data: lets the LRC loss size its tables without a sync
        self.max_region_id = max((int(np.max(r)) for r in self.regions if np.size(r)), default=0)
        extent: dict[int, tuple[int, int]] = {}
        for v, z in self.index:
            lo, hi = extent.get(v, (z, z))
            extent[v] = (min(lo, z), max(hi, z))
        self._extent = extent

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v, z, image = self._slice(i)
        regions = np.asarray(self.regions[v][z], dtype=np.int32)
        lo, hi = self._extent[v]
        position = 0.5 if hi == lo else (z - lo) / (hi - lo)
        item = {"image": image, "regions": self._padded(regions),
                "position": torch.tensor(position, dtype=torch.float32)}
        if self.with_organs:
            label = self.volumes[v].label
            if label is not None:
                organs = np.asarray(label[z], dtype=np.int16)
            else:
                organs = np.full(regions.shape, -1, dtype=np.int16)
            item["organs"] = self._padded(organs + 1) - 1
        return item


class LabelledSlices(_CanvasSlices):
    """Labelled slices for fine-tuning: {"image": (C, S, S) float16, "label": (S, S) int16}
    (compact like PretrainSlices; converted on the device).

    label_lut: optional int array mapping the dataset's label ids to the model's (a label map).
    """

    def __init__(self, volumes: Sequence, context_slices: int, canvas: int | None = None,
                 min_body_fraction: float = 0.05, label_lut: np.ndarray | None = None):
        for v in volumes:
            if v.label is None:
                raise ValueError(f"case {v.case_id} has no label")
        super().__init__(volumes, context_slices, canvas, min_body_fraction)
        self.label_lut = label_lut

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v, z, image = self._slice(i)
        label = np.asarray(self.volumes[v].label[z], dtype=np.int16)
        if self.label_lut is not None:
            label = self.label_lut[label].astype(np.int16)
        return {"image": image, "label": self._padded(label)}
