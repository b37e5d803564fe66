"""Write a synthetic abdominal CT dataset (nnU-Net v2 layout) and/or its realism report.

Examples:
  lrcseg phantoms --out data/phantoms --cases 12 --seed 0                # realistic 0.8/2.5 mm
  lrcseg phantoms --out data/demo --cases 8 --preset small               # 2 mm / 5 mm, fast
  lrcseg phantoms --out data/old --cases 8 --preset small --anatomy 1    # earlier releases'
  lrcseg phantoms --out data/demo --cases 8 --spacing 2 2 5 --size 200 150 40 --report
  lrcseg phantoms --out data/phantoms --report                           # report on existing

The dataset holds dataset.json, imagesTr/, labelsTr/, splits.json (pretrain / train / test)
and montage.png; --report adds realism.json and prints the table beside real-CT figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrcseg.errors import ConfigError, DataError
from lrcseg.phantoms.generate import ANATOMY_VERSIONS, PRESETS, default_shape, write_phantom_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    parser.add_argument("--cases", type=int, default=None,
                        help="number of cases to write (default: none; omit with --report to report on "
                             "--out)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (case i is the same for any N)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sampling preset: default (0.8x0.8x2.5 mm) or small (2x2x5 mm, 40 slices) "
                             "(default: default)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                        help="voxel size in mm (default: the preset's)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="grid size (default: 400 x 300 x 200 mm field of view at the spacing)")
    parser.add_argument("--pretrain-fraction", type=float, default=0.5,
                        help="share of cases in the pre-training pool")
    parser.add_argument("--train-fraction", type=float, default=0.2,
                        help="share of labelled training candidates; the rest is test")
    parser.add_argument("--anatomy", type=int, choices=ANATOMY_VERSIONS, default=2,
                        help="anatomy version: 1 = the phantoms of earlier releases, 2 = the anatomy "
                             "checked against real CT (spine posterior, kidneys posterolateral to it, "
                             "organs never painted inside each other) (default: 2)")
    parser.add_argument("--report", action="store_true",
                        help="measure realism (writes realism.json, prints the table)")
    parser.add_argument("--report-cases", type=int, default=4, help="cases the report reads")


def run(args: argparse.Namespace) -> int:
    if args.cases is None and not args.report:
        raise ConfigError("give --cases N to write a dataset, or --report to measure an existing one")
    if args.cases is not None:
        preset = PRESETS[args.preset or "default"]
        spacing = tuple(args.spacing) if args.spacing else preset["spacing_mm"]
        if args.size:
            shape = tuple(args.size)
        elif args.spacing:
            shape = default_shape(spacing)
        else:
            shape = preset["shape"]
        if args.cases < 1:
            raise ConfigError(f"Illegal --cases {args.cases}: need >= 1")
        if args.out.exists():
            raise DataError(args.out, "already exists: choose a new --out (datasets are never overwritten)")
        print(f"writing {args.cases} phantoms {shape[0]}x{shape[1]}x{shape[2]} at "
              f"{spacing[0]:g}x{spacing[1]:g}x{spacing[2]:g} mm (anatomy {args.anatomy}) to {args.out}",
              flush=True)
        try:
            write_phantom_dataset(args.out, args.cases, args.seed, spacing, shape,
                                  args.pretrain_fraction, args.train_fraction, progress=True,
                                  anatomy=args.anatomy)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        print(f"wrote {args.out} (dataset.json, splits.json, montage.png)")
    if args.report:
        from lrcseg.phantoms.realism import format_realism_table, realism_report

        if not (args.out / "dataset.json").is_file():
            raise DataError(args.out, "no dataset.json: not a dataset folder")
        report = realism_report(args.out, max_cases=args.report_cases)
        print(format_realism_table(report))
        print(f"wrote {args.out / 'realism.json'}")
    return 0
