"""Supervoxel cache: one Felzenszwalb supervoxel map per case, beside the slice cache.

The volume-level counterpart of :mod:`lrcseg.superpixels.region_cache`, with its guarantees.

Layout: ``<slice cache case folder>/supervoxels-<SupervoxelCache.key>.npy``, a ``(Z, H, W)``
map (0 = outside the body, ids 1..R), uint16 when R <= 65535, else uint32 (a 64 x 256 x 256
volume at a small minimum size can hold more regions than uint16 counts). What changes a map
is in a name: the slice cache folder is keyed by the preprocessing settings (window, in-plane
spacing) and the entry by the source files (resolved path, size, mtime), the file name by
the superpixel settings (``SuperpixelConfig.key()``: scale, sigma, minimum size, windows),
the minimum volume ``min_size_mm3`` and :data:`SUPERVOXEL_FORMAT`, the version of the
supervoxel code's output (raise it when ``compute_supervoxels`` gives other ids).

Raw ``.npy``, not ``.npz``: on a 64 x 256 x 256 phantom map (4200 regions, uint16, warm page
cache, 2-core VM) ``np.load`` took 2.4 ms (+ 5.3 ms SHA-256 once) against 14.8 ms (+ 0.4 ms)
for ``np.savez_compressed``'s 14x smaller file, and it memory-maps, so a 3D patch reads only
its own pages.

Integrity (:mod:`lrcseg.superpixels.cache_files`, as for region files): beside each map,
``supervoxels-<key>.json`` records its size, SHA-256, dtype and region count, the slice cache
entry it was computed from (that entry's digest) and the key.
It is written before the map is renamed into place, so every map has its record. ``get``
checks a map once per ``SupervoxelCache`` object (and again if the file changes); a damaged
map or record, or one of another entry or other settings, is recomputed with one warning
naming the damaged file.

Process safety: a map is written under a temporary name (mode 0666 less the umask) and
renamed into place; two processes computing the same case write the same bytes and the same
record, and the last rename wins. An interrupted write leaves no map under the final name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lrcseg.config import SuperpixelConfig, stable_hash
from lrcseg.data.layouts import Case
from lrcseg.data.slice_cache import CachedVolume, SliceCache
from lrcseg.superpixels.cache_files import MapFiles
from lrcseg.superpixels.region_cache import RegionCache
from lrcseg.superpixels.supervoxels import compute_supervoxels

#: version of the stored maps; part of the key, so a new version computes new files
SUPERVOXEL_FORMAT = 1

_DTYPES = ("uint16", "uint32")


class SupervoxelCache:
    """Supervoxel maps per case (:func:`compute_supervoxels`), built once per parameter set.

    slice_cache: the SliceCache whose volumes (window channel 0, the soft-tissue window, or
        ``cfg.windows_hu`` as channels, chosen as the region cache chooses them) and body
        masks are segmented.
    cfg: SuperpixelConfig, read as in 3D (``cfg.scale`` about a third of the 2D scale gives
        as many voxels per region, docs/METHOD.md "Supervoxels (3D)"); method "felzenszwalb".
    min_size_mm3: minimum region volume; None = ``cfg.min_size_mm2`` x slice thickness.
    ``get(case)`` returns a read-only ``(Z, H, W)`` uint16 or uint32 memmap;
    ``computed_volumes`` counts the volumes this object segmented (0 after pure cache hits).
    """

    def __init__(self, slice_cache: SliceCache, cfg: SuperpixelConfig,
                 min_size_mm3: float | None = None):
        if not isinstance(cfg, SuperpixelConfig):
            raise ValueError(f"SupervoxelCache needs a SuperpixelConfig, got {type(cfg).__name__}")
        if cfg.method != "felzenszwalb":
            raise ValueError(f"Illegal superpixel method {cfg.method!r} for supervoxels: "
                             "only 'felzenszwalb' exists in 3D")
        if min_size_mm3 is not None and not min_size_mm3 >= 0:
            raise ValueError(f"Illegal min_size_mm3 {min_size_mm3}: must be >= 0")
        self.slice_cache = slice_cache
        self.cfg = cfg
        self.min_size_mm3 = None if min_size_mm3 is None else float(min_size_mm3)
        self.key = stable_hash({"superpixels": cfg.key(), "min_size_mm3": self.min_size_mm3,
                                "format": SUPERVOXEL_FORMAT})
        self.computed_volumes = 0
        # Which slice cache channels are the Felzenszwalb input: the region cache decides it
        # (its window cache holds cfg.windows_hu the slice cache lacks), one rule for 2D and 3D.
        self._input = RegionCache(slice_cache, cfg)
        self.files = MapFiles("supervoxel", "supervoxel", "supervoxels", self.key, _DTYPES)

    def path(self, cached: CachedVolume) -> Path:
        return Path(cached.dir) / f"supervoxels-{self.key}.npy"

    def get(self, case: Case) -> np.ndarray:
        """The case's supervoxel map, (Z, H, W) uint16 or uint32 memmap; computed and stored on
        first use.

        The file is checked as the module docstring says: a damaged one is recomputed with a
        DataWarning naming it; DataError if the recomputed file is damaged too.
        """
        cached = self.slice_cache.get(case)
        return self.files.get(self.path(cached), cached, lambda: self._compute(case, cached))

    def build(self, cases: Iterable[Case], workers: int = 0, progress: bool = True) -> dict:
        """``get`` every case, one case per process; returns statistics.

        workers: processes (0 = all cores, 1 = in this process).
        Returns {"cases", "voxels", "computed_volumes", "seconds", "voxels_per_s" (voxels
        computed now over the whole time, preprocessing of uncached volumes included; None
        if none was computed), "regions_min", "regions_median", "regions_max"
        (regions per volume), "region_volume_mean_ml" (body voxels per region, in mL, over
        all regions of all volumes; None without a region)}.
        """
        cases = list(cases)
        workers = min(workers or os.cpu_count() or 1, max(1, len(cases)))
        start = time.perf_counter()
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
        try:
            mapper = pool.map if pool is not None else map
            jobs = [(self, case) for case in cases]
            done = list(tqdm(mapper(_build_case, jobs), total=len(cases), desc="supervoxels",
                             unit="volume", disable=not progress or not cases))
        finally:
            if pool is not None:
                pool.shutdown()
        seconds = time.perf_counter() - start
        computed = sum(c for c, _ in done)
        if pool is not None:  # in this process, get() has counted them already
            self.computed_volumes += computed
        computed_voxels = sum(v for c, v in done if c)
        regions, body_ml = [], 0.0
        for case in cases:
            regions.append(int(np.max(self.get(case), initial=0)))
            cached = self.slice_cache.get(case, verify=False)  # checked by get() just now
            body_ml += float(np.count_nonzero(cached.body)) * _voxel_ml(cached)
        return {
            "cases": len(cases),
            "voxels": int(sum(v for _, v in done)),
            "computed_volumes": computed,
            "seconds": round(seconds, 3),
            "voxels_per_s": round(computed_voxels / seconds, 1) if computed else None,
            "regions_min": min(regions, default=0),
            "regions_median": float(np.median(regions)) if regions else 0.0,
            "regions_max": max(regions, default=0),
            "region_volume_mean_ml": round(body_ml / sum(regions), 4) if sum(regions) else None,
        }

    def _compute(self, case: Case, cached: CachedVolume) -> tuple[np.ndarray, dict]:
        """compute_supervoxels on the case's Felzenszwalb input, in the smallest id dtype, and
        what its record says besides its size and SHA-256: where it comes from, its dtype and
        region count."""
        source = self._input.source(case, cached)
        image = np.asarray(source.image[:, self._input.channels], dtype=np.float32)
        image = image[:, 0] if image.shape[1] == 1 else image
        regions = compute_supervoxels(image, np.asarray(cached.body), tuple(cached.spacing_mm),
                                      self.cfg, self.min_size_mm3)
        self.computed_volumes += 1
        regions = regions.astype(_id_dtype(int(regions.max(initial=0)), cached.dir))
        return regions, {"slices": cached.digest, "supervoxels": self.key,
                         "format": SUPERVOXEL_FORMAT, "dtype": regions.dtype.name,
                         "regions": int(regions.max(initial=0))}


def _build_case(job: tuple[SupervoxelCache, Case]) -> tuple[bool, int]:
    """(whether the map was computed now, voxels of the volume) for one case of ``build``."""
    cache, case = job
    before = cache.computed_volumes
    regions = cache.get(case)
    return cache.computed_volumes > before, int(regions.size)


def _id_dtype(max_id: int, where: Path) -> np.dtype:
    for name in _DTYPES:
        if max_id <= np.iinfo(name).max:
            return np.dtype(name)
    raise ValueError(f"{where}: a volume of {max_id} supervoxels, more than uint32 holds")


def _voxel_ml(cached: CachedVolume) -> float:
    """One voxel's volume in mL (1 mL = 1000 mm^3)."""
    return float(np.prod(cached.spacing_mm)) / 1000.0
