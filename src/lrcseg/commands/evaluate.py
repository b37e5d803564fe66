"""Per-organ Dice and HD95 (mm) of a fine-tuned model on a labelled dataset split.

Example:
  lrcseg evaluate --model runs/ft_lrc --dataset DATASET --split test --out metrics.json --figures
Predictions are made on whole slices (padded, never cropped) and mapped back to each case's
original voxel grid before the argmax; metrics are computed there, in mm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrcseg.commands._options import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="fine-tuning run folder or its final.pt")
    parser.add_argument("--dataset", required=True, help="labelled dataset")
    parser.add_argument("--split", default="test", help="test (default), train, all, or a splits.json key")
    parser.add_argument("--out", required=True, help="metrics JSON file to write")
    parser.add_argument("--figures", action="store_true",
                        help="write overlay figures (image, reference, prediction) beside --out")
    parser.add_argument("--label-map", default=None, help="JSON mapping dataset labels onto the model's (default: none, the "
                             "dataset's labels are the model's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from lrcseg.evaluate.metrics import markdown_table, write_metrics
    from lrcseg.evaluate.run import evaluate_model
    from lrcseg.runtime import resolve_device

    out = Path(args.out)
    figures = out.parent / f"{out.stem}_figures" if args.figures else None
    result = evaluate_model(args.model, args.dataset, args.split, resolve_device(args.device),
                            args.label_map, figures, progress=not args.no_progress)
    write_metrics(result, out)
    print(markdown_table(result))
    print(f"\nmetrics written to {out}" + (f"; figures in {figures}" if figures else ""))
    return 0
