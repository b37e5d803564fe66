"""Build the superpixel region cache and inspect region quality before a long run.

Preprocesses every case of PATH (nnU-Net folder, datalist JSON, folder, NIfTI file or DICOM
series) into the slice cache, computes Felzenszwalb regions per slice into the region cache
(in parallel), and writes DIR/summary.json (slices, regions per slice min/median/max, region
size distribution, ASA and organ-boundary recall where labels exist, seconds, slices/s) and
PNG overlays of region boundaries on a few slices (radiological orientation).

With --supervoxels, Felzenszwalb runs on each whole volume instead (6-connected voxel grid,
through the supervoxel cache beside the slice cache), and DIR gets summary.json, summary.txt
(regions per volume, mean region volume in mL, seconds, voxels/s) and, per drawn case, three
PNGs of region boundaries in the axial, coronal and sagittal planes through the volume centre
(or --voxel), drawn to scale in mm.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from lrcseg.config import PreprocessConfig, SuperpixelConfig, to_dict
from lrcseg.errors import ConfigError

if TYPE_CHECKING:
    from lrcseg.data.layouts import Case
    from lrcseg.data.slice_cache import SliceCache
    from lrcseg.superpixels.supervoxel_cache import SupervoxelCache

# --supervoxels without --scale: the 3D scale that gives supervoxels about as many voxels as the
# 2D default scale (100) gives superpixels at 1.5 x 1.5 x 3 mm (docs/METHOD.md, "Supervoxels
# (3D)"). Here, not in lrcseg.superpixels.supervoxels, so that --help imports no numba.
DEFAULT_SUPERVOXEL_SCALE = 33.0

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
    parser.add_argument("--supervoxels", action="store_true",
                        help="3D: supervoxels of each whole volume and overlays in three planes; "
                             "the scale is --scale or "
                             f"{DEFAULT_SUPERVOXEL_SCALE:g} (a 3D scale, about a third of the 2D "
                             "one for as many voxels per region; a --config's 2D scale is not "
                             "used), the minimum volume --min-size-mm2 x slice thickness "
                             "(default: off, superpixels per slice)")
    parser.add_argument("--voxel", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="with --supervoxels: the voxel of the preprocessed volume the three "
                             "planes pass through, 0-based (x, y, z) indices (default: the "
                             "volume centre)")
    parser.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    parser.add_argument("--overlays", type=int, default=4,
                        help="number of PNG overlays (with --supervoxels: cases drawn, three "
                             "planes each)")
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
    from lrcseg.superpixels.preview import preview_superpixels, summary_text

    sp_cfg, pre_cfg = build_configs(args)
    if args.supervoxels:
        return run_supervoxels(args, sp_cfg, pre_cfg)
    if args.voxel is not None:
        raise ConfigError("--voxel places the planes of --supervoxels: give --supervoxels too")
    summary = preview_superpixels(args.data, args.out, sp_cfg, pre_cfg, cache_dir=args.cache_dir,
                                  workers=args.workers, overlays=args.overlays,
                                  progress=not args.no_progress)
    print(summary_text(summary), end="")
    return 0


def run_supervoxels(args: argparse.Namespace, superpixels: SuperpixelConfig,
                    preprocess: PreprocessConfig) -> int:
    """--supervoxels: build the supervoxel cache of every case of --data (training and test
    cases, as in 2D), draw the first --overlays cases in three planes, write summary.json and
    summary.txt in --out and print the text."""
    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.slice_cache import SliceCache
    from lrcseg.io_utils import atomic_write_json, atomic_write_text
    from lrcseg.superpixels.supervoxel_cache import SupervoxelCache

    if superpixels.method != "felzenszwalb":
        raise ConfigError(f"--supervoxels needs --method felzenszwalb, not {superpixels.method!r}"
                          " (there is no 3D grid)")
    if args.scale is None:
        superpixels = dataclasses.replace(superpixels, scale=DEFAULT_SUPERVOXEL_SCALE)
    dataset = load_dataset(args.data)
    cases = list(dataset.cases) + list(dataset.test_cases)
    slice_cache = SliceCache(preprocess, args.cache_dir)
    cache = SupervoxelCache(slice_cache, superpixels)
    build = cache.build(cases, workers=args.workers, progress=not args.no_progress)
    out = Path(args.out)
    written = [name for case in cases[:max(0, args.overlays)]
               for name in _plane_overlays(slice_cache, cache, case, args.voxel, out)]
    summary = {
        "data": str(args.data),
        "mode": "supervoxels",
        "superpixels": to_dict(superpixels),
        "preprocess": to_dict(preprocess),
        "cache_key": cache.key,
        **build,
        "overlays": written,
    }
    atomic_write_json(out / "summary.json", summary)
    text = supervoxel_summary_text(summary)
    atomic_write_text(out / "summary.txt", text)
    print(text, end="")
    return 0


def supervoxel_summary_text(summary: dict) -> str:
    """A --supervoxels summary as a few readable lines: summary.txt, and what is printed."""
    sp, pre = summary["superpixels"], summary["preprocess"]
    windows = sp["windows_hu"] or [pre["window_hu"]]
    rate = summary["voxels_per_s"]
    mean_ml = summary["region_volume_mean_ml"]
    return "\n".join([
        f"supervoxels of {summary['data']}",
        f"  settings    felzenszwalb 3D scale {sp['scale']:g}, sigma {sp['sigma']:g} "
        f"(in-plane pixels), min size {sp['min_size_mm2']:g} mm^2 x slice thickness, windows "
        f"{windows} HU, slices at {pre['spacing_mm']:g} mm",
        f"  {summary['cases']} cases, {summary['voxels'] / 1e6:.2f} M voxels "
        f"({summary['computed_volumes']} computed now, {summary['seconds']:.1f} s, "
        f"{'n/a' if rate is None else format(rate / 1e6, '.2f')} M voxels/s)",
        f"  regions per volume: min {summary['regions_min']}, median "
        f"{summary['regions_median']:g}, max {summary['regions_max']}; mean region volume "
        f"{'n/a' if mean_ml is None else format(mean_ml, '.3f')} mL (inside the body)",
        f"  overlays    {', '.join(summary['overlays']) or 'none'}",
        f"  cache key   {summary['cache_key']} (summary.json has every field)",
    ]) + "\n"


def _plane_overlays(slice_cache: SliceCache, cache: SupervoxelCache, case: Case,
                    voxel_xyz: list[int] | None, out: Path) -> list[str]:
    """The axial, coronal and sagittal boundary PNGs of one case through ``voxel_xyz`` (None:
    the volume centre); returns their file names."""
    import numpy as np

    from lrcseg.superpixels.preview import safe_name
    from lrcseg.viz import PLANES, plane_boundaries, plane_section

    vol = slice_cache.get(case)
    regions = np.asarray(cache.get(case))
    shape_xyz = (regions.shape[1], regions.shape[2], regions.shape[0])
    voxel = tuple(voxel_xyz) if voxel_xyz is not None else tuple(n // 2 for n in shape_xyz)
    if not all(0 <= i < n for i, n in zip(voxel, shape_xyz, strict=True)):
        raise ConfigError(f"--voxel {' '.join(map(str, voxel))} is outside case {case.id}'s "
                          f"preprocessed volume of {' x '.join(map(str, shape_xyz))} voxels "
                          "(x y z)")
    image = np.asarray(vol.image[:, 0], dtype=np.float32)
    written = []
    for plane, axis in zip(PLANES, "zyx", strict=True):
        index = voxel["xyz".index(axis)]
        path = out / f"supervoxels_{safe_name(case.id)}_{plane}_{axis}{index:03d}.png"
        cut = np.unique(plane_section(regions, plane, voxel))
        title = f"{case.id} {plane} {axis}={index}: {int((cut > 0).sum())} regions in the plane"
        plane_boundaries(image, regions, vol.spacing_mm, voxel, plane, path, title)
        written.append(path.name)
    return written
