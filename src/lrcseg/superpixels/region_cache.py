"""Region cache: superpixel maps per case, stored beside the slice cache and memory-mapped.

Layout: ``<slice cache case folder>/regions-<SuperpixelConfig.key()>.npy``, a ``(Z, H, W)``
uint16 array (0 = outside the body). The slice cache folder is already keyed by the
preprocessing settings and the source files, and the file name by the superpixel settings,
so a change of either gives a new file; the implementation ("fast" or "skimage") is not part
of the key since both give the same regions. Files are written atomically (temporary name,
then rename), so concurrent builders are safe.

Integrity: beside each file, ``regions-<key>.json`` records its size and SHA-256, the slice
cache entry it was computed from (that entry's digest) and the key. It is written before the
array is renamed into place, so every region file written since has its record. ``get`` checks
the file once per ``RegionCache`` object (about 1.4 GB/s, never per slice); a damaged file, or
one from another entry or other settings, is recomputed with one warning naming it. A region
file without a record is one written before records: in a slice cache entry of that time
(format 1) it is read with a shape check only, in a newer entry it is recomputed.
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
from lrcseg.superpixels.cache_files import MapFiles, record_path
from lrcseg.superpixels.regions import compute_regions

__all__ = ["RegionCache", "record_path"]

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
    the slices this object segmented (0 after a pure cache hit). ``channels`` are the channels
    of ``source(case, cached)`` that are the Felzenszwalb input (the supervoxel cache reads
    them too).
    """

    def __init__(self, slice_cache: SliceCache, cfg: SuperpixelConfig):
        if not isinstance(cfg, SuperpixelConfig):
            raise ValueError(f"RegionCache needs a SuperpixelConfig, got {type(cfg).__name__}")
        self.slice_cache = slice_cache
        self.cfg = cfg
        self.computed_slices = 0
        self.files = MapFiles("region", "superpixel", "superpixels", cfg.key(), legacy=True)
        windows = [tuple(w) for w in cfg.windows_hu] or [slice_cache.cfg.window_hu]
        have = [tuple(w) for w in slice_cache.cfg.windows]
        self.window_cache: SliceCache | None = None
        channels = [have.index(w) for w in windows] if set(windows) <= set(have) else None
        if channels is None:
            window_cfg = dataclasses.replace(slice_cache.cfg, window_hu=windows[0],
                                             extra_windows_hu=windows[1:], context_slices=1)
            self.window_cache = SliceCache(window_cfg, slice_cache.dir.parent.parent)
            channels = list(range(len(windows)))
        self.channels: list[int] = channels

    def path(self, cached: CachedVolume) -> Path:
        return Path(cached.dir) / f"regions-{self.cfg.key()}.npy"

    def get(self, case: Case) -> np.ndarray:
        """The case's region maps (Z, H, W) uint16 memmap; computed and stored on first use.

        The file is checked as the module docstring says: a damaged one is recomputed with a
        DataWarning naming it; DataError if the recomputed file is damaged too.
        """
        cached = self.slice_cache.get(case)

        def compute() -> tuple[np.ndarray, dict]:
            source = self.source(case, cached)
            return (np.stack([self._slice(cached, source, z) for z in range(cached.num_slices)]),
                    self._record(cached))

        return self.files.get(self.path(cached), cached, compute)

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
            todo = [(c, v) for c, v in zip(cases, volumes, strict=True) if self.files.open(self.path(v), v) is None]
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
            self.files.save(self.path(v), regions.astype(np.uint16), self._record(v))
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

    def _record(self, cached: CachedVolume) -> dict:
        """What a region file's record says besides its size and SHA-256: where it comes from."""
        return {"slices": cached.digest, "superpixels": self.cfg.key()}

    def source(self, case: Case, cached: CachedVolume, verify: bool = True) -> CachedVolume:
        """The cached volume whose channels ``self.channels`` are the Felzenszwalb input:
        ``cached`` itself, or the case's entry of ``window_cache``."""
        return cached if self.window_cache is None else self.window_cache.get(case, verify)

    def _slice(self, cached: CachedVolume, source: CachedVolume, z: int) -> np.ndarray:
        channels = np.asarray(source.image[z, self.channels], dtype=np.float32)
        image = channels[0] if len(self.channels) == 1 else channels
        regions = compute_regions(image, cached.body[z], float(cached.spacing_mm[0]), self.cfg)
        if regions.max(initial=0) > _MAX_ID:
            raise ValueError(f"{cached.dir}: slice {z} has {regions.max()} regions, more than uint16 holds")
        self.computed_slices += 1
        return regions.astype(np.uint16)


_CHUNK = 16  # slices per worker task


def _segment_chunk(job: tuple[RegionCache, int, Case, int, int]) -> tuple[int, np.ndarray]:
    cache, index, case, z0, z1 = job
    cached = cache.slice_cache.get(case, verify=False)  # build() has just had it from get()
    source = cache.source(case, cached, verify=False)
    return index, np.stack([cache._slice(cached, source, z) for z in range(z0, z1)])


def _regions_per_slice(regions: np.ndarray) -> np.ndarray:
    """Ids are contiguous 1..R per slice, so the count is the per-slice maximum."""
    return np.asarray(regions).reshape(len(regions), -1).max(axis=1).astype(np.int64)
