"""RegionCache: stored beside the slice cache, reused, rebuilt on a parameter change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from lrcseg.config import PreprocessConfig, SuperpixelConfig
from lrcseg.data.layouts import Case
from lrcseg.data.readers import write_nifti
from lrcseg.data.slice_cache import SliceCache
from lrcseg.superpixels.region_cache import RegionCache
from lrcseg.superpixels.regions import compute_regions

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def _case(folder: Path, name: str, seed: int, z: int = 3) -> Case:
    """A small NIfTI CT: air around a body of 6-pixel tissue blocks (-100..200 HU) plus noise."""
    rng = np.random.default_rng(seed)
    hu = np.full((48, 40, z), -1000.0, np.float32)
    blocks = rng.choice([-100.0, 0.0, 60.0, 200.0], size=(6, 5, z))
    tissue = np.repeat(np.repeat(blocks, 6, axis=0), 6, axis=1)[:36, :28]
    hu[6:42, 6:34] = ndimage.gaussian_filter(tissue + rng.normal(0, 5, tissue.shape), (0.7, 0.7, 0))
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / f"{name}.nii.gz", hu, AFFINE)
    return Case(name, folder / f"{name}.nii.gz")


def test_get_matches_compute_regions_and_is_reused(tmp_path):
    case = _case(tmp_path / "data", "c1", seed=0)
    slices = SliceCache(PreprocessConfig())
    cache = RegionCache(slices, SuperpixelConfig(min_size_mm2=20.0))
    regions = cache.get(case)
    vol = slices.get(case)
    assert isinstance(regions, np.memmap) and regions.dtype == np.uint16 and regions.shape == (3, 48, 40)
    for z in range(3):
        expected = compute_regions(vol.image[z, 0].astype(np.float32), vol.body[z], 1.5,
                                   SuperpixelConfig(min_size_mm2=20.0))
        np.testing.assert_array_equal(regions[z], expected)
    assert regions[1].max() > 3 and cache.computed_slices == 3
    path = cache.path(vol)
    assert path.parent == vol.dir and path.name == f"regions-{cache.cfg.key()}.npy"
    mtime = path.stat().st_mtime_ns

    again = RegionCache(slices, SuperpixelConfig(min_size_mm2=20.0, implementation="skimage"))
    np.testing.assert_array_equal(again.get(case), regions)  # same key: read, not recomputed
    assert again.computed_slices == 0 and path.stat().st_mtime_ns == mtime

    changed = RegionCache(slices, SuperpixelConfig(min_size_mm2=20.0, scale=400.0))
    coarse = changed.get(case)
    assert changed.computed_slices == 3 and changed.path(vol) != path
    assert coarse[1].max() < regions[1].max()
    other_pre = RegionCache(SliceCache(PreprocessConfig(spacing_mm=3.0)), SuperpixelConfig(min_size_mm2=20.0))
    assert other_pre.get(case).shape == (3, 24, 20) and other_pre.computed_slices == 3


def test_build_in_parallel_matches_get_and_reports_stats(tmp_path):
    cases = [_case(tmp_path / "data", f"c{i}", seed=i, z=2 + i) for i in range(2)]
    cfg = SuperpixelConfig(min_size_mm2=20.0)
    stats = RegionCache(SliceCache(PreprocessConfig()), cfg).build(cases, workers=2, progress=False)
    assert stats["cases"] == 2 and stats["slices"] == 5 and stats["computed_slices"] == 5
    assert 1 <= stats["regions_min"] <= stats["regions_median"] <= stats["regions_max"]
    assert stats["slices_per_s"] > 0
    fresh = RegionCache(SliceCache(PreprocessConfig()), cfg)
    for case in cases:
        built = fresh.get(case)
        assert fresh.computed_slices == 0
        assert stats["regions_max"] >= built.reshape(len(built), -1).max()
    again = fresh.build(cases, workers=1, progress=False)
    assert again["computed_slices"] == 0 and again["regions_median"] == stats["regions_median"]
