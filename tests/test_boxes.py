"""3D pre-training boxes: the grid, padding, and what an item holds (data/boxes.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from lrcseg.data.boxes import PretrainBoxes, box_starts, crop_padded


@dataclass
class _Volume:
    image: np.ndarray  # (Z, W_n, H, W)
    body: np.ndarray  # (Z, H, W)
    label: np.ndarray | None = None


def _volume(shape=(10, 20, 24), seed=0, label=True) -> tuple[_Volume, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, h, w = shape
    image = rng.random((z, 1, h, w)).astype(np.float32)
    body = np.zeros(shape, dtype=bool)
    body[:, 2:-2, 3:-3] = True
    regions = (np.arange(z * h * w, dtype=np.int32).reshape(shape) // 7 + 1) * body
    lab = (rng.integers(0, 4, shape).astype(np.int16) if label else None)
    return _Volume(image, body, lab), regions.astype(np.int32)


def test_box_starts_cover_the_axis_and_centre_a_short_one():
    assert box_starts(10, 4, 2) == [0, 2, 4, 6]
    assert box_starts(11, 4, 2) == [0, 2, 4, 6, 7]  # the last box flush with the end
    assert box_starts(3, 8, 4) == [-2]  # shorter than the box: one box, centred
    for length, box, stride in ((37, 8, 4), (64, 16, 8), (5, 5, 1)):
        starts = box_starts(length, box, stride)
        covered = np.zeros(length, dtype=bool)
        for s in starts:
            covered[max(s, 0):s + box] = True
        assert covered.all() and starts[-1] + box == max(length, box) + min(starts[0], 0)
    with pytest.raises(ValueError):
        box_starts(10, 0, 1)


def test_crop_padded_copies_inside_and_fills_outside():
    a = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6)
    out = crop_padded(a, (-1, 2, 3), (3, 4, 4), -7)
    assert out.shape == (2, 3, 4, 4)
    assert np.all(out[:, 0] == -7)  # z = -1 is outside
    assert np.array_equal(out[:, 1:, :3, :3], a[:, 0:2, 2:5, 3:6])
    assert np.all(out[:, :, 3:] == -7) and np.all(out[:, :, :, 3:] == -7)


def test_items_are_the_volume_at_the_box_and_ids_correspond():
    vol, regions = _volume()
    ds = PretrainBoxes([vol], [regions], box=(4, 8, 8), with_organs=True)
    assert len(ds) > 0 and ds.max_region_id == int(regions.max())
    for i in range(len(ds)):
        v, (z0, y0, x0) = ds.index[i]
        item = ds[i]
        assert item["image"].shape == (1, 4, 8, 8) and item["image"].dtype.is_floating_point
        assert item["regions"].shape == (4, 8, 8) and item["organs"].shape == (4, 8, 8)
        inside = (slice(max(z0, 0), z0 + 4), slice(max(y0, 0), y0 + 8), slice(max(x0, 0), x0 + 8))
        got = item["regions"].numpy()[: inside[0].stop - inside[0].start,
                                      : inside[1].stop - inside[1].start,
                                      : inside[2].stop - inside[2].start]
        if z0 >= 0 and y0 >= 0 and x0 >= 0:
            assert np.array_equal(got, regions[inside])
            np.testing.assert_allclose(item["image"].numpy()[0], vol.image[inside[0], 0, inside[1],
                                       inside[2]], atol=1e-3)  # float16
            assert np.array_equal(item["organs"].numpy(), vol.label[inside])
        assert 0.0 <= float(item["position"]) <= 1.0


def test_boxes_without_enough_body_are_left_out_and_unlabelled_volumes_give_minus_one():
    vol, regions = _volume(label=False)
    vol.body[:, :, :12] = False
    regions = regions * vol.body
    every = PretrainBoxes([vol], [regions], box=(4, 8, 8), min_body_fraction=0.0, with_organs=True)
    some = PretrainBoxes([vol], [regions], box=(4, 8, 8), min_body_fraction=0.5, with_organs=True)
    assert 0 < len(some) < len(every)
    assert all(int((some[i]["regions"] > 0).sum()) >= 0.5 * 4 * 8 * 8 * 0.5 for i in range(len(some)))
    assert int(some[0]["organs"].min()) == -1 == int(some[0]["organs"].max())


def test_a_volume_smaller_than_the_box_is_padded_and_checks_are_clear():
    vol, regions = _volume(shape=(3, 20, 24))
    ds = PretrainBoxes([vol], [regions], box=(8, 16, 16))
    item = ds[0]
    assert item["image"].shape == (1, 8, 16, 16)
    assert int((item["regions"] > 0).any(dim=(1, 2)).sum()) == 3  # three real slices of eight
    with pytest.raises(ValueError, match="supervoxel maps"):
        PretrainBoxes([vol], [], box=(4, 4, 4))
    with pytest.raises(ValueError, match="supervoxels"):
        PretrainBoxes([vol], [regions[:2]], box=(4, 4, 4))
    with pytest.raises(ValueError, match="Illegal box"):
        PretrainBoxes([vol], [regions], box=(4, 4))
