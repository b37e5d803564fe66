"""What a run folder records: resolved config, run card, JSONL metrics and TensorBoard events.

A run folder can be understood from its files alone:
    config.yaml      the resolved configuration (all defaults filled in)
    run_card.json    data sources, preprocessing, package versions, git revision, machine
    metrics.jsonl    one JSON object per logged step (append-only; safe to tail). A line torn
                     by a kill during an append is skipped when read and dropped on resume.
    tb/              TensorBoard events (same scalars as metrics.jsonl)
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from lrcseg import __version__
from lrcseg.io_utils import atomic_write_json, atomic_write_text

_PACKAGES = ("torch", "monai", "numpy", "scipy", "nibabel", "pydicom", "scikit-image", "numba")


def package_versions() -> dict[str, str]:
    versions = {"lrcseg": __version__, "python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def git_revision() -> str | None:
    """The lrcseg source tree's git revision (with '+dirty' for local changes), if any."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def write_run_card(run_dir: Path, kind: str, extra: dict[str, Any]) -> None:
    """Write run_card.json: what produced this run and from which inputs."""
    import torch

    card = {
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(),
        },
        **extra,
    }
    atomic_write_json(run_dir / "run_card.json", card)


class RunLogger:
    """Scalars to metrics.jsonl and TensorBoard; rank-0 only (pass enabled=False elsewhere).

    On resume the JSONL is truncated to the rows at or before the resumed step, so the log
    never holds two rows for one step.
    """

    def __init__(self, run_dir: Path, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=start_step or None)
        self._t0 = time.time()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() - self._t0, 3)}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [json.dumps(row) for row in _read_rows(self.path) if row["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl (a torn or foreign line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return _read_rows(path)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The ``{"step": int, ...}`` rows of a JSONL file; lines that do not parse as one (a line
    torn by a kill during an append, an editor's stray text) are skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows
