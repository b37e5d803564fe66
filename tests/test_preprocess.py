"""Preprocessing: resampled sizes, interpolation, windows, body mask, 2.5D stacking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lrcseg.config import PreprocessConfig
from lrcseg.data.preprocess import (
    apply_windows,
    body_mask,
    preprocess_volume,
    resample_inplane,
    resampled_size,
    stack_context,
)
from lrcseg.data.readers import Volume


def _volume(array: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    return Volume(array.astype(np.float32), np.diag([*spacing, 1.0]), Path("mem.nii.gz"))


def test_resampled_size_anisotropic_non_square():
    assert resampled_size((100, 60), (0.75, 1.2), 1.5) == (50, 48)
    assert resampled_size((512, 512), (0.841796875, 0.841796875), 1.5) == (287, 287)


def test_linear_resampling_keeps_a_ramp():
    # hu = 10 * i along x; new pixel centre i' sits at old index (i' + 0.5) * s / sx - 0.5.
    x = np.arange(40, dtype=np.float32)[:, None, None] * 10.0
    vol = np.broadcast_to(x, (40, 30, 3)).copy()
    out = resample_inplane(vol, (1.0, 1.0), 0.5)  # upsampling: (Z, 80, 60)
    assert out.shape == (3, 80, 60)
    i = np.arange(80)
    expected = 10.0 * ((i + 0.5) * 0.5 - 0.5)
    np.testing.assert_allclose(out[1, 2:-2, 7], expected[2:-2], atol=1e-3)
    down = resample_inplane(vol, (1.0, 1.0), 2.0)  # shrinking, antialiased: (Z, 20, 15)
    j = np.arange(20)
    np.testing.assert_allclose(down[0, 2:-2, 5], (10.0 * ((j + 0.5) * 2.0 - 0.5))[2:-2], atol=1e-3)


def test_nearest_resampling_of_labels():
    lab = np.zeros((40, 30, 2), np.int16)
    lab[20:40, :, :] = 3
    lab[:, 0:6, 1] = 5
    out = resample_inplane(lab, (0.75, 1.0), 1.5, mode="nearest")
    assert out.dtype == np.int16 and out.shape == (2, 20, 20)
    assert set(np.unique(out)) == {0, 3, 5}
    assert (out[0, 10:, :] == 3).all() and (out[0, :10, :] == 0).all()
    assert (out[1, :10, :4] == 5).all() and (out[1, :10, 4:] == 0).all()


def test_windows_map_hu_to_unit_interval():
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 1000.0], np.float32)
    out = apply_windows(hu, [(-175.0, 250.0), (-1000.0, 1000.0)])
    np.testing.assert_allclose(out[0], [0, 0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(out[1], [0, 0.4125, 0.51875, 0.625, 1], atol=1e-6)
    assert out.dtype == np.float32


def _torso_slice(bridge: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Air, an elliptic body (40 HU) with a lung (-800 HU) inside, a couch below it."""
    h, w = 120, 100
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - 55) / 40.0) ** 2 + ((xx - 50) / 35.0) ** 2 <= 1
    lung = ((yy - 50) / 12.0) ** 2 + ((xx - 40) / 8.0) ** 2 <= 1
    couch = (yy >= 100) & (yy < 106) & (xx >= 10) & (xx < 90)
    hu = np.full((h, w), -1000.0, np.float32)
    hu[body] = 40.0
    hu[lung] = -800.0
    hu[couch] = 100.0
    hu[3:5, 3:5] = 200.0  # a speck of noise in the air
    if bridge:
        hu[94:100, 50] = 100.0  # a one-pixel strap from the body to the couch
    return hu, body, lung, couch


@pytest.mark.parametrize("bridge", [False, True])
def test_body_mask_excludes_air_and_couch_keeps_lungs(bridge):
    hu, body, lung, couch = _torso_slice(bridge)
    mask = body_mask(hu, -500.0, 1.0)
    assert not mask[couch].any()
    assert mask[lung].all()
    assert not mask[3:5, 3:5].any()
    iou = (mask & body).sum() / (mask | body).sum()
    assert iou > 0.97


def test_body_mask_of_air_is_empty():
    assert not body_mask(np.full((20, 20), -1000.0, np.float32), -500.0, 1.0).any()


def test_preprocess_volume_shapes_and_values():
    hu = np.full((60, 40, 5), -1000.0, np.float32)
    hu[10:50, 8:32, :] = 37.5
    lab = np.zeros(hu.shape, np.int16)
    lab[20:30, 10:20, 2] = 4
    cfg = PreprocessConfig(spacing_mm=1.5, extra_windows_hu=[(-1000.0, 1000.0)])
    pre = preprocess_volume(_volume(hu, (0.75, 1.5, 3.0)), cfg, _volume(lab, (0.75, 1.5, 3.0)))
    assert pre.image.shape == (5, 2, 30, 40) and pre.image.dtype == np.float32
    assert pre.body.shape == (5, 30, 40) and pre.body.dtype == bool
    assert pre.label.shape == (5, 30, 40) and pre.label.dtype == np.int16
    assert pre.spacing_mm == (1.5, 1.5, 3.0) and pre.original_shape == (60, 40, 5)
    assert pre.image.min() >= 0 and pre.image.max() <= 1
    assert pre.image[2, 0, 15, 20] == pytest.approx(0.5, abs=1e-5)
    assert pre.image[2, 0, 0, 0] == 0.0
    assert pre.body[2, 15, 20] and not pre.body[2, 0, 0]
    assert pre.body[2].sum() == pytest.approx(20 * 24, rel=0.1)
    assert (pre.label[2] == 4).sum() == 5 * 10


def test_stack_context_clamps_at_edges():
    image = np.zeros((5, 2, 3, 3), np.float32)
    for z in range(5):
        image[z, 0], image[z, 1] = z, 10 + z
    out = stack_context(image, 0, 3)
    assert out.shape == (6, 3, 3)
    assert list(out[:, 0, 0]) == [0, 10, 0, 10, 1, 11]
    assert list(stack_context(image, 4, 3)[:, 1, 1]) == [3, 13, 4, 14, 4, 14]
    assert list(stack_context(image, 2, 5)[::2, 0, 0]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(stack_context(image, 3, 1), image[3])
    with pytest.raises(ValueError, match="odd"):
        stack_context(image, 0, 2)


def test_real_chest_ct_preprocessed(chest_ct_dir):
    from lrcseg.data.readers import read_image

    pre = preprocess_volume(read_image(chest_ct_dir), PreprocessConfig(spacing_mm=1.5))
    assert pre.image.shape == (64, 1, 287, 287)
    body_share = pre.body.mean()
    assert 0.2 < body_share < 0.6  # a chest fills part of the 43 cm field of view
    assert pre.image[:, 0][~pre.body].mean() < 0.05  # outside the body: air, couch


def test_slice_spacing_resamples_z_and_only_then_changes_the_cache_key():
    import numpy as np

    from lrcseg.config import PreprocessConfig
    from lrcseg.data.preprocess import preprocess_volume, resample_slices
    from lrcseg.data.readers import Volume

    ramp = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((1, 3, 4), np.float32)
    up = resample_slices(ramp, 4.0, 2.0)  # 6 slices of 4 mm -> 12 of 2 mm
    assert up.shape == (12, 3, 4)
    np.testing.assert_allclose(up[1:-1, 0, 0], np.arange(10) * 0.5 + 0.25)  # centres aligned
    labels = (np.arange(6)[:, None, None] * np.ones((1, 3, 4))).astype(np.int16)
    down = resample_slices(labels, 2.0, 4.0, "nearest")
    assert down.dtype == np.int16 and sorted(set(down[:, 0, 0])) == [1, 3, 5]  # ids kept
    assert PreprocessConfig(slice_spacing_mm=None).key() == PreprocessConfig().key()
    assert PreprocessConfig(slice_spacing_mm=2.0).key() != PreprocessConfig().key()
    hu = np.full((20, 20, 6), -1000.0, np.float32)
    hu[5:15, 5:15] = 50.0
    lab = np.zeros((20, 20, 6), np.int16)
    lab[8:12, 8:12, 2:4] = 1
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    out = preprocess_volume(Volume(hu, affine, Path("mem.nii.gz")),
                            PreprocessConfig(spacing_mm=3.0, slice_spacing_mm=2.5),
                            Volume(lab, affine, Path("lab.nii.gz")))
    assert out.image.shape[0] == 12 and out.label.shape[0] == 12 and out.body.shape[0] == 12
    assert out.spacing_mm == (3.0, 3.0, 2.5)
    assert int(out.label.sum()) == 2 * int(lab.sum())  # twice the slices, same area per slice
