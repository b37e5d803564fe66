"""Exclusive ``flock`` locks: one process at a time writes a folder.

Two uses:
- :func:`exclusive_lock`, a lock file anywhere (the experiment runner's ``locks/<name>.lock``
  claims, ``lrcseg.experiment.locks``), waiting or not;
- :func:`own_folder`, a command's output folder owned for the whole invocation: a second
  lrcseg process that wants to write it is refused at once with one line naming the folder and
  the owner's pid, and touches nothing. Taken by ``lrcseg.train.invocation.guard_invocation``
  for the training commands' ``--out`` (a new run, ``--resume``, the clearing of a run that
  stopped before its first checkpoint) and by ``lrcseg predict`` for its output folder. The lock file
  (:data:`LOCK_NAME`, inside the folder) exists only while its owner runs; readers of a run
  folder ignore it (``train/resume.py``).

flock locks belong to the open file, so they also exclude a second claim inside one process,
and they vanish when the process dies: a killed run leaves no stale lock. Local file systems
only (NFS may not honour flock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from lrcseg.errors import ConfigError

#: The lock file a folder's owner holds, inside the folder, while it writes.
LOCK_NAME = ".lrcseg.lock"


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False if ``wait`` is off and it is held.

    The file (and its folder) is created if missing and stays after the block.
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


@contextlib.contextmanager
def own_folder(folder: str | os.PathLike, create: bool, hint: str) -> Iterator[None]:
    """Own ``folder`` for the block: hold an exclusive lock on ``<folder>/.lrcseg.lock``.

    create: make the folder (and missing parents) if it does not exist; they are removed again
    at the end if nothing but the lock was put in them (a command that refused its input
    leaves no empty folder). Without ``create`` a missing folder is not locked (the command
    reports it). A path that is a file, or a folder this process may not write (read-only: no
    process can write it), is not locked either; the command reports what it finds.
    hint: what the refused user can do ("wait for it to finish or choose another --out").

    Raises ConfigError "<folder>: this folder is being written by another lrcseg process
    (pid N); <hint>" if another process owns it. The lock file is removed when the block ends.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        yield
        return
    made = _missing_folders(folder) if create else []
    if made:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        yield
        return
    fd = _acquire(folder / LOCK_NAME, hint)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd, folder / LOCK_NAME)
            _remove_empty(made)


def _acquire(path: Path, hint: str) -> int | None:
    """The open, locked lock file with this process's pid in it; None if it cannot be made."""
    for _ in range(100):  # the file may be removed by its releasing owner between open and flock
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            pid = f" (pid {owner})" if owner else ""
            raise ConfigError(f"{path.parent}: this folder is being written by another lrcseg "
                              f"process{pid}; {hint}") from None
        if _is_current(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise ConfigError(f"{path}: could not take the folder's lock file (it keeps being replaced)")


def _release(fd: int, path: Path) -> None:
    """Remove the lock file while still holding it, then let it go: a process that opened the
    old file meanwhile sees it is gone (:func:`_is_current`) and takes a new one."""
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)


def _is_current(fd: int, path: Path) -> bool:
    """True if ``path`` still names the file open as ``fd``."""
    try:
        named, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for path in (folder.absolute(), *folder.absolute().parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return
