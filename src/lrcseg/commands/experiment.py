"""Run a matrix of initialisations x labelled cases x draws x seeds and write the report.

Pre-training runs are shared by the cells that use them; every fine-tune gets the same
budget; finished cells (metrics.json present) are never rerun, so rerunning the same command
resumes. Several processes may run one --out at once (one per GPU or core): each run is
claimed with a file lock and the others skip it. Writes results.csv, report.md, figures/ and
experiment.yaml in --out.
See docs/EXPERIMENTS.md and configs/experiment_phantoms.yaml.
"""

from __future__ import annotations

import argparse

from lrcseg.commands._options import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (ExperimentConfig)")
    parser.add_argument("--out", default=None,
                        help="experiment folder (rerun to resume); required unless --print-config")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved experiment config (--config <- --device) as YAML "
                             "and exit; the output loads with --config")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new cell after this many minutes (run a long matrix in "
                             "chunks; rerun the same command to continue) (default: no limit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from lrcseg.commands._run_options import config_yaml, require_out
    from lrcseg.config import ExperimentConfig, load_config
    from lrcseg.experiment.runner import run_experiment

    if not args.print_config:
        require_out(args)
    overrides = {"device": args.device} if args.device else None
    cfg = load_config(ExperimentConfig, args.config, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    max_seconds = None if args.max_minutes is None else 60 * args.max_minutes
    results = run_experiment(cfg, args.out, progress=not args.no_progress, max_seconds=max_seconds)
    print(results)
    return 0
