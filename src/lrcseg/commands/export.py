"""Export pre-trained U-Net weights (encoder + decoder) loadable by MONAI FlexibleUNet.

Example:
  lrcseg export runs/moco_lrc --out moco_lrc_unet.pt
writes moco_lrc_unet.pt (a plain state_dict) and moco_lrc_unet.json (FlexibleUNet arguments,
window, spacing, input channels, superpixel settings). In Python, without lrcseg:
  net = FlexibleUNet(**meta["flexible_unet"], out_channels=N)
  net.load_state_dict(torch.load("moco_lrc_unet.pt"), strict=False)  # only the head is missing
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="pre-training run folder (or a checkpoint file)")
    parser.add_argument("--out", required=True, help="output .pt file (a .json is written beside it)")


def run(args: argparse.Namespace) -> int:
    from lrcseg.config import PretrainConfig, from_dict, to_dict
    from lrcseg.errors import ConfigError
    from lrcseg.models.export import export_weights
    from lrcseg.models.pretrain_net import PretrainNetwork
    from lrcseg.train.checkpoint import load_checkpoint, resolve_checkpoint

    if Path(args.out).is_dir():
        raise ConfigError(f"{args.out}: --out is a folder; name the .pt file to write")
    ckpt = resolve_checkpoint(args.run, "pre-training run")
    state = load_checkpoint(ckpt)
    if state.get("kind") != "pretrain":
        raise ConfigError(f"{ckpt}: not a pre-training checkpoint (kind={state.get('kind')})")
    cfg = from_dict(PretrainConfig, state["config"])
    net = PretrainNetwork(cfg.model, cfg.preprocess.in_channels)
    net.load_state_dict(state["network"])
    export_weights(net, cfg.model, cfg.preprocess.in_channels, preprocess=to_dict(cfg.preprocess),
                   superpixels=to_dict(cfg.superpixels), out_path=Path(args.out))
    print(f"exported {ckpt} (step {state['step']}) -> {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0
