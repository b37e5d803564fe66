"""Export pre-trained U-Net weights (encoder + decoder) loadable by MONAI FlexibleUNet.

Example:
  lrcseg export runs/moco_lrc --out moco_lrc_unet.pt
writes moco_lrc_unet.pt (a plain state_dict) and moco_lrc_unet.json (FlexibleUNet arguments,
window, spacing, input channels, superpixel settings). In Python, without lrcseg:
  net = FlexibleUNet(**meta["flexible_unet"], out_channels=N)
  net.load_state_dict(torch.load("moco_lrc_unet.pt"), strict=False)  # only the head is missing

A run pre-trained with --nnunet-plans exports for nnU-Net instead (its configuration, 2d or
3d_fullres, is the pre-training's):
  lrcseg export runs/nnunet_lrc --format nnunet --out lrc_nnunet.pth
  nnUNetv2_train DATASET 2d FOLD -pretrained_weights lrc_nnunet.pth
(--nnunet-plans PLANS and --nnunet-configuration check the weights against another plans file,
e.g. the fine-tuning dataset's, or configuration before writing.) A 3d_fullres run can also be
written as the checkpoint nnU-Net master's nnUNetv2_train_pretrained route reads (checked
against nnU-Net's source, not a release; see lrcseg.nnunet.export):
  lrcseg export runs/nnunet_lrc_3d --format nnunet-pretrained --out lrc_3d.pth
  nnUNetv2_plan_like_dynamic -d DATASET -n lrc -pc lrc_3d.pth -pl nnUNetPlans
  nnUNetv2_train_pretrained DATASET 3d_fullres FOLD -p ptPlans_dynamic__lrc -tr DynamicPretrainedTrainer
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="pre-training run folder (or a checkpoint file)")
    parser.add_argument("--out", required=True, help="output .pt file (a .json is written beside it)")
    parser.add_argument("--format", choices=["flexibleunet", "nnunet", "nnunet-pretrained"],
                        default="flexibleunet",
                        help="flexibleunet: MONAI FlexibleUNet state dict; nnunet: "
                             "{'network_weights': ...} for nnUNetv2_train -pretrained_weights; "
                             "nnunet-pretrained (3d_fullres): the nnssl-format checkpoint of "
                             "nnU-Net master's nnUNetv2_train_pretrained, checked against its "
                             "source, not a release (default: flexibleunet)")
    parser.add_argument("--nnunet-plans", default=None, metavar="PLANS_JSON",
                        help="with --format nnunet*: refuse unless the weights load into this "
                             "plans file's network (default: the plans pre-trained with)")
    parser.add_argument("--nnunet-configuration", default=None, metavar="CONFIGURATION",
                        help="with --format nnunet*: the configuration of the plans the weights "
                             "must load into (default: the one pre-trained with)")


def run(args: argparse.Namespace) -> int:
    from lrcseg.config import to_dict
    from lrcseg.errors import ConfigError
    from lrcseg.models.export import export_weights
    from lrcseg.models.load import load_pretrain_network
    from lrcseg.nnunet.export import export_nnunet

    if Path(args.out).is_dir():
        raise ConfigError(f"{args.out}: --out is a folder; name the .pt file to write")
    for flag, value in (("--nnunet-plans", args.nnunet_plans),
                        ("--nnunet-configuration", args.nnunet_configuration)):
        if value and not args.format.startswith("nnunet"):
            raise ConfigError(f"{flag} checks an nnU-Net export: add --format nnunet")
    net, cfg, state = load_pretrain_network(args.run)
    if args.format.startswith("nnunet"):
        export_nnunet(net, cfg.model, preprocess=to_dict(cfg.preprocess),
                      superpixels=to_dict(cfg.superpixels), out_path=Path(args.out),
                      plans=args.nnunet_plans, configuration=args.nnunet_configuration,
                      export_format=args.format)
    else:
        export_weights(net, cfg.model, cfg.preprocess.in_channels,
                       preprocess=to_dict(cfg.preprocess), superpixels=to_dict(cfg.superpixels),
                       out_path=Path(args.out))
    print(f"exported {state['path']} (step {state['step']}) -> {args.out} and "
          f"{Path(args.out).with_suffix('.json')}")
    return 0
