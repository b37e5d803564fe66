"""Slice cache: each volume is decoded, resampled and windowed once, then memory-mapped.

Layout: ``<cache root>/slices/<cfg.key()>/<case id>-<source hash>/`` with ``image.npy``
``(Z, W_n, H, W)`` float16, ``body.npy`` ``(Z, H, W)`` bool, optional ``label.npy``
``(Z, H, W)`` int16 and ``meta.json``. The source hash covers the resolved image (and label)
path, size and modification time, so an edited file gets a fresh entry; new preprocessing
settings get a new ``cfg.key()`` folder. The cache never lives in the data tree.

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

import numpy as np
from tqdm import tqdm

from lrcseg.config import PreprocessConfig, to_dict
from lrcseg.data.layouts import Case
from lrcseg.data.preprocess import PreprocessedVolume, preprocess_volume
from lrcseg.data.readers import read_image, read_label
from lrcseg.io_utils import atomic_dir
from lrcseg.paths import cache_root

CACHE_FORMAT = 1


@dataclass
class CachedVolume(PreprocessedVolume):
    """A case's ``PreprocessedVolume`` memory-mapped read-only from the cache.

    The arrays are memmaps (image float16); case_id: the case; dir: the case's cache folder
    (the region cache may put sibling files there).
    """

    case_id: str
    dir: Path

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

    def case_dir(self, case: Case) -> Path:
        return self.dir / case_key(case)

    def get(self, case: Case) -> CachedVolume:
        """The case's cached slices; built on first use (atomic, safe across processes)."""
        target = self.case_dir(case)
        if not (target / "meta.json").is_file():
            self._build(case, target)
        return self._open(target)

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
        try:
            with atomic_dir(target) as tmp:
                np.save(tmp / "image.npy", pre.image.astype(np.float16))
                np.save(tmp / "body.npy", pre.body)
                if pre.label is not None:
                    np.save(tmp / "label.npy", pre.label)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        except OSError:
            # Another process renamed its complete copy into place first: use that one.
            if not (target / "meta.json").is_file():
                raise

    def _open(self, folder: Path) -> CachedVolume:
        meta = json.loads((folder / "meta.json").read_text())
        label_path = folder / "label.npy"
        return CachedVolume(
            image=np.load(folder / "image.npy", mmap_mode="r"),
            body=np.load(folder / "body.npy", mmap_mode="r"),
            label=np.load(label_path, mmap_mode="r") if meta["has_label"] else None,
            spacing_mm=tuple(meta["spacing_mm"]),
            original_shape=tuple(meta["original_shape"]),
            affine=np.asarray(meta["affine"], dtype=np.float64),
            case_id=meta["case_id"],
            dir=folder,
        )
