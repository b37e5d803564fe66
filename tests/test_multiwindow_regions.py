"""Multi-window superpixels: a lung window beside the soft-tissue window splits a lung that the
soft-tissue window shows as one flat region; the network's input channels are untouched."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lrcseg.config import PreprocessConfig, SuperpixelConfig
from lrcseg.data.layouts import load_dataset
from lrcseg.data.readers import write_nifti
from lrcseg.data.slice_cache import SliceCache
from lrcseg.superpixels.region_cache import RegionCache

SOFT, LUNG = (-175.0, 250.0), (-1350.0, 150.0)


def chest_phantom(path):
    """A 40 HU body (1.5 mm pixels) holding a lung of -950..-600 HU texture: every lung pixel is
    below the soft-tissue window, so that window shows the lung as a flat 0."""
    rng = np.random.default_rng(0)
    x, y = np.mgrid[0:120, 0:100]
    hu = np.full((120, 100, 2), -1000.0, np.float32)
    body = ((x - 60) / 55.0) ** 2 + ((y - 50) / 45.0) ** 2 < 1
    lung = ((x - 60) / 35.0) ** 2 + ((y - 50) / 28.0) ** 2 < 1
    hu[body] = 40.0
    blobs = np.kron(rng.uniform(-950, -600, (12, 10)), np.ones((10, 10)))  # 15 mm patches
    for z in range(2):
        hu[..., z][lung] = blobs[lung]
    write_nifti(path, hu, np.diag([1.5, 1.5, 3.0, 1.0]))
    return lung


def lung_regions(tmp_path, windows):
    lung = chest_phantom(tmp_path / "chest.nii.gz")
    case = load_dataset(tmp_path / "chest.nii.gz").cases[0]
    slices = SliceCache(PreprocessConfig(window_hu=SOFT, spacing_mm=1.5), tmp_path / "cache")
    cache = RegionCache(slices, SuperpixelConfig(windows_hu=windows, min_size_mm2=40.0))
    regions = np.asarray(cache.get(case)[0])
    assert slices.get(case).image.shape[1] == 1  # the network still sees one channel
    return regions, lung, cache


def test_lung_window_splits_the_lung(tmp_path):
    soft, lung, _ = lung_regions(tmp_path / "a", [])
    both, _, cache = lung_regions(tmp_path / "b", [list(SOFT), list(LUNG)])
    assert cache.window_cache is not None  # the lung window comes from its own slice cache
    inner = ndimage.binary_erosion(lung, iterations=3)  # beyond the smoothed lung boundary
    soft_count = len(np.unique(soft[inner]))
    both_count = len(np.unique(both[inner]))
    assert soft_count == 1  # flat: the soft-tissue window clips the whole lung to 0
    assert both_count >= 10  # 20 measured: the 15 mm texture patches come apart
    # outside the lung the body is the same 40 HU: one region in both settings
    wall = ndimage.binary_erosion(soft > 0, iterations=5) & ~ndimage.binary_dilation(lung, iterations=5)
    assert len(np.unique(soft[wall])) == 1 and len(np.unique(both[wall])) == 1


def test_windows_of_the_preprocessing_reuse_its_channels(tmp_path):
    soft, _, cache = lung_regions(tmp_path, [list(SOFT)])
    assert cache.window_cache is None
    assert SuperpixelConfig(windows_hu=[SOFT]).key() != SuperpixelConfig().key()
    assert SuperpixelConfig().key() == SuperpixelConfig(windows_hu=[]).key()


def test_illegal_window_is_refused():
    from lrcseg.errors import ConfigError

    with pytest.raises(ConfigError, match="superpixel HU window"):
        SuperpixelConfig(windows_hu=[(150.0, -1350.0)])
