"""Fine-tune a segmentation U-Net on K labelled volumes.

Examples:
  lrcseg finetune --dataset DATASET --init scratch --labeled 1 --seed 0 --out runs/ft_scratch
  lrcseg finetune --dataset DATASET --init runs/moco_lrc --labeled 2 --out runs/ft_lrc
  lrcseg finetune --dataset DATASET --init weights.pt --labeled 0.2 --out runs/ft
Every initialisation gets the same step budget and hyper-parameters; the last checkpoint is
the result. --init supplies what its weights fix (backbone, decoder, window, spacing): repeat
them only to change them, which is refused if they conflict. The labelled cases are drawn from --split-seed and written to split.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrcseg.commands._options import default_note
from lrcseg.commands._run_options import (
    add_run_arguments,
    config_yaml,
    require_out,
    run_overrides,
)
from lrcseg.config import FinetuneConfig, absolute_paths, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()

    def note(path: str) -> str:
        return default_note(d, path)

    parser.add_argument("--dataset", default=None,
                        help="labelled dataset (nnU-Net layout or datalist JSON); required here "
                             "or in --config")
    parser.add_argument("--init", default=None,
                        help="scratch, a pre-training run folder, or weights file" + note("init"))
    parser.add_argument("--labeled", type=float, default=None,
                        help="number of labelled cases (>= 1) or a fraction (< 1)" + note("labeled"))
    parser.add_argument("--split-seed", type=int, default=None,
                        help="seed that draws the labelled cases" + note("split_seed"))
    parser.add_argument("--image-size", type=int, default=None,
                        help="training crop side (pixels)" + note("image_size"))
    parser.add_argument("--label-map", default=None,
                        help="JSON mapping dataset labels onto the model's" + note("label_map"))
    parser.add_argument("--allow-mismatch", action="store_true", default=None,
                        help="warn instead of refusing when preprocessing differs from --init"
                             + note("allow_mismatch"))
    add_run_arguments(parser, d)


def build_config(args: argparse.Namespace) -> FinetuneConfig:
    overrides = run_overrides(args)
    for key in ("dataset", "init", "labeled", "split_seed", "image_size", "label_map",
                "allow_mismatch"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    config_file = args.config
    if args.resume:  # the run folder's config.yaml already holds everything
        return load_config(FinetuneConfig, config_file or Path(args.out) / "config.yaml", overrides)
    cfg = load_config(FinetuneConfig, config_file, overrides)
    if cfg.init != "scratch":  # start from what the initialising run fixes; what is set wins
        from lrcseg.models.load import initialisation_settings  # imports torch

        cfg = load_config(FinetuneConfig, config_file, overrides,
                          base=initialisation_settings(cfg.init))
    return absolute_paths(cfg)


def run(args: argparse.Namespace) -> int:
    from lrcseg.errors import ConfigError

    if args.resume or not args.print_config:
        require_out(args)
    cfg = build_config(args)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    from lrcseg.train.finetune import finetune  # imports torch: not for --help or --print-config

    if not cfg.dataset:
        raise ConfigError("no --dataset given (and none in --config)")
    run_dir = finetune(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"fine-tuning finished: {run_dir}")
    return 0
