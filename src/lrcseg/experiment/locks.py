"""The experiment folder's claims: ``flock`` locks under its ``locks/``.

Parallel invocations: several processes may run the same experiment folder at once (one per
GPU or CPU core, on one machine): each pre-training run and each cell is claimed with an
exclusive lock while it trains, and a process skips what another one holds. Shared steps
(the configuration record, the phantoms, nnU-Net's plans, timings.json, the report) are
waited for. The lock dies with its process, so a killed run leaves nothing stale behind.
The lock itself is ``lrcseg.locking.exclusive_lock``.
"""

from __future__ import annotations

from pathlib import Path

from lrcseg.locking import exclusive_lock as exclusive_lock  # the claims' lock, re-exported


def lock_path(out_dir: Path, name: str) -> Path:
    """The lock file ``name`` of experiment folder ``out_dir``: ``locks/<name>.lock``."""
    return out_dir / "locks" / f"{name}.lock"
