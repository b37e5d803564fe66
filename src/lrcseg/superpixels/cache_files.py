"""Map files beside the slice cache: one ``(Z, H, W)`` id map per case and settings, with its
integrity record. The one implementation behind :mod:`lrcseg.superpixels.region_cache` and
:mod:`lrcseg.superpixels.supervoxel_cache`; each cache names its files and says what its maps
are computed from.

Integrity: beside each map ``<name>.npy``, ``<name>.json`` records its size and SHA-256, the
slice cache entry it was computed from (that entry's digest, field ``"slices"``) and the
settings' key (field ``MapFiles.key_field``), plus what the cache adds. It is written before
the map is renamed into place, so every map written since records has its record. A map is
checked against its record once per ``MapFiles`` object (and again if the file changes); a
damaged map or record, or one of another entry or other settings, is removed with one
DataWarning naming the damaged file, and the cache computes it again.

Process safety: a map is written under a temporary name (mode 0666 less the umask) and renamed
into place; an interrupted write leaves no map under the final name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from lrcseg.data.slice_cache import (
    CachedVolume,
    CorruptCacheFile,
    file_record,
    open_cached_array,
    read_json_record,
)
from lrcseg.errors import DataError, warn_data
from lrcseg.io_utils import atomic_path, atomic_write_json


def record_path(path: Path) -> Path:
    """The record beside a map file: ``regions-<key>.npy`` -> ``regions-<key>.json``."""
    return path.with_suffix(".json")


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file: whether it changed since it was checked."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class MapFiles:
    """The map files of one cache: checked opening, atomic saving, the records.

    noun: what a map is called in messages ("region": "damaged region cache file ...").
    settings: what its settings are called ("superpixel": "computed with other superpixel
        settings").
    key_field: the record field holding ``key`` ("superpixels").
    key: the key of the cache's settings; a record with another is damaged.
    dtypes: the id dtypes a map may have; with more than one, the record names the map's
        (field ``"dtype"``), with one, every map has it.
    legacy: a map without a record in a slice cache entry written before digests (format 1)
        is read with the shape check only (else its missing record makes it damaged).
    """

    def __init__(self, noun: str, settings: str, key_field: str, key: str,
                 dtypes: tuple[str, ...] = ("uint16",), legacy: bool = False):
        if not dtypes:
            raise ValueError("MapFiles needs at least one dtype")
        self.noun = noun
        self.settings = settings
        self.key_field = key_field
        self.key = key
        self.dtypes = tuple(dtypes)
        self.legacy = legacy
        # map file -> its (inode, size, mtime) when its SHA-256 last matched
        self._verified: dict[Path, tuple[int, int, int] | None] = {}

    def get(self, path: Path, cached: CachedVolume,
            compute: Callable[[], tuple[np.ndarray, dict]]) -> np.ndarray:
        """The checked map ``path`` of the slice cache entry ``cached``; if there is none or it
        is damaged, ``compute()`` -> (map, record fields) is saved and returned (DataError if
        it is damaged right after it was written)."""
        usable = self.open(path, cached)
        if usable is not None:
            return usable
        regions, record = compute()
        self.save(path, regions, record)
        try:
            return self.check(path, cached)
        except CorruptCacheFile as exc:
            raise DataError(exc.path, f"{self.noun} file damaged right after it was written "
                                      f"({exc.reason}): check the disk of the cache folder "
                                      f"{cached.dir}") from None

    def open(self, path: Path, cached: CachedVolume) -> np.ndarray | None:
        """The checked map ``path`` of ``cached``; None if there is none, or if it was damaged
        (then it and its record are removed, with a DataWarning naming the damaged file)."""
        if not path.is_file():
            return None
        try:
            return self.check(path, cached)
        except CorruptCacheFile as exc:
            warn_data(exc.path, f"damaged {self.noun} cache file ({exc.reason}); recomputing it",
                      cached.case_id)
            path.unlink(missing_ok=True)
            record_path(path).unlink(missing_ok=True)
            return None

    def check(self, path: Path, cached: CachedVolume) -> np.ndarray:
        """The map ``path`` of ``cached``, memory-mapped after checking it against its record
        (CorruptCacheFile naming the damaged file)."""
        signature = file_signature(path)
        shape = (cached.num_slices, *cached.image.shape[2:])
        record = self.read_record(record_path(path), cached)
        check = self._verified.get(path) != signature
        regions = open_cached_array(path, record, shape, check)
        expected = np.dtype(self.dtypes[0] if record is None or len(self.dtypes) == 1
                            else record["dtype"])
        if regions.dtype != expected:
            raise CorruptCacheFile(path, f"holds {regions.dtype} where {expected} was written")
        if check:
            self._verified[path] = signature
        return regions

    def save(self, path: Path, regions: np.ndarray, record: dict) -> None:
        """Write the map and, before it is renamed into place, its record: size and SHA-256,
        then ``record`` (the entry's digest under "slices", the key, what the cache adds)."""
        with atomic_path(path) as tmp:
            np.save(tmp, regions)
            atomic_write_json(record_path(path), {**file_record(tmp), **record})

    def read_record(self, path: Path, cached: CachedVolume) -> dict | None:
        """The record ``path`` of a map, checked against the slice cache entry ``cached`` and
        the key; None for a map written before records (``legacy``), CorruptCacheFile naming
        the record otherwise."""
        before_records = self.legacy and cached.digest is None
        try:
            record = read_json_record(path, None if before_records else
                                      f"missing, so its {self.noun} file cannot be checked")
        except FileNotFoundError:  # only where before_records
            return None
        required = {"bytes", "sha256", "slices"} | ({"dtype"} if len(self.dtypes) > 1 else set())
        if (not isinstance(record, dict) or not required <= record.keys()
                or (len(self.dtypes) > 1 and record["dtype"] not in self.dtypes)):
            raise CorruptCacheFile(path, f"not a {self.noun} file record")
        if record["slices"] != cached.digest:
            raise CorruptCacheFile(path, "computed from another slice cache entry")
        if record.get(self.key_field) != self.key:
            raise CorruptCacheFile(path, f"computed with other {self.settings} settings "
                                         f"({record.get(self.key_field)}, not {self.key})")
        return record
