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

from lrcseg.config import PreprocessConfig, SuperpixelConfig

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
    from lrcseg.superpixels.preview import preview_superpixels, summary_text

    sp_cfg, pre_cfg = build_configs(args)
    summary = preview_superpixels(args.data, args.out, sp_cfg, pre_cfg, cache_dir=args.cache_dir,
                                  workers=args.workers, overlays=args.overlays,
                                  progress=not args.no_progress)
    print(summary_text(summary), end="")
    return 0
