"""compute_regions: body masking, contiguous ids, mm-based sizes, grid ablation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from test_felzenszwalb import phantom_like_slice

from lrcseg.config import PreprocessConfig, SuperpixelConfig
from lrcseg.superpixels.metrics import achievable_segmentation_accuracy
from lrcseg.superpixels.regions import compute_regions, min_size_pixels


def _assert_contiguous(regions: np.ndarray, body: np.ndarray) -> int:
    assert regions.dtype == np.int32
    assert (regions[~body] == 0).all() and (regions[body] > 0).all()
    ids = np.unique(regions[body])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    return len(ids)


@pytest.mark.parametrize("implementation", ["fast", "skimage"])
def test_ids_are_contiguous_with_zero_outside_the_body(implementation):
    img, body = phantom_like_slice(3, size=96)
    cfg = SuperpixelConfig(scale=100, sigma=0.8, min_size_mm2=20.0, implementation=implementation)
    regions = compute_regions(img, body, 1.5, cfg)
    n = _assert_contiguous(regions, body)
    assert 5 <= n <= 200
    # raster-order numbering: the first body pixel is region 1
    assert regions[body][0] == 1


def test_fast_and_skimage_give_the_same_regions():
    img, body = phantom_like_slice(5, size=80)
    fast = compute_regions(img, body, 1.5, SuperpixelConfig(implementation="fast"))
    ref = compute_regions(img, body, 1.5, SuperpixelConfig(implementation="skimage"))
    np.testing.assert_array_equal(fast, ref)


def test_min_size_is_in_mm2():
    assert min_size_pixels(110.0, 1.5) == 49
    img, body = phantom_like_slice(1, size=96)
    cfg = SuperpixelConfig(min_size_mm2=110.0)
    for spacing in (1.5, 3.0):
        regions = compute_regions(img, body, spacing, cfg)
        _, sizes = np.unique(regions[body], return_counts=True)
        # fragments cut by the body mask may be smaller; the bulk obeys min_size
        assert np.median(sizes) * spacing**2 >= 110.0
    at_3mm = compute_regions(img, body, 3.0, cfg).max()
    at_1p5mm = compute_regions(img, body, 1.5, cfg).max()
    assert at_3mm > at_1p5mm  # 110 mm^2 is 12 pixels at 3 mm, 49 at 1.5 mm: smaller regions survive


def test_grid_region_count():
    h, w = 90, 60
    body = np.ones((h, w), bool)
    regions = compute_regions(np.zeros((h, w)), body, 1.5, SuperpixelConfig(method="grid", grid_cell_mm=15.0))
    assert _assert_contiguous(regions, body) == 9 * 6  # 10-pixel cells
    assert (regions[:10, :10] == 1).all() and regions[0, 10] == 2
    body[:, :25] = False  # masking removes the first two columns of cells, splits the third
    masked = compute_regions(np.zeros((h, w)), body, 1.5, SuperpixelConfig(method="grid", grid_cell_mm=15.0))
    assert _assert_contiguous(masked, body) == 9 * 4


def test_constant_tiny_and_empty_inputs():
    body = np.zeros((20, 20), bool)
    body[5:15, 5:15] = True
    assert compute_regions(np.full((20, 20), 0.5), body, 1.5, SuperpixelConfig()).max() == 1
    assert compute_regions(np.full((2, 2), 0.5), np.ones((2, 2), bool), 1.5, SuperpixelConfig()).max() == 1
    empty = compute_regions(np.random.default_rng(0).random((8, 8)), np.zeros((8, 8), bool), 1.5,
                            SuperpixelConfig())
    assert empty.dtype == np.int32 and not empty.any()


@pytest.mark.parametrize("image,body,spacing,match", [
    (np.full((8, 8), np.nan), np.ones((8, 8), bool), 1.5, "NaN"),
    (np.full((8, 8), np.inf), np.ones((8, 8), bool), 1.5, "NaN/inf"),
    (np.zeros((8, 8)), np.ones((8, 9), bool), 1.5, "does not match"),
    (np.zeros((1, 8)), np.ones((1, 8), bool), 1.5, "too small"),
    (np.zeros((2, 8, 8, 2)), np.ones((8, 8), bool), 1.5, r"\(C, H, W\)"),
    (np.zeros((2, 8, 8)), np.ones((8, 9), bool), 1.5, "does not match"),
    (np.full((8, 8), 200.0), np.ones((8, 8), bool), 1.5, r"\[0, 1\]"),
    (np.zeros((8, 8)), np.ones((8, 8), bool), 0.0, "spacing"),
])
def test_bad_input_raises(image, body, spacing, match):
    with pytest.raises(ValueError, match=match):
        compute_regions(image, body, spacing, SuperpixelConfig())


def test_real_chest_ct_regions_at_defaults(chest_ct_dir):
    from lrcseg.data.preprocess import preprocess_volume
    from lrcseg.data.readers import read_image

    pre = preprocess_volume(read_image(chest_ct_dir), PreprocessConfig(spacing_mm=1.5))
    counts = []
    for z in range(4, pre.image.shape[0], 12):
        regions = compute_regions(pre.image[z, 0], pre.body[z], 1.5, SuperpixelConfig())
        counts.append(_assert_contiguous(regions, pre.body[z]))
        # regions follow tissue: against air/lung, soft tissue and bone bands ASA stays high
        bands = np.digitize(pre.image[z, 0], [0.02, 0.98])
        assert achievable_segmentation_accuracy(regions, bands) > 0.9
    assert 50 <= np.median(counts) <= 130, counts  # measured: 73..102, median 86
