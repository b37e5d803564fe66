"""Our numba Felzenszwalb against skimage's (the reference) on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from lrcseg.config import PreprocessConfig
from lrcseg.phantoms.generate import TISSUES, generate_phantom
from lrcseg.superpixels.felzenszwalb import adjusted_rand_index, felzenszwalb_fast


def phantom_like_slice(seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """An axial slice of a real phantom (:func:`lrcseg.phantoms.generate.generate_phantom`) in the
    soft-tissue window -175..250 HU, float16-quantised as in the slice cache.

    The phantom is drawn on a (size, size, 4) grid of 400 / size mm pixels and 30 mm slices
    (dome down to ~90 mm below it); the slice is one of the two lower ones (liver, stomach,
    spleen, kidneys). Returns (image (size, size) float64 in [0, 1], body (size, size) bool).
    """
    spacing = 400.0 / size
    hu, _, tissue = generate_phantom(np.random.default_rng(seed), (size, size, 4), (spacing, spacing, 30.0),
                                     return_tissues=True)
    z = seed % 2
    body = ndimage.binary_fill_holes(tissue[:, :, z] != TISSUES["air"])
    img = np.clip((hu[:, :, z] + 175.0) / 425.0, 0.0, 1.0)
    return img.astype(np.float16).astype(np.float64), body


@pytest.mark.parametrize("shape,scale,sigma,min_size", [
    ((40, 40), 100.0, 0.8, 20), ((37, 53), 30.0, 0.0, 5), ((64, 48), 400.0, 1.5, 50),
    ((1, 30), 10.0, 0.5, 3), ((2, 2), 1.0, 0.8, 1),
])
def test_matches_skimage_exactly_on_smooth_random_images(shape, scale, sigma, min_size):
    rng = np.random.default_rng(sum(shape))
    img = ndimage.gaussian_filter(rng.random(shape), 2.0)
    img[: shape[0] // 4] = 0.0  # a constant (air-like) band: many zero-weight edges
    ours = felzenszwalb_fast(img, scale=scale, sigma=sigma, min_size=min_size)
    ref = felzenszwalb(img, scale=scale, sigma=sigma, min_size=min_size)
    np.testing.assert_array_equal(ours, ref)  # same partition and same numbering


def test_agrees_on_phantom_like_slices():
    aris, exact = [], 0
    for seed in range(8):
        img, body = phantom_like_slice(seed)
        ours = felzenszwalb_fast(img, scale=100, sigma=0.8, min_size=49)
        ref = felzenszwalb(img, scale=100, sigma=0.8, min_size=49)
        aris.append(adjusted_rand_index(ours[body], ref[body]))
        exact += int(np.array_equal(ours, ref))
    assert min(aris) >= 0.98, aris
    assert exact >= 6  # differences need exact ties of non-zero edge weights


def test_agrees_on_real_chest_ct(chest_ct_dir):
    from lrcseg.data.preprocess import preprocess_volume
    from lrcseg.data.readers import read_image

    pre = preprocess_volume(read_image(chest_ct_dir), PreprocessConfig(spacing_mm=3.0))
    for z in (10, 32, 50):
        img = pre.image[z, 0].astype(np.float16).astype(np.float64)
        body = pre.body[z]
        ours = felzenszwalb_fast(img, scale=100, sigma=0.8, min_size=12)
        ref = felzenszwalb(img, scale=100, sigma=0.8, min_size=12)
        assert adjusted_rand_index(ours[body], ref[body]) >= 0.98


def test_constant_image_is_one_region_and_bad_arguments_raise():
    assert felzenszwalb_fast(np.full((20, 30), 0.3), scale=5).max() == 0
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, C\)"):
        felzenszwalb_fast(np.zeros((4, 4, 3, 2)))
    with pytest.raises(ValueError, match="empty"):
        felzenszwalb_fast(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="scale"):
        felzenszwalb_fast(np.zeros((4, 4)), scale=0)


def test_adjusted_rand_index_known_values():
    a = np.array([0, 0, 1, 1])
    assert adjusted_rand_index(a, np.array([5, 5, 7, 7])) == 1.0  # relabelled: identical
    assert adjusted_rand_index(a, np.array([0, 1, 0, 1])) == pytest.approx(-0.5)
    # Hand-computed: n_ij -> sum C = 1, sum C(a) = 2, sum C(b) = 3, E = 1, top = 2.5
    assert adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx(0.0)


@pytest.mark.parametrize("channels", [2, 3])
def test_multichannel_matches_skimage_channel_axis(channels):
    img = np.random.default_rng(channels).random((37, 45, channels))
    ours = felzenszwalb_fast(img, scale=40, sigma=0.7, min_size=8)
    ref = felzenszwalb(img, scale=40, sigma=0.7, min_size=8, channel_axis=-1)
    assert np.array_equal(ours, ref)
    assert ours.max() > 10  # a real segmentation, not one region
