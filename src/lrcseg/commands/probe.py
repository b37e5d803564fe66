"""Frozen-feature dense linear probe: per-organ Dice/HD95 of a linear classifier on a network's
features, the network itself untouched.

Examples:
  lrcseg probe --model runs/pretrain/moco_lrc --dataset DATASET --labeled 1 --out probe.json
  lrcseg probe --model scratch --backbone resnet10 --spacing 3 --dataset DATASET --out probe.json
  lrcseg probe --model export/model.pt --dataset DATASET --levels encoder --out enc.json
The K labelled cases are drawn as fine-tuning draws them (--labeled, --split-seed); a
class-balanced sample of --pixels labelled pixels trains a softmax classifier on the
standardised features of --levels (encN: encoder at stride N in 2..32, decN: decoder block at
stride N in 16..1; or a named set: all, encoder, decoder), after the network's BatchNorm
statistics are re-estimated on the fitting slices (--batchnorm reestimate; "stored" keeps the
network's own); --split is scored on each case's original grid. metrics.json has the shape
of ``lrcseg evaluate``'s plus a "probe" record of what was fitted and how.
A 3D pre-training (``model.spatial_dims: 3``: a FlexibleUNet, or nnU-Net's 3d_fullres network
from --nnunet-plans) and an nnU-Net 2d one are read through the network's levels adapter: a 3D
network reads each labelled volume whole (padded to its strides), its features sampled at the
chosen voxels, and predicts each test volume whole; a named level set means its levels the
network has (an nnU-Net network's follow its stages).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrcseg.commands._options import add_device_argument, default_note
from lrcseg.config import PreprocessConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="pre-training or fine-tuning run folder or checkpoint, exported .pt "
                             "(with its .json), or 'scratch'")
    parser.add_argument("--dataset", required=True, help="labelled dataset")
    parser.add_argument("--labeled", type=float, default=1,
                        help="labelled cases to fit on: a count, or a fraction < 1")
    parser.add_argument("--split-seed", type=int, default=0, help="seed that draws the labelled cases")
    parser.add_argument("--split", default="test", help="test (default), train, all, or a splits.json key")
    parser.add_argument("--out", required=True, help="metrics JSON file to write")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the pixel draw (and of the scratch initialisation)")
    parser.add_argument("--backbone", default=None, help="scratch only: resnet18 (default), resnet10, ...")
    parser.add_argument("--spacing", type=float, default=None,
                        help="scratch only: in-plane spacing in mm" + default_note(PreprocessConfig(), "spacing_mm"))
    parser.add_argument("--pixels", type=int, default=None,
                        help="labelled pixels to fit on, class-balanced (default 20000)")
    parser.add_argument("--levels", default=None,
                        help="feature levels: 'encoder' (enc4,enc8,enc16,enc32), 'decoder' "
                             "(dec4,dec2,dec1), 'all' (both) or a comma list of encN / decN, N the "
                             "in-plane stride; a set means its levels the network has "
                             "(default enc4,enc8,enc16,enc32,dec4,dec2,dec1)")
    parser.add_argument("--batchnorm", choices=("reestimate", "stored"), default="reestimate",
                        help="BatchNorm running statistics: re-estimated on the fitting slices "
                             "(default; every network alike) or as stored in the model")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default $LRCSEG_CACHE or ~/.cache/lrcseg)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from lrcseg.evaluate.metrics import markdown_table, write_metrics
    from lrcseg.evaluate.probe import DEFAULT_LEVELS, DEFAULT_PIXELS, evaluate_probe, parse_levels
    from lrcseg.runtime import resolve_device

    out = Path(args.out)
    levels = parse_levels(args.levels) if args.levels is not None else DEFAULT_LEVELS
    result = evaluate_probe(args.model, args.dataset, labeled=args.labeled,
                            split_seed=args.split_seed, split=args.split, seed=args.seed,
                            backbone=args.backbone, spacing_mm=args.spacing,
                            pixels=DEFAULT_PIXELS if args.pixels is None else args.pixels,
                            levels=levels, device=resolve_device(args.device),
                            cache_dir=args.cache_dir, progress=not args.no_progress,
                            batchnorm=args.batchnorm)
    write_metrics(result, out)
    print(markdown_table(result))
    probe = result["probe"]
    print(f"\nprobe of {probe['model']} ({probe['kind']}) on {', '.join(probe['levels'])} "
          f"({probe['level_set']}), BatchNorm {probe['batchnorm']}: "
          f"{probe['pixels_used']} pixels from {', '.join(probe['labelled_cases'])}, "
          f"train accuracy {probe['train_accuracy']:.3f}, {probe['lbfgs_iterations']} L-BFGS "
          f"iterations, {probe['fit_seconds']:.1f} s")
    print(f"metrics written to {out}")
    return 0
