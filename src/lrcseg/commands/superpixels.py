"""Build the superpixel region cache and inspect region quality before a long run.

Preprocesses every case of PATH (nnU-Net folder, datalist JSON, folder, NIfTI file or DICOM
series) into the slice cache, computes Felzenszwalb regions per slice into the region cache
(in parallel), and writes DIR/summary.json (slices, regions per slice min/median/max, region
size distribution, ASA and organ-boundary recall where labels exist, seconds, slices/s) and
PNG overlays of region boundaries on a few slices (radiological orientation).
"""

from __future__ import annotations

import argparse
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


# flag dest -> (section, key) of a pre-training config: where --config's value comes from
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "scale": ("superpixels", "scale"),
    "sigma": ("superpixels", "sigma"),
    "min_size_mm2": ("superpixels", "min_size_mm2"),
    "method": ("superpixels", "method"),
    "implementation": ("superpixels", "implementation"),
    "grid_cell_mm": ("superpixels", "grid_cell_mm"),
    "windows": ("superpixels", "windows_hu"),
    "spacing": ("preprocess", "spacing_mm"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SuperpixelConfig()
    parser.add_argument("--data", required=True, metavar="PATH", help="dataset, NIfTI file or DICOM series")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for summary.json, summary.txt and overlays")
    parser.add_argument("--config", default=None, metavar="YAML_OR_RUN",
                        help="a pre-training config (configs/pretrain_cpu.yaml) or run folder: "
                             "its preprocess and superpixels sections, so the preview shows the "
                             "regions that training uses; flags override it (default: none, "
                             "the built-in defaults shown here)")
    parser.add_argument("--scale", type=float, default=None, help=f"Felzenszwalb scale (default: {d.scale})")
    parser.add_argument("--sigma", type=float, default=None,
                        help=f"Gaussian pre-smoothing, pixels (default: {d.sigma})")
    parser.add_argument("--min-size-mm2", type=float, default=None,
                        help=f"minimum region area in mm^2 (default: {d.min_size_mm2})")
    parser.add_argument("--method", choices=["felzenszwalb", "grid"], default=None,
                        help=f"region source (grid = ablation) (default: {d.method})")
    parser.add_argument("--implementation", choices=["fast", "skimage"], default=None,
                        help=f"Felzenszwalb implementation, same regions (default: {d.implementation})")
    parser.add_argument("--grid-cell-mm", type=float, default=None,
                        help=f"cell side for --method grid, mm (default: {d.grid_cell_mm})")
    parser.add_argument("--window", type=float, nargs=2, action="append", default=None,
                        metavar=("LOW", "HIGH"), dest="windows",
                        help="HU window stacked as a Felzenszwalb channel, repeatable (chest CT: "
                             "--window -175 250 --window -1350 150 splits the lungs) (default: "
                             f"the preprocessing window {PreprocessConfig().window_hu} alone)")
    parser.add_argument("--spacing", type=float, default=None,
                        help="in-plane spacing of the preprocessed slices, mm (default: "
                             f"{PreprocessConfig().spacing_mm})")
    parser.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    parser.add_argument("--overlays", type=int, default=4, help="number of PNG overlays")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $LRCSEG_CACHE or ~/.cache/lrcseg)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_configs(args: argparse.Namespace) -> tuple[SuperpixelConfig, PreprocessConfig]:
    """The superpixel and preprocessing settings: defaults <- --config <- flags."""
    from lrcseg.config import PretrainConfig, load_config

    overrides: dict = {}
    for dest, (section, key) in FLAG_KEYS.items():
        if getattr(args, dest) is not None:
            overrides.setdefault(section, {})[key] = getattr(args, dest)
    config = args.config
    if config is not None and Path(config).is_dir():
        config = Path(config) / "config.yaml"
    cfg = load_config(PretrainConfig, config, overrides)
    return cfg.superpixels, cfg.preprocess


def run(args: argparse.Namespace) -> int:
    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.slice_cache import SliceCache
    from lrcseg.io_utils import atomic_write_json, atomic_write_text
    from lrcseg.superpixels.region_cache import RegionCache

    sp_cfg, pre_cfg = build_configs(args)
    dataset = load_dataset(args.data)
    cases = list(dataset.cases) + list(dataset.test_cases)
    slice_cache = SliceCache(pre_cfg, args.cache_dir)
    regions_cache = RegionCache(slice_cache, sp_cfg)
    build = regions_cache.build(cases, workers=args.workers, progress=not args.no_progress)

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
    text = summary_text(summary)
    atomic_write_text(out / "summary.txt", text)
    print(text, end="")
    return 0


def _number(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def summary_text(summary: dict) -> str:
    """summary.json as a few readable lines (what ``lrcseg superpixels`` prints)."""
    sp, pre = summary["superpixels"], summary["preprocess"]
    windows = sp["windows_hu"] or [pre["window_hu"]]
    lines = [
        f"superpixels of {summary['data']}",
        f"  settings    {sp['method']} scale {sp['scale']:g}, sigma {sp['sigma']:g}, "
        f"min size {sp['min_size_mm2']:g} mm^2, windows {windows} HU, "
        f"slices at {pre['spacing_mm']:g} mm",
    ]
    lines += [
        f"  {summary['cases']} cases, {summary['slices']} slices ({summary['computed_slices']} "
        f"computed now, {summary['seconds']:.1f} s, {_number(summary['slices_per_s'], '.1f')} "
        "slices/s)",
        f"  regions per slice with a body: min {summary['regions_min']}, median "
        f"{summary['regions_median']:g}, max {summary['regions_max']}",
    ]
    lines += [
        f"  region size median {_number(summary['region_size_median_mm2'], '.0f')} mm^2 "
        f"({summary['quality_slices']} sampled slices)",
        f"  ASA {_number(summary['asa'], '.3f')}, organ-boundary recall "
        f"{_number(summary['boundary_recall'], '.3f')} ({summary['labelled_slices']} labelled slices; "
        "n/a without labels)",
        f"  overlays    {', '.join(summary['overlays']) or 'none'}",
        f"  cache key   {summary['cache_key']} (summary.json has every field)",
    ]
    return "\n".join(lines) + "\n"


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
