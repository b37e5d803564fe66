"""The child process of an nnU-Net step: ``python -m lrcseg.nnunet plan|train|predict ARG``.

Started by ``workspace.run_child`` with nnU-Net's folders in its environment; ARG is the
dataset id (plan, with ``--configuration``) or the step's JSON spec (train, predict, which
name their configuration in it).
"""

from __future__ import annotations

import argparse
import sys

from lrcseg.nnunet.planning import run_planner
from lrcseg.nnunet.prediction import run_predictor
from lrcseg.nnunet.training import run_trainer
from lrcseg.nnunet.workspace import DEFAULT_CONFIGURATION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrcseg.nnunet")
    parser.add_argument("step", choices=["plan", "train", "predict"])
    parser.add_argument("arg", help="dataset id (plan) or the step's JSON spec")
    parser.add_argument("--configuration", default=DEFAULT_CONFIGURATION,
                        help="plan: the configuration to preprocess (default: 2d)")
    args = parser.parse_args(argv)
    if args.step == "plan":
        run_planner(int(args.arg), args.configuration)
    elif args.step == "train":
        run_trainer(args.arg)
    else:
        run_predictor(args.arg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
