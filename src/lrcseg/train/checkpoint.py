"""Atomic checkpoints: a run can be killed at any instant and resumed from its folder.

``checkpoint.pt`` is always the latest complete checkpoint (written to a temporary name, then
renamed). ``final.pt`` is written once at the end of a run. This module writes them; reading
them (``load_checkpoint``, ``find_checkpoint``, ...) is ``lrcseg.models.load``'s, so that
inference and evaluation need nothing from ``lrcseg.train``.

Integrity: torch's zip writer records a CRC-32 of every record of the archive (the pickle and
each tensor's bytes); ``load_checkpoint`` verifies them all before unpickling, so a checkpoint
altered after it was written (flipped or zeroed bytes, truncation) is refused with one line
naming it rather than resumed or scored. The record lives inside the file, so it is replaced
with it in one rename: no sidecar can disagree with its checkpoint after a kill.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lrcseg.io_utils import atomic_save, atomic_torch_save
from lrcseg.models.load import FINAL, LATEST


def save_checkpoint(run_dir: Path, state: dict[str, Any], final: bool = False) -> Path:
    """Write ``state`` atomically as the latest checkpoint (and as final.pt if ``final``).

    The final state is stored once: checkpoint.pt becomes a hard link to final.pt (a copy
    where the file system has no hard links), so a finished run does not hold two copies of
    the weights and optimizer state.
    """
    target = Path(run_dir) / (FINAL if final else LATEST)
    atomic_torch_save(target, state)
    if final:
        def link(tmp: Path) -> None:
            tmp.unlink()  # the placeholder atomic_save made
            try:
                os.link(target, tmp)
            except OSError:
                with open(tmp, "wb") as fh:
                    torch.save(state, fh)

        atomic_save(Path(run_dir) / LATEST, link)
    return target
