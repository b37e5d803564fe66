"""What a run folder records: resolved config, run card, JSONL metrics and TensorBoard events.

A run folder can be understood from its files alone:
    config.yaml      the resolved configuration (all defaults filled in)
    run_card.json    data sources, preprocessing, package versions, git revision, machine
    metrics.jsonl    one JSON object per logged step (append-only; safe to tail). A line torn
                     by a kill during an append is skipped when read and dropped on resume.
    tb/              TensorBoard events: the scalars of metrics.jsonl, the config as hparams
                     (one table across runs) and image summaries (pre-training: augmented view
                     pairs with their region maps; fine-tuning: prediction overlays)
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

import numpy as np

from lrcseg import __version__
from lrcseg.config import flatten_dict
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

    from lrcseg.runtime import cpu_model

    card = {
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(),
        },
        **extra,
    }
    atomic_write_json(run_dir / "run_card.json", card)


class RunLogger:
    """Scalars to metrics.jsonl and TensorBoard; rank-0 only (pass enabled=False elsewhere).

    On resume the JSONL is truncated to the rows at or before the resumed step, so the log
    never holds two rows for one step, and the clock continues: pass the checkpoint's
    ``clock()`` as ``clock`` and the "time" column (seconds of training), TensorBoard's
    relative time and the run card's ``wall_seconds`` go on from the checkpoint's elapsed time
    instead of restarting at 0 (the time between the kill and the resume is not counted).
    Without a stored clock (a checkpoint of an older lrcseg) the last kept row's time is used.
    """

    def __init__(self, run_dir: Path, start_step: int = 0, enabled: bool = True,
                 clock: dict[str, float] | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        kept = self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        # scalars of step s are logged once s steps are done: the checkpoint's own step stays
        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"),
                                 purge_step=start_step + 1 if start_step else None)
        now = time.time()
        if clock is None:
            elapsed = float(kept[-1].get("time") or 0.0) if kept and start_step else 0.0
            clock = {"elapsed_s": elapsed, "origin": now - elapsed}
        self._origin = float(clock["origin"])  # TensorBoard wall time of the run's second 0
        self._t0 = now - float(clock["elapsed_s"])  # the local clock's second 0

    @property
    def tensorboard(self):
        """The run's ``SummaryWriter`` (None when disabled), for images and hparams."""
        return self._tb

    def elapsed(self) -> float:
        """Seconds of training so far, over every resume."""
        return time.time() - self._t0

    def clock(self) -> dict[str, float]:
        """What a checkpoint stores so a resumed run's clock continues (``clock=`` above)."""
        return {"elapsed_s": self.elapsed(), "origin": self._origin}

    def walltime(self) -> float:
        """TensorBoard wall time of now: the first run's start plus the training time."""
        return self._origin + self.elapsed()

    def log_hparams(self, config: dict[str, Any], metrics: list[str]) -> None:
        """The run's flattened config ("optim/lr": 0.001, ...) in TensorBoard's HPARAMS table,
        with the scalar tags ``metrics`` ("loss/total", "probe/mean_dice") as its columns, so
        runs written to sibling folders compare in one table (``tensorboard --logdir runs``)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        flat = {k: "none" if v is None else v if isinstance(v, (bool, int, float, str)) else str(v)
                for k, v in flatten_dict(config, "/").items()}  # TensorBoard has no null
        writer = self._tb._get_file_writer()
        for summary in hparams(flat, {m: 0.0 for m in metrics}):
            writer.add_summary(summary, walltime=self.walltime())

    def log_image(self, tag: str, step: int, rgb: np.ndarray) -> None:
        """An (H, W, 3) uint8 image as a TensorBoard image summary at ``step``."""
        if self.enabled:
            self._tb.add_image(tag, rgb, step, dataformats="HWC", walltime=self.walltime())

    def log_view_pairs(self, step: int, view1, regions1, view2, regions2, channel: int = 0,
                       pairs: int = 4) -> None:
        """Tag "pretrain/views": for the first ``pairs`` samples of a batch, one row of view 1,
        its region map, view 2, its region map (radiological; regions in fixed colours with
        yellow boundaries). view1, view2: (B, C, S, S) tensors in [0, 1]; regions (B, S, S);
        channel: the input channel shown (the slice the regions belong to)."""
        from lrcseg.viz import grey_rgb, regions_rgb, tile_rgb

        if not self.enabled:
            return
        rows = []
        for b in range(min(pairs, view1.shape[0])):
            row = []
            for view, regions in ((view1, regions1), (view2, regions2)):
                image = view[b, channel].detach().float().cpu().numpy()
                reg = regions[b].detach().cpu().numpy()
                row += [grey_rgb(image), regions_rgb(image, reg)]
            rows.append(row)
        self.log_image("pretrain/views", step, tile_rgb(rows))

    def log_prediction(self, step: int, images, targets, logits, channel: int = 0) -> None:
        """Tag "finetune/prediction": image | reference | prediction of the batch's first
        training crop (radiological, label colours as in the figures). images (B, C, S, S),
        targets (B, S, S) ids, logits (B, K, S, S) of the step's forward pass."""
        from lrcseg.viz import grey_rgb, labels_rgb, tile_rgb

        if not self.enabled:
            return
        image = images[0, channel].detach().float().cpu().numpy()
        target = targets[0].detach().cpu().numpy()
        prediction = logits[0].detach().argmax(0).cpu().numpy()
        n = logits.shape[1]
        self.log_image("finetune/prediction", step, tile_rgb([[
            grey_rgb(image), labels_rgb(image, target, n), labels_rgb(image, prediction, n)]]))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = self.elapsed()
        row = {"step": step, "time": round(elapsed, 3)}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step, walltime=self._origin + elapsed)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
            self._record_wall_seconds()

    def _record_wall_seconds(self) -> None:
        """run_card.json's ``wall_seconds``: training time so far, over every resume."""
        card_path = self.run_dir / "run_card.json"
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        card["wall_seconds"] = round(self.elapsed(), 1)
        atomic_write_json(card_path, card)

    def _truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drop the rows after ``step``; returns the rows kept."""
        if not self.path.exists():
            return []
        keep = [row for row in _read_rows(self.path) if row["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in keep))
        return keep


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
