"""The superpixel preview behind ``lrcseg superpixels``: look at the regions before a long run.

:func:`preview_superpixels` builds the slice and region caches of every case of a dataset,
measures the regions on a few slices per case (:func:`region_quality`: region size; ASA and
organ-boundary recall where labels exist), draws region boundaries on a few slices
(:func:`write_overlays`) and writes ``summary.json`` and ``summary.txt``
(:func:`summary_text`) in the output folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrcseg.config import PreprocessConfig, SuperpixelConfig, to_dict
from lrcseg.data.layouts import Case, load_dataset
from lrcseg.data.slice_cache import SliceCache
from lrcseg.io_utils import atomic_write_json, atomic_write_text
from lrcseg.superpixels.metrics import (
    achievable_segmentation_accuracy,
    boundary_recall,
    region_stats,
)
from lrcseg.superpixels.region_cache import RegionCache

#: slices per case (evenly spaced among slices with a body) used for quality metrics
QUALITY_SLICES_PER_CASE = 12


def preview_superpixels(data: str | Path, out: str | Path, superpixels: SuperpixelConfig,
                        preprocess: PreprocessConfig, *, cache_dir: str | Path | None = None,
                        workers: int = 0, overlays: int = 4,
                        progress: bool = True) -> dict[str, Any]:
    """Build the caches of ``data`` and write ``out``/summary.json, summary.txt and overlays.

    data: a dataset, NIfTI file or DICOM series (``load_dataset``); its training and test
    cases are all previewed. out: the folder written. workers: region-building processes
    (0 = all cores). overlays: the number of PNG overlays.

    Returns the summary (what summary.json holds): the data and settings, the cache key, the
    region cache's build statistics (``RegionCache.build``: slices, regions per slice
    min/median/max, seconds, slices/s, ...), :func:`region_quality` and the overlay names.
    """
    dataset = load_dataset(data)
    cases = list(dataset.cases) + list(dataset.test_cases)
    slice_cache = SliceCache(preprocess, cache_dir)
    regions_cache = RegionCache(slice_cache, superpixels)
    build = regions_cache.build(cases, workers=workers, progress=progress)

    out = Path(out)
    quality = region_quality(slice_cache, regions_cache, cases)
    written = write_overlays(slice_cache, regions_cache, cases, out, overlays)
    summary = {
        "data": str(data),
        "superpixels": to_dict(superpixels),
        "preprocess": to_dict(preprocess),
        "cache_key": superpixels.key(),
        **build,
        **quality,
        "overlays": written,
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.txt", summary_text(summary))
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    """A summary (:func:`preview_superpixels`) as a few readable lines: summary.txt, and what
    ``lrcseg superpixels`` prints."""
    sp, pre = summary["superpixels"], summary["preprocess"]
    windows = sp["windows_hu"] or [pre["window_hu"]]
    lines = [
        f"superpixels of {summary['data']}",
        f"  settings    {sp['method']} scale {sp['scale']:g}, sigma {sp['sigma']:g}, "
        f"min size {sp['min_size_mm2']:g} mm^2, windows {windows} HU, "
        f"slices at {pre['spacing_mm']:g} mm",
    ]
    lines += [
        f"  {summary['cases']} cases, {summary['slices']} slices ({summary['computed_slices']} "
        f"computed now, {summary['seconds']:.1f} s, {_number(summary['slices_per_s'], '.1f')} "
        "slices/s)",
        f"  regions per slice with a body: min {summary['regions_min']}, median "
        f"{summary['regions_median']:g}, max {summary['regions_max']}",
    ]
    lines += [
        f"  region size median {_number(summary['region_size_median_mm2'], '.0f')} mm^2 "
        f"({summary['quality_slices']} sampled slices)",
        f"  ASA {_number(summary['asa'], '.3f')}, organ-boundary recall "
        f"{_number(summary['boundary_recall'], '.3f')} ({summary['labelled_slices']} labelled slices; "
        "n/a without labels)",
        f"  overlays    {', '.join(summary['overlays']) or 'none'}",
        f"  cache key   {summary['cache_key']} (summary.json has every field)",
    ]
    return "\n".join(lines) + "\n"


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def body_slices(body: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` slice indices evenly spaced among the slices with any body pixel.

    body: a bool array of shape (Z, H, W). Returns sorted indices into Z, none if no slice has
    a body pixel.
    """
    with_body = np.flatnonzero(body.reshape(len(body), -1).any(axis=1))
    if len(with_body) == 0:
        return []
    picks = np.linspace(0, len(with_body) - 1, min(n, len(with_body))).round().astype(int)
    return [int(with_body[i]) for i in np.unique(picks)]


def region_quality(slice_cache: SliceCache, regions_cache: RegionCache,
                   cases: Sequence[Case]) -> dict[str, Any]:
    """Region size, ASA and organ-boundary recall on :data:`QUALITY_SLICES_PER_CASE` slices
    per case (:func:`body_slices`).

    Returns {"quality_slices": slices measured, "region_size_median_mm2": the median over
    them of each slice's median region area, "asa" and "boundary_recall": means over the
    labelled slices (any organ label on the slice; recall where it is defined),
    "labelled_slices"}; a value with no slice to measure is None.
    """
    asa, recall, sizes = [], [], []
    for case in cases:
        vol = slice_cache.get(case)
        regions = regions_cache.get(case)
        area = float(vol.spacing_mm[0] * vol.spacing_mm[1])
        for z in body_slices(vol.body, QUALITY_SLICES_PER_CASE):
            reg = np.asarray(regions[z], dtype=np.int64)
            sizes.append(region_stats(reg, area)["size_median_mm2"])
            if vol.label is not None and np.asarray(vol.label[z]).any():
                lab = np.asarray(vol.label[z], dtype=np.int64)
                asa.append(achievable_segmentation_accuracy(reg, lab))
                r = boundary_recall(reg, lab)
                if np.isfinite(r):
                    recall.append(r)
    return {
        "quality_slices": len(sizes),
        "region_size_median_mm2": float(np.median(sizes)) if sizes else None,
        "asa": float(np.mean(asa)) if asa else None,
        "boundary_recall": float(np.mean(recall)) if recall else None,
        "labelled_slices": len(asa),
    }


def write_overlays(slice_cache: SliceCache, regions_cache: RegionCache, cases: Sequence[Case],
                   out: Path, count: int) -> list[str]:
    """Up to ``count`` PNGs in ``out`` of region boundaries (yellow) on the preprocessing
    window (``window_hu``), radiological orientation: slices spread over the first cases
    (:func:`body_slices`).

    Returns the file names written (``overlay_<case>_z<slice>.png``).
    """
    from lrcseg.viz import montage  # matplotlib

    picks: list[tuple[Case, int]] = []
    per_case = max(1, -(-count // max(1, len(cases))))
    for case in cases:
        vol = slice_cache.get(case)
        picks += [(case, z) for z in body_slices(vol.body, per_case)]
        if len(picks) >= count:
            break
    written = []
    for case, z in picks[:count]:
        vol = slice_cache.get(case)
        regions = np.asarray(regions_cache.get(case)[z], dtype=np.int64)
        path = out / f"overlay_{safe_name(case.id)}_z{z:03d}.png"
        title = f"{case.id} z={z}: {len(np.unique(regions[regions > 0]))} regions"
        montage([np.asarray(vol.image[z, 0], dtype=np.float32)], [regions], [title], path,
                ncols=1, panel_in=8.0, boundaries=True, spacing_xy=tuple(vol.spacing_mm[:2]))
        written.append(path.name)
    return written


def safe_name(name: str) -> str:
    """``name`` usable in a file name: other characters than letters, digits, - _ . become _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
