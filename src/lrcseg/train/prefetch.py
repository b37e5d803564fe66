"""Training batches on the device before the step that uses them (issue 18).

The loaders hand out compact batches (float16 images, int32 regions, int16 labels; see
``data/slices.py``). ``DevicePrefetcher`` wraps the DataLoader's iterator and yields each batch
with every tensor on the device and float16 tensors as float32:

- on CUDA, batch k + 1 is copied (from the loader's pinned memory, ``non_blocking``) and
  converted on a side ``torch.cuda.Stream`` as soon as batch k is handed out, so the copy
  overlaps with step k's kernels instead of sitting in front of step k + 1;
- on any other device it is a pass-through that moves and converts each batch when it is
  asked for: a CPU run does exactly what the plain loop did.

Reading ahead by one batch does not change the sample order: ``ResumableSampler`` fixes it, and
the slice datasets draw no random numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def batch_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor moved to ``device`` and float16 tensors cast to float32.

    Dicts, lists and tuples are rebuilt with the same keys, order and nesting; anything else
    (numbers, strings) is returned as it is.
    """
    if isinstance(batch, Tensor):
        batch = batch.to(device, non_blocking=non_blocking)
        return batch.float() if batch.dtype == torch.float16 else batch
    if isinstance(batch, dict):
        return {k: batch_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to_device(v, device, non_blocking) for v in batch)
    return batch


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


class DevicePrefetcher:
    """An iterator over ``batches`` (a DataLoader iterator) that yields them on ``device``.

    Args:
        batches: an iterator of batches (tensors, or dicts/lists/tuples of them).
        device: where the training step runs.

    Each yielded batch has the input's structure, its tensors on ``device`` and float16 ones
    as float32. On CUDA one batch is read ahead and copied on a side stream; the step's stream
    waits for that copy before the batch is handed out (``wait_stream``), and every tensor is
    marked as used by the step's stream (``record_stream``), so the caching allocator does not
    hand its memory to the side stream's next copy while the step may still read it.
    """

    def __init__(self, batches: Iterator[Any], device: torch.device):
        self.batches = batches
        self.device = torch.device(device)
        self._stream = None
        self._next: Any = None
        self._exhausted = False
        if self.device.type == "cuda" and torch.cuda.is_available():
            self._stream = torch.cuda.Stream(self.device)
            self._preload()

    def _preload(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self._exhausted = True
            return
        with torch.cuda.stream(self._stream):
            self._next = batch_to_device(batch, self.device, non_blocking=True)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        if self._stream is None:
            return batch_to_device(next(self.batches), self.device)
        if self._exhausted:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)
        batch = self._next
        for tensor in _tensors(batch):
            tensor.record_stream(current)
        self._preload()
        return batch
