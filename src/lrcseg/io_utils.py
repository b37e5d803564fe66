"""Atomic file output: write to a temporary name beside the target, then rename.

Every file lrcseg writes that another process (or a resumed run) may read goes through these
helpers, so an interrupted write never leaves a half-written file under the final name.

Files and folders get the modes a plain ``open``/``mkdir`` would give (0666/0777 less the
umask), not the private 0600/0700 of ``tempfile``: colleagues on a shared server can read
results when the umask lets them. A failed write raises ``OSError`` naming the target (the CLI
turns it into one line, exit 2); torch's "unexpected pos" write failures become one too.

What was written can be checked when it is read again: ``file_sha256`` (recorded beside cache
entries and exports) and ``zip_archive_fault`` (the CRC-32s inside every torch .pt file).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    The temporary file keeps the target's suffix (``.nii.gz``, ``.png``...) so libraries that
    choose a format from the name still work. On an exception the temporary file is removed
    and ``target`` is left untouched; an ``OSError`` without a file name gets ``target``'s.
    """
    target = Path(target)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_unique(target, suffix, _new_file)
    except OSError as exc:
        _name_target(exc, target)
        raise
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.errno is None:  # a short write reported without a cause (numpy's tofile)
            exc = _write_failure(tmp_path, target, exc)
        tmp_path.unlink(missing_ok=True)
        _name_target(exc, target, tmp_path)
        raise exc from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(target: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``target`` atomically."""
    atomic_write_text(target, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def append_invocation(path: str | os.PathLike, seconds: float, **fields: Any) -> dict[str, Any]:
    """Add one invocation ({"finished", "seconds", **fields}) to a ``timings.json`` of a folder
    that several invocations build (a resumed experiment or demo) and return the whole record,
    ``{"invocations": [...], "total_seconds": sum}``. The caller serialises parallel writers."""
    import time

    path = Path(path)
    record = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    record["invocations"].append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "seconds": round(seconds, 1), **fields})
    record["total_seconds"] = round(sum(r["seconds"] for r in record["invocations"]), 1)
    atomic_write_json(path, record)
    return record


def atomic_save(target: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Call ``save(tmp_path)`` and rename the result onto ``target`` (for torch.save, savefig...).

    torch.save to a path reports a failed write (disk full, file too large) as a RuntimeError
    ("unexpected pos ..."); it is raised as an OSError naming ``target``.
    """
    with atomic_path(target) as tmp:
        try:
            save(tmp)
        except RuntimeError as exc:
            if not any(m in str(exc) for m in _TORCH_WRITE_FAILURES):
                raise
            raise _write_failure(tmp, target, exc) from exc


def atomic_torch_save(target: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``target`` atomically, through a Python file object so a failed
    write raises the operating system's OSError (ENOSPC, EFBIG...) naming ``target``."""
    import torch

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    atomic_save(target, save)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a whole folder under a temporary name, then rename it onto ``target``.

    Raises FileExistsError if ``target`` exists; a failed build leaves nothing behind.
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(errno.EEXIST, "already exists", str(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_unique(target, "", _new_dir)
    except OSError as exc:
        _name_target(exc, target)
        raise
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno is None:  # a short write reported without a cause (numpy's tofile)
            exc = _write_failure(tmp / ".probe", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)
        _name_target(exc, target, tmp)
        raise exc from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard_dir(target: str | os.PathLike) -> bool:
    """Remove the folder (or file) ``target`` as one step for other processes: rename it to a
    temporary name beside it, then delete that. False if ``target`` was already gone (another
    process discarded it first)."""
    target = Path(target)
    trash = target.parent / f".{target.name}.{secrets.token_hex(4)}.discarded"
    try:
        os.rename(target, trash)
    except FileNotFoundError:
        return False
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------- integrity of what we wrote
# Checkpoints, exports and cache entries are checked once when they are opened, against a
# record made when they were written: a SHA-256 (cache entries, exports) or the CRC-32 of every
# record that torch's zip writer stores in a .pt file (torch.load never checks them).


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex); about 1.4 GB/s on a CPU with SHA extensions."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def zip_archive_fault(path: str | os.PathLike) -> str | None:
    """Why the zip archive ``path`` (torch.save's format) is damaged, or None if it is intact.

    Reads every record and checks the CRC-32 written with it (about 1.5 GB/s), so flipped or
    zeroed bytes, truncation and a missing central directory are found; bytes that no reader
    uses (padding, timestamps) are not checked. Errors reading the file (permission, EIO)
    raise their OSError.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as fh:
                    while fh.read(1 << 22):
                        pass
    except OSError:
        raise
    except zipfile.BadZipFile as exc:
        if "not a zip file" in str(exc):
            return "not a complete zip archive (truncated, or its end overwritten)"
        return str(exc).rstrip(".") or "bad zip archive"
    except Exception as exc:  # zipfile meets damaged headers with many exception types
        return f"damaged zip archive ({type(exc).__name__}: {first_line(exc)})"
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters (for one-line
    errors that quote a library's multi-line message)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


# Messages of torch's zip writer when the underlying write fails.
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666 & ~umask


def _new_dir(path: Path) -> None:
    os.mkdir(path, 0o777)  # mode 0777 & ~umask


def _create_unique(target: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """Create ``.<name>.<random><suffix>`` beside ``target`` with ``create`` (exclusive)."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"
        try:
            create(path)
        except FileExistsError:
            continue
        except OSError as exc:
            _name_target(exc, target, path)
            raise
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


def _name_target(exc: OSError, target: Path, tmp: Path | None = None) -> None:
    """Let ``exc`` name ``target``, not the temporary name (or no name: writes through an open
    file raise OSErrors without one)."""
    if exc.filename is None or (tmp is not None and exc.filename == str(tmp)):
        exc.filename = str(target)
        if exc.filename2 is not None:
            exc.filename2 = None


def _write_failure(probe: Path, target: Path, exc: Exception) -> OSError:
    """The OSError behind a write reported without a cause (torch's RuntimeError, numpy's
    "N requested and M written"): appending to ``probe`` makes the operating system say why
    (ENOSPC, EFBIG, EDQUOT...)."""
    try:
        with open(probe, "ab") as fh:
            fh.write(bytes(2**20))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as reason:
        if reason.errno is not None:
            return OSError(reason.errno, reason.strerror, str(target))
    return OSError(errno.EIO, f"write failed ({str(exc).strip()[:120]})", str(target))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
