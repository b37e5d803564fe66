"""Build the superpixel region cache and inspect region quality before a long run.

Preprocesses every case of PATH (nnU-Net folder, datalist JSON, folder, NIfTI file or DICOM
series) into the slice cache, computes Felzenszwalb regions per slice into the region cache
(in parallel), and writes DIR/summary.json (slices, regions per slice min/median/max, region
size distribution, ASA and organ-boundary recall where labels exist, seconds, slices/s) and
PNG overlays of region boundaries on a few slices (radiological orientation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lrcseg.config import PreprocessConfig, SuperpixelConfig, to_dict

# The caches, metrics and figures import torch, numba and matplotlib: they are imported in
# the functions that use them, so ``lrcseg --help`` stays fast.
if TYPE_CHECKING:
    from lrcseg.data.slice_cache import SliceCache
    from lrcseg.superpixels.region_cache import RegionCache

#: slices per case (evenly spaced among slices with a body) used for quality metrics
QUALITY_SLICES_PER_CASE = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SuperpixelConfig()
    parser.add_argument("--data", required=True, metavar="PATH", help="dataset, NIfTI file or DICOM series")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for summary.json and overlays")
    parser.add_argument("--scale", type=float, default=d.scale, help="Felzenszwalb scale")
    parser.add_argument("--sigma", type=float, default=d.sigma, help="Gaussian pre-smoothing (pixels)")
    parser.add_argument("--min-size-mm2", type=float, default=d.min_size_mm2,
                        help="minimum region area in mm^2")
    parser.add_argument("--method", choices=["felzenszwalb", "grid"], default=d.method,
                        help="region source (grid = ablation)")
    parser.add_argument("--implementation", choices=["fast", "skimage"], default=d.implementation,
                        help="Felzenszwalb implementation (same regions)")
    parser.add_argument("--grid-cell-mm", type=float, default=d.grid_cell_mm,
                        help="cell side for --method grid, mm")
    parser.add_argument("--window", type=float, nargs=2, action="append", default=None,
                        metavar=("LOW", "HIGH"), dest="windows",
                        help="HU window stacked as a Felzenszwalb channel, repeatable (chest CT: "
                             "--window -175 250 --window -1350 150 splits the lungs) (default: "
                             f"the preprocessing window {PreprocessConfig().window_hu} alone)")
    parser.add_argument("--spacing", type=float, default=PreprocessConfig().spacing_mm,
                        help="in-plane spacing of the preprocessed slices, mm")
    parser.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    parser.add_argument("--overlays", type=int, default=4, help="number of PNG overlays")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $LRCSEG_CACHE or ~/.cache/lrcseg)")


def run(args: argparse.Namespace) -> int:
    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.slice_cache import SliceCache
    from lrcseg.io_utils import atomic_write_json
    from lrcseg.superpixels.region_cache import RegionCache

    sp_cfg = SuperpixelConfig(method=args.method, scale=args.scale, sigma=args.sigma,
                              min_size_mm2=args.min_size_mm2, implementation=args.implementation,
                              grid_cell_mm=args.grid_cell_mm, windows_hu=args.windows or [])
    pre_cfg = PreprocessConfig(spacing_mm=args.spacing)
    dataset = load_dataset(args.data)
    cases = list(dataset.cases) + list(dataset.test_cases)
    slice_cache = SliceCache(pre_cfg, args.cache_dir)
    regions_cache = RegionCache(slice_cache, sp_cfg)
    build = regions_cache.build(cases, workers=args.workers, progress=True)

    out = Path(args.out)
    quality = _quality(slice_cache, regions_cache, cases)
    overlays = _write_overlays(slice_cache, regions_cache, cases, out, args.overlays)
    summary = {
        "data": str(args.data),
        "superpixels": to_dict(sp_cfg),
        "preprocess": to_dict(pre_cfg),
        "cache_key": sp_cfg.key(),
        **build,
        **quality,
        "overlays": overlays,
    }
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("superpixels", "preprocess")}, indent=2))
    return 0


def _body_slices(body: np.ndarray, n: int) -> list[int]:
    """Up to n slice indices evenly spaced among slices with any body pixel."""
    with_body = np.flatnonzero(body.reshape(len(body), -1).any(axis=1))
    if len(with_body) == 0:
        return []
    picks = np.linspace(0, len(with_body) - 1, min(n, len(with_body))).round().astype(int)
    return [int(with_body[i]) for i in np.unique(picks)]


def _quality(slice_cache: SliceCache, regions_cache: RegionCache, cases) -> dict:
    """Region size distribution on sampled slices; ASA and boundary recall where labelled."""
    from lrcseg.superpixels.metrics import (
        achievable_segmentation_accuracy,
        boundary_recall,
        region_stats,
    )

    asa, recall, sizes = [], [], []
    for case in cases:
        vol = slice_cache.get(case)
        regions = regions_cache.get(case)
        area = float(vol.spacing_mm[0] * vol.spacing_mm[1])
        for z in _body_slices(vol.body, QUALITY_SLICES_PER_CASE):
            reg = np.asarray(regions[z], dtype=np.int64)
            sizes.append(region_stats(reg, area)["size_median_mm2"])
            if vol.label is not None and np.asarray(vol.label[z]).any():
                lab = np.asarray(vol.label[z], dtype=np.int64)
                asa.append(achievable_segmentation_accuracy(reg, lab))
                r = boundary_recall(reg, lab)
                if np.isfinite(r):
                    recall.append(r)
    return {
        "quality_slices": len(sizes),
        "region_size_median_mm2": float(np.median(sizes)) if sizes else None,
        "asa": float(np.mean(asa)) if asa else None,
        "boundary_recall": float(np.mean(recall)) if recall else None,
        "labelled_slices": len(asa),
    }


def _write_overlays(slice_cache: SliceCache, regions_cache: RegionCache, cases, out: Path,
                    count: int) -> list[str]:
    """PNG of region boundaries (yellow) on the soft-tissue window, radiological orientation."""
    from lrcseg.viz import montage

    picks: list[tuple[object, int]] = []
    per_case = max(1, -(-count // max(1, len(cases))))
    for case in cases:
        vol = slice_cache.get(case)
        picks += [(case, z) for z in _body_slices(vol.body, per_case)]
        if len(picks) >= count:
            break
    written = []
    for case, z in picks[:count]:
        vol = slice_cache.get(case)
        regions = np.asarray(regions_cache.get(case)[z], dtype=np.int64)
        path = out / f"overlay_{_safe(case.id)}_z{z:03d}.png"
        title = f"{case.id} z={z}: {len(np.unique(regions[regions > 0]))} regions"
        montage([np.asarray(vol.image[z, 0], dtype=np.float32)], [regions], [title], path,
                ncols=1, panel_in=8.0, boundaries=True, spacing_xy=tuple(vol.spacing_mm[:2]))
        written.append(path.name)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
