"""Run the whole pipeline on synthetic phantoms (the embedded default).

Generates phantoms, checks them, builds superpixels, pre-trains MoCo v2 and MoCo v2 + LRC
briefly, fine-tunes them and scratch on one labelled case with the same budget, evaluates on
the test split, prints the Dice table and writes report.md and figures. A smoke run, not
evidence: measured comparisons live in docs/results/. Rerunning resumes finished stages.
"""

from __future__ import annotations

import argparse

from lrcseg.commands._options import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="lrcseg_demo", help="output folder")
    parser.add_argument("--fast", action="store_true", help="tiny budgets: the smoke run the test suite runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from lrcseg.experiment.demo import run_demo

    run_demo(args.out, fast=args.fast, device=args.device or "auto", progress=not args.no_progress)
    return 0
