"""Not implemented yet (see the open issues)."""

from __future__ import annotations

import argparse

from lrcseg.errors import LrcsegError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise LrcsegError("'evaluate' is not implemented yet")
