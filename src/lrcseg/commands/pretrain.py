"""Pre-train a U-Net with a global self-supervised method, with or without LRC.

Examples:
  lrcseg pretrain --data DATASET --method moco --lrc --out runs/moco_lrc
  lrcseg pretrain --data DATASET --method moco --no-lrc --out runs/moco --steps 2000
  lrcseg pretrain --labels SOURCE_DATASET --method supervised --lrc --out runs/sup_lrc
  lrcseg pretrain --out runs/moco_lrc --resume
  torchrun --nproc_per_node=4 -m lrcseg pretrain --data DATASET --gather-negatives --out runs/ddp
Slices and superpixel regions come from caches that are built on first use.
"""

from __future__ import annotations

import argparse

from lrcseg.commands._run_options import add_run_arguments, run_overrides, set_nested
from lrcseg.config import PretrainConfig, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", default=None,
                        help="dataset, folder of volumes, NIfTI file or DICOM series (repeatable)")
    parser.add_argument("--method", default=None, choices=["moco", "simclr", "byol", "none", "supervised"])
    parser.add_argument("--labels", default=None,
                        help="labelled source dataset for --method supervised (Dice + CE on its slices)")
    parser.add_argument("--lrc", dest="lrc", action="store_true", default=None, help="add the LRC loss (default)")
    parser.add_argument("--no-lrc", dest="lrc", action="store_false", help="global method alone")
    parser.add_argument("--lrc-weight", type=float, default=None, help="lambda in L = L_global + lambda L_LRC")
    parser.add_argument("--lrc-temperature", type=float, default=None)
    parser.add_argument("--lrc-variant", choices=["pixel", "region"], default=None)
    parser.add_argument("--lrc-levels", default=None,
                        help="decoder levels for LRC, comma-separated (2 = 1/4, 3 = 1/2 [default], "
                             "4 = full resolution; 2,3,4 trains the whole decoder)")
    parser.add_argument("--lrc-sampling", choices=["area", "uniform", "intensity"], default=None,
                        help="how regions are drawn (default uniform)")
    parser.add_argument("--lrc-regions", type=int, default=None,
                        help="regions sampled per image (default 48)")
    parser.add_argument("--lrc-min-pixels", type=int, default=None,
                        help="pixels a region needs in both views at the local level (default 4)")
    parser.add_argument("--regions", choices=["felzenszwalb", "grid"], default=None,
                        help="region source (grid = ablation)")
    parser.add_argument("--probe-dataset", default=None,
                        help="labelled dataset for an online linear probe during pre-training")
    parser.add_argument("--probe-every", type=int, default=None, help="probe every N steps (default 100)")
    parser.add_argument("--image-size", type=int, default=None, help="side of each view (pixels)")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the network")
    parser.add_argument("--sync-bn", action="store_true",
                        help="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    parser.add_argument("--gather-negatives", action="store_true",
                        help="under torchrun: MoCo keys, SimCLR and LRC batch negatives from all ranks")
    add_run_arguments(parser)


def build_config(args: argparse.Namespace) -> PretrainConfig:
    overrides = run_overrides(args)
    if args.data:
        overrides["data"] = args.data
    if args.method:
        overrides["method"] = args.method
    if args.labels:
        overrides["labels"] = args.labels
    set_nested(overrides, "lrc", "enabled", args.lrc)
    set_nested(overrides, "lrc", "weight", args.lrc_weight)
    set_nested(overrides, "lrc", "temperature", args.lrc_temperature)
    set_nested(overrides, "lrc", "variant", args.lrc_variant)
    set_nested(overrides, "lrc", "sampling", args.lrc_sampling)
    set_nested(overrides, "lrc", "num_regions", args.lrc_regions)
    set_nested(overrides, "lrc", "min_pixels", args.lrc_min_pixels)
    if args.lrc_levels is not None:
        try:
            levels = [int(v) for v in args.lrc_levels.split(",")]
        except ValueError as exc:
            from lrcseg.errors import ConfigError

            raise ConfigError(f"--lrc-levels {args.lrc_levels!r}: comma-separated integers 0..4") from exc
        set_nested(overrides, "model", "local_levels", levels)
    set_nested(overrides, "probe", "dataset", args.probe_dataset)
    set_nested(overrides, "probe", "every", args.probe_every)
    set_nested(overrides, "superpixels", "method", args.regions)
    set_nested(overrides, "augment", "image_size", args.image_size)
    set_nested(overrides, "run", "compile", args.compile)
    set_nested(overrides, "distributed", "sync_bn", args.sync_bn or None)
    set_nested(overrides, "distributed", "gather_negatives", args.gather_negatives or None)
    config_file = args.config
    if args.resume and config_file is None:
        from pathlib import Path

        config_file = Path(args.out) / "config.yaml"
    return load_config(PretrainConfig, config_file, overrides)


def run(args: argparse.Namespace) -> int:
    import os

    from lrcseg.errors import ConfigError
    from lrcseg.train.pretrain import pretrain

    cfg = build_config(args)
    if not cfg.data and not (cfg.method == "supervised" and cfg.labels):
        raise ConfigError("no --data given (and none in --config)")
    run_dir = pretrain(cfg, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(f"pre-training finished: {run_dir}")
    return 0
