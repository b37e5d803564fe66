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

from lrcseg.commands._options import default_note
from lrcseg.commands._run_options import (
    add_run_arguments,
    config_yaml,
    require_out,
    run_overrides,
    set_nested,
)
from lrcseg.config import PretrainConfig, absolute_paths, load_config
from lrcseg.methods.registry import method_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PretrainConfig()

    def note(path: str) -> str:
        return default_note(d, path)

    parser.add_argument("--data", action="append", default=None,
                        help="dataset, folder of volumes, NIfTI file or DICOM series (repeatable) "
                             "(default: none)")
    parser.add_argument("--method", default=None, choices=method_names(),
                        help="global method" + note("method"))
    parser.add_argument("--labels", default=None,
                        help="labelled source dataset for --method supervised (Dice + CE on its "
                             "slices)" + note("labels"))
    parser.add_argument("--lrc", dest="lrc", action="store_true", default=None,
                        help="add the LRC loss" + note("lrc.enabled"))
    parser.add_argument("--no-lrc", dest="lrc", action="store_false", help="global method alone")
    parser.add_argument("--lrc-weight", type=float, default=None,
                        help="lambda in L = L_global + lambda L_LRC" + note("lrc.weight"))
    parser.add_argument("--lrc-temperature", type=float, default=None,
                        help="LRC softmax temperature" + note("lrc.temperature"))
    parser.add_argument("--lrc-variant", choices=["pixel", "region"], default=None,
                        help="contrast sampled pixels or region means" + note("lrc.variant"))
    parser.add_argument("--lrc-levels", default=None,
                        help="decoder levels for LRC, comma-separated (2 = 1/4, 3 = 1/2, "
                             "4 = full resolution; 2,3,4 trains the whole decoder)"
                             + note("model.local_levels"))
    parser.add_argument("--lrc-sampling", choices=["area", "uniform", "intensity"], default=None,
                        help="how regions are drawn" + note("lrc.sampling"))
    parser.add_argument("--lrc-regions", type=int, default=None,
                        help="regions sampled per image" + note("lrc.num_regions"))
    parser.add_argument("--lrc-min-pixels", type=int, default=None,
                        help="pixels a region needs in both views at the local level"
                             + note("lrc.min_pixels"))
    parser.add_argument("--regions", choices=["felzenszwalb", "grid"], default=None,
                        help="region source (grid = ablation)" + note("superpixels.method"))
    parser.add_argument("--probe-dataset", default=None,
                        help="labelled dataset for an online linear probe during pre-training"
                             + note("probe.dataset"))
    parser.add_argument("--probe-every", type=int, default=None,
                        help="probe every N steps" + note("probe.every"))
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of each view (pixels)" + note("augment.image_size"))
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the network" + note("run.compile"))
    parser.add_argument("--sync-bn", action="store_true",
                        help="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    parser.add_argument("--gather-negatives", action="store_true",
                        help="under torchrun: MoCo keys, SimCLR and LRC batch negatives from all ranks")
    parser.add_argument("--nnunet-plans", default=None, metavar="PLANS_JSON",
                        help="pre-train the 2D network of this nnU-Net plans file "
                             "(nnUNet_preprocessed/DatasetXXX/nnUNetPlans.json): network, in-plane "
                             "spacing, patch (views of its shorter side, rounded down to a multiple of 32, unless --image-size) and "
                             "CTNormalization follow the plans; needs lrcseg[nnunet] (default: none, "
                             "the U-Net of --backbone)")
    parser.add_argument("--nnunet-configuration", default="2d",
                        help="configuration of --nnunet-plans (default: 2d)")
    add_run_arguments(parser, d)


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
    cfg = load_config(PretrainConfig, config_file, overrides)
    if args.nnunet_plans:
        if args.resume:
            from lrcseg.errors import ConfigError

            raise ConfigError("--nnunet-plans with --resume: the run folder's config.yaml already "
                              "holds the plans' network; drop --nnunet-plans")
        from lrcseg.nnunet.plans import apply_plans, network_from_plans

        cfg = apply_plans(cfg, network_from_plans(args.nnunet_plans, args.nnunet_configuration),
                          image_size=args.image_size)
    return cfg if args.resume else absolute_paths(cfg)  # config.yaml means the same anywhere


def run(args: argparse.Namespace) -> int:
    import os

    from lrcseg.errors import ConfigError

    if args.resume or not args.print_config:
        require_out(args)
    cfg = build_config(args)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    from lrcseg.train.pretrain import pretrain  # imports torch: not for --help or --print-config

    if not cfg.data and not (cfg.method == "supervised" and cfg.labels):
        raise ConfigError("no --data given (and none in --config)")
    run_dir = pretrain(cfg, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(f"pre-training finished: {run_dir}")
    return 0
