"""What a command invocation is checked for and holds while it runs, in this order:

1. the training command's run folder (``--out``) is owned by this process
   (``lrcseg.locking.own_folder``): a second process on it is refused before it touches
   anything;
2. the ``--device`` exists on this machine (``lrcseg.runtime.resolve_device``), before any
   data is read;
3. a ``--resume`` can continue the run folder (``lrcseg.train.resume.check_resumable``),
   before the run's config.yaml is read.

``lrcseg.cli.main`` runs every command inside :func:`guard_invocation`. The checks import
torch, so they are imported only when needed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from lrcseg.locking import own_folder

#: What a process refused a run folder that another process owns is told to do.
OWNED_FOLDER_HINT = "wait for it to finish or choose another --out"


@contextlib.contextmanager
def guard_invocation(*, device: str | None, out: str | os.PathLike | None, resume: bool,
                     own_out: bool) -> Iterator[None]:
    """Run the block with the run folder ``out`` owned (if ``own_out``), once the device and
    the resume were checked; ConfigError (one line) if a check fails.

    device: the ``--device`` value; None or "" checks nothing. out: the run folder, None if
    the command has none. resume: ``--resume`` was given; checked only with ``out``.
    own_out: ``out`` is a run folder this command writes (new, resumed or cleared): it is
    created unless ``resume`` and locked for the block (removed again at the end if nothing
    but the lock was put in it). Under torchrun only rank 0 locks it: the other ranks do not
    write the folder.
    """
    own = own_out and bool(out) and os.environ.get("RANK", "0") == "0"
    with (own_folder(out, create=not resume, hint=OWNED_FOLDER_HINT) if own
          else contextlib.nullcontext()):
        if device:
            from lrcseg.runtime import resolve_device  # imports torch

            resolve_device(device)
        if resume and out:
            from lrcseg.train.resume import check_resumable  # imports torch

            check_resumable(out)
        yield
