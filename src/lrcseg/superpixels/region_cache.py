"""Region cache: superpixel maps per case, stored beside the slice cache and memory-mapped.

Layout: ``<slice cache case folder>/regions-<SuperpixelConfig.key()>.npy``, a ``(Z, H, W)``
uint16 array (0 = outside the body). The slice cache folder is already keyed by the
preprocessing settings and the source files, and the file name by the superpixel settings,
so a change of either gives a new file; the implementation ("fast" or "skimage") is not part
of the key since both give the same regions. Files are written atomically (temporary name,
then rename), so concurrent builders are safe.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lrcseg.config import SuperpixelConfig
from lrcseg.data.layouts import Case
from lrcseg.data.slice_cache import CachedVolume, SliceCache
from lrcseg.io_utils import atomic_path
from lrcseg.superpixels.regions import compute_regions

_MAX_ID = np.iinfo(np.uint16).max


class RegionCache:
    """Superpixel region maps per case, built once per dataset and parameter set.

    slice_cache: the SliceCache whose slices (window channel 0, the soft-tissue window) and
        body masks are segmented.
    cfg: SuperpixelConfig; ``cfg.key()`` names the files. With ``cfg.windows_hu`` the input
        channels are those windows: taken from the slice cache's channels where it has them,
        else from a second slice cache of the same grid with just those windows
        (``window_cache``; the network's input channels stay as configured).
    ``get(case)`` returns a read-only ``(Z, H, W)`` uint16 memmap; ``computed_slices`` counts
    the slices this object segmented (0 after a pure cache hit).
    """

    def __init__(self, slice_cache: SliceCache, cfg: SuperpixelConfig):
        if not isinstance(cfg, SuperpixelConfig):
            raise ValueError(f"RegionCache needs a SuperpixelConfig, got {type(cfg).__name__}")
        self.slice_cache = slice_cache
        self.cfg = cfg
        self.computed_slices = 0
        windows = [tuple(w) for w in cfg.windows_hu] or [slice_cache.cfg.window_hu]
        have = [tuple(w) for w in slice_cache.cfg.windows]
        self.window_cache: SliceCache | None = None
        self._channels = [have.index(w) for w in windows] if set(windows) <= set(have) else None
        if self._channels is None:
            window_cfg = dataclasses.replace(slice_cache.cfg, window_hu=windows[0],
                                             extra_windows_hu=windows[1:], context_slices=1)
            self.window_cache = SliceCache(window_cfg, slice_cache.dir.parent.parent)
            self._channels = list(range(len(windows)))

    def path(self, cached: CachedVolume) -> Path:
        return Path(cached.dir) / f"regions-{self.cfg.key()}.npy"

    def get(self, case: Case) -> np.ndarray:
        """The case's region maps (Z, H, W) uint16 memmap; computed and stored on first use."""
        cached = self.slice_cache.get(case)
        path = self.path(cached)
        if not path.is_file():
            source = self._source(case, cached)
            regions = np.stack([self._slice(cached, source, z) for z in range(cached.num_slices)])
            _save(path, regions)
        return np.load(path, mmap_mode="r")

    def build(self, cases: Iterable[Case], workers: int = 0, progress: bool = True) -> dict:
        """Build every case's regions in parallel over slices; returns statistics.

        workers: processes (0 = all cores, 1 = in this process). Slice caches are built first
        (one task per case), then slices are segmented in chunks across the workers.
        Returns {"cases", "slices", "computed_slices", "seconds", "slices_per_s",
        "regions_min", "regions_median", "regions_max"} (regions per slice with a body).
        """
        cases = list(cases)
        workers = workers or os.cpu_count() or 1
        start = time.perf_counter()
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and cases else None
        try:
            mapper = pool.map if pool is not None else map
            volumes = list(mapper(self.slice_cache.get, cases))
            todo = [(c, v) for c, v in zip(cases, volumes, strict=True) if not self.path(v).is_file()]
            if self.window_cache is not None:  # once per case, before the slice chunks use it
                list(mapper(self.window_cache.get, [c for c, _ in todo]))
            jobs = [(self, i, case, z0, min(z0 + _CHUNK, v.num_slices))
                    for i, (case, v) in enumerate(todo) for z0 in range(0, v.num_slices, _CHUNK)]
            chunks: dict[int, list[np.ndarray]] = {}
            with tqdm(total=sum(v.num_slices for _, v in todo), desc="superpixels", unit="slice",
                      disable=not progress or not todo) as bar:
                for index, part in mapper(_segment_chunk, jobs):  # in job order
                    chunks.setdefault(index, []).append(part)
                    bar.update(len(part))
        finally:
            if pool is not None:
                pool.shutdown()
        computed = 0
        for i, (_, v) in enumerate(todo):
            regions = np.concatenate(chunks[i])
            _save(self.path(v), regions)
            computed += len(regions)
        self.computed_slices += computed
        seconds = time.perf_counter() - start
        counts = np.concatenate([_regions_per_slice(np.load(self.path(v), mmap_mode="r"))
                                 for v in volumes]) if volumes else np.zeros(0)
        counts = counts[counts > 0]
        slices = int(sum(v.num_slices for v in volumes))
        return {
            "cases": len(cases),
            "slices": slices,
            "computed_slices": computed,
            "seconds": round(seconds, 3),
            "slices_per_s": round(computed / seconds, 2) if computed else None,
            "regions_min": int(counts.min()) if counts.size else 0,
            "regions_median": float(np.median(counts)) if counts.size else 0.0,
            "regions_max": int(counts.max()) if counts.size else 0,
        }

    def _source(self, case: Case, cached: CachedVolume) -> CachedVolume:
        """The cached volume whose channels ``self._channels`` are the Felzenszwalb input."""
        return cached if self.window_cache is None else self.window_cache.get(case)

    def _slice(self, cached: CachedVolume, source: CachedVolume, z: int) -> np.ndarray:
        channels = np.asarray(source.image[z, self._channels], dtype=np.float32)
        image = channels[0] if len(self._channels) == 1 else channels
        regions = compute_regions(image, cached.body[z], float(cached.spacing_mm[0]), self.cfg)
        if regions.max(initial=0) > _MAX_ID:
            raise ValueError(f"{cached.dir}: slice {z} has {regions.max()} regions, more than uint16 holds")
        self.computed_slices += 1
        return regions.astype(np.uint16)


_CHUNK = 16  # slices per worker task


def _segment_chunk(job: tuple[RegionCache, int, Case, int, int]) -> tuple[int, np.ndarray]:
    cache, index, case, z0, z1 = job
    cached = cache.slice_cache.get(case)
    source = cache._source(case, cached)
    return index, np.stack([cache._slice(cached, source, z) for z in range(z0, z1)])


def _regions_per_slice(regions: np.ndarray) -> np.ndarray:
    """Ids are contiguous 1..R per slice, so the count is the per-slice maximum."""
    return np.asarray(regions).reshape(len(regions), -1).max(axis=1).astype(np.int64)


def _save(path: Path, regions: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, regions.astype(np.uint16))
