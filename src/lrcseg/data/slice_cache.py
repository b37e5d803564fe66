"""Slice cache: each volume is decoded, resampled and windowed once, then memory-mapped.

Layout: ``<cache root>/slices/<cfg.key()>/<case id>-<source hash>/`` with ``image.npy``
``(Z, W_n, H, W)`` float16, ``body.npy`` ``(Z, H, W)`` bool, optional ``label.npy``
``(Z, H, W)`` int16 and ``meta.json``. The source hash covers the resolved image (and label)
path, size and modification time, so an edited file gets a fresh entry; new preprocessing
settings get a new ``cfg.key()`` folder. The cache never lives in the data tree.

Integrity: ``meta.json`` records the size and SHA-256 of each array file, the entry's own
place (``<cfg.key()>/<case key>``) and a digest of itself. ``get`` checks an entry when it opens
it: the record's digest and place, each file's size and SHA-256 (once per ``SliceCache`` object
and entry, about 1.4 GB/s; never per slice), and that the arrays parse with the recorded shapes.
A damaged entry (flipped or zeroed bytes, truncation, a file or folder from another entry) is
discarded and rebuilt from the source files with one warning naming the damaged cache file; it
is never reported as a fault of the source. Entries written before digests (format 1) are
read as before, with the shape checks only.

Process safety: a case folder is built under a temporary name in the same parent and renamed
into place. Two processes may build the same case at once; the loser of the rename discards
its copy and uses the winner's, which is complete by construction.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lrcseg.config import PreprocessConfig, stable_hash, to_dict
from lrcseg.data.layouts import Case
from lrcseg.data.preprocess import PreprocessedVolume, preprocess_volume
from lrcseg.data.readers import read_image, read_label
from lrcseg.errors import DataError, warn_data
from lrcseg.io_utils import atomic_dir, discard_dir, file_sha256, first_line
from lrcseg.paths import cache_root

CACHE_FORMAT = 2  # 2: meta.json records the files' SHA-256s and its own digest (1 is still read)


@dataclass
class CachedVolume(PreprocessedVolume):
    """A case's ``PreprocessedVolume`` memory-mapped read-only from the cache.

    The arrays are memmaps (image float16); case_id: the case; dir: the case's cache folder
    (the region cache may put sibling files there); digest: the digest of the entry's record,
    which identifies its content (None for an entry written before digests).
    """

    case_id: str
    dir: Path
    digest: str | None = None

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


def source_fingerprint(path: Path) -> dict:
    """Resolved path, total size and latest mtime (ns) of a file or a DICOM folder's files."""
    path = Path(path).resolve()
    if path.is_dir():
        stats = [p.stat() for p in sorted(path.iterdir()) if p.is_file()]
        size = sum(s.st_size for s in stats)
        mtime = max([s.st_mtime_ns for s in stats], default=path.stat().st_mtime_ns)
    else:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return {"path": str(path), "size": int(size), "mtime_ns": int(mtime)}


class CorruptCacheFile(Exception):
    """A cache file that does not hold what was written there. Raised and handled inside the
    caches, which rebuild the entry with a warning naming ``path`` (or refuse it with a
    DataError if the rebuilt one is damaged too)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file just written, to check it against when it is opened."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def open_cached_array(path: str | os.PathLike, record: dict[str, Any] | None,
                      shape: Iterable[int], verify: bool = True) -> np.memmap:
    """``np.load(path, mmap_mode="r")`` of a cache file, checked first.

    record: the file's :func:`file_record` (None for a file written before records): its size
    must match and, with ``verify``, its SHA-256. Then the array must parse and have ``shape``.
    Raises CorruptCacheFile saying what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptCacheFile(path, "missing")
    if record is not None:
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CorruptCacheFile(path, f"{size} bytes where {record['bytes']} were written "
                                         "(truncated or overwritten)")
        if verify and file_sha256(path) != record["sha256"]:
            raise CorruptCacheFile(path, "content differs from what was written (SHA-256)")
    try:
        array = np.load(path, mmap_mode="r")
    except OSError:
        raise
    except Exception as exc:  # numpy meets a damaged header with many exception types
        raise CorruptCacheFile(path, f"not a readable array ({first_line(exc)})") from None
    if array.shape != tuple(shape):
        raise CorruptCacheFile(path, f"holds shape {array.shape} where {tuple(shape)} was "
                                     "written")
    return array


def read_json_record(path: str | os.PathLike, missing: str | None) -> Any:
    """The parsed JSON of a cache record (any JSON value: the caller checks its fields).

    missing: the CorruptCacheFile reason if the file does not exist; None: FileNotFoundError
    then (for a caller to which a missing record can mean something else). Raises
    CorruptCacheFile if it is not readable JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing is None:
            raise
        raise CorruptCacheFile(path, missing) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptCacheFile(path, f"not readable JSON ({first_line(exc)})") from None


def case_key(case: Case) -> str:
    """``<readable id>-<12 hex>`` from the image (and label) fingerprints."""
    sources = {"image": source_fingerprint(case.image)}
    if case.label is not None:
        sources["label"] = source_fingerprint(case.label)
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", case.id)[:60] or "case"
    return f"{readable}-{digest}"


class SliceCache:
    """Preprocessed, memory-mapped slices per case under ``<root>/slices/<cfg.key()>/``.

    cfg: the preprocessing settings (their hash names the folder).
    root: the cache root; None = ``lrcseg.paths.cache_root()`` ($LRCSEG_CACHE or ~/.cache/lrcseg).
    """

    def __init__(self, cfg: PreprocessConfig, root: str | os.PathLike | None = None):
        if not isinstance(cfg, PreprocessConfig):
            raise ValueError(f"SliceCache needs a PreprocessConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.dir = cache_root(root) / "slices" / cfg.key()
        # entry folder -> its files' (inode, size, mtime) when their SHA-256s last matched
        self._verified: dict[Path, tuple] = {}

    def case_dir(self, case: Case) -> Path:
        return self.dir / case_key(case)

    def get(self, case: Case, verify: bool = True) -> CachedVolume:
        """The case's cached slices; built on first use (atomic, safe across processes).

        The entry is checked as the module docstring says; ``verify=False`` skips the SHA-256s
        (for a caller that has just had this entry from ``get``). A damaged entry is rebuilt
        with a DataWarning naming the damaged file; DataError if the rebuilt one is damaged.
        """
        target = self.case_dir(case)
        if target.exists():
            try:
                return self._open(target, case, verify)
            except CorruptCacheFile as exc:
                warn_data(exc.path, f"damaged slice cache entry ({exc.reason}); rebuilding it "
                                    f"from {case.image}", case.id)
                discard_dir(target)
        self._build(case, target)
        try:
            return self._open(target, case, verify=True)
        except CorruptCacheFile as exc:
            raise DataError(exc.path, f"slice cache entry damaged right after it was built "
                                      f"({exc.reason}): check the disk of the cache folder "
                                      f"{self.dir}") from None

    def build_all(self, cases: Iterable[Case], progress: bool = True) -> list[CachedVolume]:
        """``get`` every case in order, with a tqdm progress bar when ``progress``."""
        cases = list(cases)
        return [self.get(c) for c in tqdm(cases, desc="preprocessing", unit="case",
                                           disable=not progress or not cases)]

    def _build(self, case: Case, target: Path) -> None:
        image = read_image(case.image)
        label = read_label(case.label, image) if case.label is not None else None
        pre = preprocess_volume(image, self.cfg, label)
        meta = {
            "format": CACHE_FORMAT,
            "entry": _entry_name(target),
            "case_id": case.id,
            "image": str(case.image),
            "label": None if case.label is None else str(case.label),
            "preprocess": to_dict(self.cfg),
            "spacing_mm": list(pre.spacing_mm),
            "original_shape": list(pre.original_shape),
            "affine": pre.affine.tolist(),
            "shape": list(pre.image.shape),
            "has_label": pre.label is not None,
        }
        arrays = {"image.npy": pre.image.astype(np.float16), "body.npy": pre.body}
        if pre.label is not None:
            arrays["label.npy"] = pre.label
        try:
            with atomic_dir(target) as tmp:
                for name, array in arrays.items():
                    np.save(tmp / name, array)
                meta["files"] = {name: file_record(tmp / name) for name in arrays}
                meta["digest"] = _record_digest(meta)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        except OSError:
            # Another process renamed its complete copy into place first: use that one.
            if not (target / "meta.json").is_file():
                raise

    def _open(self, folder: Path, case: Case, verify: bool) -> CachedVolume:
        """The entry in ``folder``, checked (CorruptCacheFile naming the damaged file)."""
        signature = _signature(folder)
        meta = _read_record(folder, case)
        files = meta.get("files")  # None: an entry written before digests
        check = verify and self._verified.get(folder) != signature
        try:
            shape = [int(n) for n in meta["shape"]]
            plane = [shape[0], *shape[2:]]

            def array(name: str, expected: list[int]) -> np.memmap:
                record = None if files is None else files[name]
                return open_cached_array(folder / name, record, expected, check)

            volume = CachedVolume(
                image=array("image.npy", shape),
                body=array("body.npy", plane),
                label=array("label.npy", plane) if meta["has_label"] else None,
                spacing_mm=tuple(meta["spacing_mm"]),
                original_shape=tuple(meta["original_shape"]),
                affine=np.asarray(meta["affine"], dtype=np.float64).reshape(4, 4),
                case_id=meta["case_id"],
                dir=folder,
                digest=meta.get("digest"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCacheFile(folder / "meta.json", f"incomplete record ({first_line(exc)})"
                                   ) from None
        if check:
            self._verified[folder] = signature
        return volume


def _entry_name(folder: Path) -> str:
    """``<cfg.key()>/<case key>``: where an entry belongs, recorded in its meta.json."""
    return f"{folder.parent.name}/{folder.name}"


def _record_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a meta.json record without its "digest"."""
    return stable_hash({k: v for k, v in meta.items() if k != "digest"}, length=64)


def _read_record(folder: Path, case: Case) -> dict[str, Any]:
    """The entry's meta.json, checked against its digest and its place (CorruptCacheFile)."""
    path = folder / "meta.json"
    meta = read_json_record(path, "missing")
    if not isinstance(meta, dict):
        raise CorruptCacheFile(path, "not a cache record")
    if "digest" not in meta:
        if meta.get("format") != 1:
            raise CorruptCacheFile(path, "record without its digest")
        if meta.get("case_id") != case.id:  # format 1 records no place: the case must match
            raise CorruptCacheFile(path, f"describes case {meta.get('case_id')!r}, not {case.id!r}")
        return meta
    if meta.get("format") != CACHE_FORMAT:
        raise CorruptCacheFile(path, f"format {meta.get('format')!r} of another lrcseg version")
    if meta["digest"] != _record_digest(meta):
        raise CorruptCacheFile(path, "content differs from what was written (digest)")
    if meta.get("entry") != _entry_name(folder):
        raise CorruptCacheFile(path, f"describes the entry {meta.get('entry')}, not this one "
                                     "(moved or copied from another entry)")
    return meta


def _signature(folder: Path) -> tuple:
    """(name, inode, size, mtime) of the entry's files: whether they changed since a check."""
    out = []
    for name in ("meta.json", "image.npy", "body.npy", "label.npy"):
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)
