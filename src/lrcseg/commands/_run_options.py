"""Flags shared by the training commands, mapped onto the nested config keys they override."""

from __future__ import annotations

import argparse
from typing import Any

from lrcseg.cli import add_device_argument

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
    "spacing": ("preprocess", "spacing_mm"),
}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (flags override it)")
    parser.add_argument("--out", required=True, help="run folder (created; must be new unless --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="data loader worker processes")
    parser.add_argument("--backbone", default=None, help="resnet18, resnet34, resnet50, ...")
    parser.add_argument("--spacing", type=float, default=None,
                        help="in-plane spacing in mm (must match between pre-training and fine-tuning)")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default $LRCSEG_CACHE or ~/.cache/lrcseg)")
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
