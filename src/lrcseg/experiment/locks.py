"""Exclusive ``flock`` locks under an experiment folder's ``locks/``.

Parallel invocations: several processes may run the same experiment folder at once (one per
GPU or CPU core, on one machine): each pre-training run and each cell is claimed with an
exclusive lock while it trains, and a process skips what another one holds. Shared steps
(the configuration record, the phantoms, nnU-Net's plans, timings.json, the report) are
waited for. The lock dies with its process, so a killed run leaves nothing stale behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def lock_path(out_dir: Path, name: str) -> Path:
    """The lock file ``name`` of experiment folder ``out_dir``: ``locks/<name>.lock``."""
    return out_dir / "locks" / f"{name}.lock"


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False if ``wait`` is off and it is held.

    flock locks belong to the open file, so they also exclude a second claim inside one
    process, and they vanish when the process dies (no stale locks). Local file systems only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
