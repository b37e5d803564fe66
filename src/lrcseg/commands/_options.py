"""Argparse helpers that any command may use: the ``--device`` option and the help text's
``(default: V)`` of an option whose default lives in a config dataclass.

Commands never import ``lrcseg.cli`` (it loads the commands; ``tests/test_layering.py``).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The global ``--device`` choice for commands that run a network."""
    parser.add_argument("--device", default=None,
                        help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:N, "
                             "mps; one that this machine lacks is refused before any work")


def config_value(cfg: Any, path: str) -> Any:
    """The field at dotted ``path`` ("lrc.weight") of a config dataclass instance."""
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


def default_note(cfg: Any, path: str) -> str:
    """' (default: V)' for the field at dotted ``path`` of ``cfg``, as a YAML user writes it:
    lists comma-joined, booleans on/off, None as none."""
    value = config_value(cfg, path)
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value) or "none"
    elif value is None:
        text = "none"
    else:
        text = str(value)
    return f" (default: {text})"
