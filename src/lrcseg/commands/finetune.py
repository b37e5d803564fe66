"""Fine-tune a segmentation U-Net on K labelled volumes.

Examples:
  lrcseg finetune --dataset DATASET --init scratch --labeled 1 --seed 0 --out runs/ft_scratch
  lrcseg finetune --dataset DATASET --init runs/moco_lrc --labeled 2 --out runs/ft_lrc
  lrcseg finetune --dataset DATASET --init weights.pt --labeled 0.2 --out runs/ft
  lrcseg finetune --dataset DATASET --init runs/moco_lrc --head-first 200 --pretrained-lr-scale 0.1 --out runs/ft_lpft
Every initialisation gets the same step budget and hyper-parameters; the last checkpoint is
the result. --init supplies what its weights fix (backbone, decoder, window, spacing): repeat
them only to change them, which is refused if they conflict. The labelled cases are drawn from --split-seed and written to split.json.
--freeze, --head-first and --pretrained-lr-scale set the fine-tuning strategy of the layers
that came from --init (``strategy`` in the config; refused from scratch, which has none).
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
from lrcseg.config import FinetuneConfig, absolute_paths, load_config, read_config_file


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
    parser.add_argument("--freeze", choices=("encoder", "none"), default=None,
                        help="encoder: the pre-trained encoder stays frozen for the whole run "
                             "(no gradients, BatchNorm in eval mode; the decoder and head train); "
                             "none: every layer trains (default: "
                             f"{'encoder' if d.strategy.freeze_encoder else 'none'})")
    parser.add_argument("--head-first", type=int, default=None, metavar="STEPS",
                        help="LP-FT: the first STEPS steps train only the new segmentation head, "
                             "then every layer, each phase with its own warm-up"
                             + note("strategy.head_first_steps"))
    parser.add_argument("--pretrained-lr-scale", type=float, default=None, metavar="S",
                        help="the layers that came from --init (encoder unless frozen, decoder) "
                             "train at S x --lr" + note("strategy.decoder_lr_scale"))
    parser.add_argument("--organ-contrast", action=argparse.BooleanOptionalAction, default=None,
                        help="simulated contrast phase: each labelled organ's HU shifted by its "
                             "own random offset, for scans of another phase than the labelled "
                             "ones (docs/METHOD.md)" + note("organ_contrast.enabled"))
    add_run_arguments(parser, d)


def build_config(args: argparse.Namespace) -> FinetuneConfig:
    overrides = run_overrides(args)
    for key in ("dataset", "init", "labeled", "split_seed", "image_size", "label_map",
                "allow_mismatch"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    config_file = args.config
    strategy = _strategy_overrides(args, config_file or (Path(args.out) / "config.yaml"
                                                         if args.resume else None))
    if strategy:
        overrides["strategy"] = strategy
    if args.organ_contrast is not None:
        overrides["organ_contrast"] = {"enabled": args.organ_contrast}
    if args.resume:  # the run folder's config.yaml already holds everything
        return load_config(FinetuneConfig, config_file or Path(args.out) / "config.yaml", overrides)
    cfg = load_config(FinetuneConfig, config_file, overrides)
    if cfg.init != "scratch":  # start from what the initialising run fixes; what is set wins
        from lrcseg.models.load import initialisation_settings  # imports torch

        cfg = load_config(FinetuneConfig, config_file, overrides,
                          base=initialisation_settings(cfg.init))
    return absolute_paths(cfg)


def _strategy_overrides(args: argparse.Namespace, config_file: str | Path | None) -> dict:
    """``strategy`` keys from --freeze, --head-first and --pretrained-lr-scale. The scale goes
    to the decoder, and to the encoder unless it is frozen (by --freeze or, without the flag,
    by ``config_file``): a frozen encoder has no learning rate."""
    strategy: dict = {}
    if args.freeze is not None:
        strategy["freeze_encoder"] = args.freeze == "encoder"
    if args.head_first is not None:
        strategy["head_first_steps"] = args.head_first
    if args.pretrained_lr_scale is not None:
        frozen = strategy.get("freeze_encoder")
        if frozen is None and config_file is not None:
            frozen = (read_config_file(config_file).get("strategy") or {}).get("freeze_encoder")
        strategy["decoder_lr_scale"] = args.pretrained_lr_scale
        if not frozen:
            strategy["encoder_lr_scale"] = args.pretrained_lr_scale
    return strategy


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
