"""Run the whole pipeline on synthetic phantoms (filled in as stages land)."""

from __future__ import annotations

import argparse

from lrcseg.errors import LrcsegError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise LrcsegError("demo is not implemented yet")
