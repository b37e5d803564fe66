"""Flags shared by the training commands, mapped onto the nested config keys they override.

Their defaults live in the config dataclasses (``lrcseg.config``), not in argparse: a flag
that is not given leaves the value of ``--config`` (or the dataclass default) in place. The
help text quotes the dataclass default (``_options.default_note``), so ``--help`` and a run
agree.
"""

from __future__ import annotations

import argparse
from typing import Any

from lrcseg.commands._options import add_device_argument, default_note

# flag dest -> (section, key) in the run config; None section = top level.
RUN_FLAGS: dict[str, tuple[str | None, str]] = {
    "steps": ("run", "steps"),
    "batch_size": ("run", "batch_size"),
    "seed": ("run", "seed"),
    "workers": ("run", "workers"),
    "device": ("run", "device"),
    "out": ("run", "out"),
    "cache_dir": ("run", "cache_dir"),
    "backbone": ("model", "backbone"),
    "lr": ("optim", "lr"),
    "warmup_steps": ("optim", "warmup_steps"),
    "spacing": ("preprocess", "spacing_mm"),
}


def add_run_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """The shared flags; ``defaults`` is the command's default config (PretrainConfig(), ...)."""
    def note(path: str) -> str:
        return default_note(defaults, path)

    steps = (" (default: automatic, scaled with the labelled slices; the same for every "
             "initialisation)" if defaults.run.steps is None else note("run.steps"))
    parser.add_argument("--config", default=None,
                        help="YAML config file; flags override it (default: none, the built-in "
                             "defaults shown here)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults <- --config <- flags) as YAML "
                             "and exit without training; the output loads with --config")
    parser.add_argument("--out", default=None,
                        help="run folder (created; must be new unless --resume); required "
                             "unless --print-config")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps" + steps)
    parser.add_argument("--batch-size", type=int, default=None, help="slices per step" + note("run.batch_size"))
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate" + note("optim.lr"))
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warm-up steps before the cosine decay" + note("optim.warmup_steps"))
    parser.add_argument("--seed", type=int, default=None, help="seed of the run" + note("run.seed"))
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader worker processes" + note("run.workers"))
    parser.add_argument("--backbone", default=None,
                        help="resnet10, resnet18, resnet34, resnet50, resnet101" + note("model.backbone"))
    parser.add_argument("--spacing", type=float, default=None,
                        help="in-plane spacing in mm (must match between pre-training and "
                             "fine-tuning)" + note("preprocess.spacing_mm"))
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: $LRCSEG_CACHE or ~/.cache/lrcseg)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(parser)


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Nested overrides from the flags that were given (None = not given)."""
    overrides: dict[str, Any] = {}
    for dest, (section, key) in RUN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if section is None:
            overrides[key] = value
        else:
            overrides.setdefault(section, {})[key] = value
    return overrides


def set_nested(overrides: dict[str, Any], section: str, key: str, value: Any) -> None:
    if value is not None:
        overrides.setdefault(section, {})[key] = value


def config_yaml(cfg: Any) -> str:
    """The resolved config as the YAML a run folder's config.yaml holds (loads with --config)."""
    import yaml

    from lrcseg.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def require_out(args: argparse.Namespace) -> None:
    """A ConfigError unless --out was given (training always names its run folder)."""
    if args.out is None:
        from lrcseg.errors import ConfigError

        raise ConfigError("--out is required: the run folder to create (or --print-config to "
                          "only show the resolved config)")
