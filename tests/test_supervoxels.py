"""Felzenszwalb supervoxels: the 3D graph against the 2D implementation and a plain reference,
6-connected regions, min size, deterministic ids, and organ boundaries on the labelled real CT
(docs/METHOD.md, "Supervoxels (3D)")."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from test_felzenszwalb import phantom_like_slice

from lrcseg.config import PreprocessConfig, SuperpixelConfig
from lrcseg.phantoms.generate import generate_phantom
from lrcseg.superpixels.felzenszwalb import felzenszwalb_3d, felzenszwalb_fast
from lrcseg.superpixels.metrics import achievable_segmentation_accuracy
from lrcseg.superpixels.regions import compute_regions
from lrcseg.superpixels.supervoxels import compute_supervoxels, min_size_voxels, supervoxel_sigma

REAL_CT = Path(os.environ.get("LRCSEG_REAL_CT") or Path(__file__).resolve().parents[1] / ".." / "shared"
               / "data" / "real_abdomen_ct" / "Dataset902_RealAbdomen")


def phantom_volume(seed: int = 0, shape_xyz: tuple[int, int, int] = (48, 40, 10),
                   spacing_mm: tuple[float, float, float] = (4.0, 4.0, 5.0)) -> np.ndarray:
    """A synthetic abdominal CT (:func:`lrcseg.phantoms.generate.generate_phantom`) in the
    soft-tissue window, float16-quantised as in the slice cache: (Z, H, W) float64 in [0, 1]."""
    hu, _ = generate_phantom(np.random.default_rng(seed), shape_xyz, spacing_mm)
    img = np.clip((np.moveaxis(hu, -1, 0) + 175.0) / 425.0, 0.0, 1.0)
    return img.astype(np.float16).astype(np.float64)


def reference_felzenszwalb(volume: np.ndarray, scale: float, min_size: int) -> np.ndarray:
    """Felzenszwalb-Huttenlocher on the 6-connected grid, written plainly (no smoothing; edges
    from numpy slicing, ``np.argsort``, a dict of components): the criterion of
    :mod:`lrcseg.superpixels.felzenszwalb`'s module doc, for small (Z, H, W, C) volumes."""
    shape = volume.shape[:3]
    index = np.arange(np.prod(shape)).reshape(shape)
    ends, weights = [], []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        ends.append(np.stack([index[tuple(lo)].ravel(), index[tuple(hi)].ravel()], axis=1))
        weights.append(np.sqrt(((volume[tuple(hi)] - volume[tuple(lo)]) ** 2).sum(-1)).ravel())
    ends, weights = np.concatenate(ends), np.concatenate(weights)
    order = np.argsort(weights, kind="stable")
    k = scale / 255.0
    parent = list(range(index.size))
    size = [1] * index.size
    internal = [0.0] * index.size

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    def union(ra: int, rb: int, weight: float | None) -> None:
        parent[rb] = ra
        size[ra] += size[rb]
        if weight is not None:
            internal[ra] = weight

    for e in order:
        ra, rb = find(int(ends[e, 0])), find(int(ends[e, 1]))
        threshold = min(np.float32(internal[ra] + k / size[ra]), np.float32(internal[rb] + k / size[rb]))
        if ra != rb and weights[e] < threshold:
            union(ra, rb, float(weights[e]))
    for e in order:
        ra, rb = find(int(ends[e, 0])), find(int(ends[e, 1]))
        if ra != rb and min(size[ra], size[rb]) < min_size:
            union(ra, rb, None)
    roots = np.array([find(p) for p in range(index.size)])
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].reshape(shape)


def _assert_raster_numbering(labels: np.ndarray, start: int) -> None:
    ids, first = np.unique(labels.ravel(), return_index=True)
    np.testing.assert_array_equal(ids, np.arange(start, start + len(ids)))
    assert (np.diff(first) > 0).all()  # id order = order of each region's first voxel


@pytest.mark.parametrize("seed,scale,sigma,min_size", [(0, 100.0, 0.8, 49), (3, 30.0, 0.0, 5),
                                                       (5, 150.0, 1.5, 20)])
def test_one_slice_volume_with_inplane_diagonals_is_exactly_the_2d_segmentation(seed, scale, sigma, min_size):
    img, _ = phantom_like_slice(seed, size=64)
    ours_2d = felzenszwalb_fast(img, scale=scale, sigma=sigma, min_size=min_size)
    # sigma along z is ignored on a one-slice volume: any value gives the same smoothing
    ours_3d = felzenszwalb_3d(img[None], scale=scale, sigma=(2.0, sigma, sigma), min_size=min_size,
                              inplane_diagonals=True)
    assert ours_3d.shape == (1, *img.shape) and ours_3d.dtype == ours_2d.dtype
    np.testing.assert_array_equal(ours_3d[0], ours_2d)
    assert ours_2d.max() > 3  # a real segmentation
    channels = np.random.default_rng(seed).random((1, 23, 31, 2))
    np.testing.assert_array_equal(
        felzenszwalb_3d(channels, scale=40, sigma=0.7, min_size=8, inplane_diagonals=True)[0],
        felzenszwalb_fast(channels[0], scale=40, sigma=0.7, min_size=8))


@pytest.mark.parametrize("shape", [(1, 9, 11, 1), (3, 7, 9, 1), (4, 6, 5, 2)])
def test_6_connected_graph_matches_a_plain_reference(shape):
    rng = np.random.default_rng(sum(shape))
    volume = ndimage.gaussian_filter(rng.random(shape), (1.0, 1.0, 1.0, 0.0))
    volume[:, : shape[1] // 3] = 0.0  # a constant band: zero-weight edges
    for scale, min_size in ((5.0, 1), (20.0, 6), (60.0, 15)):
        ours = felzenszwalb_3d(volume, scale=scale, sigma=0.0, min_size=min_size)
        np.testing.assert_array_equal(ours, reference_felzenszwalb(volume, scale, min_size))


def test_regions_are_6_connected_min_size_holds_and_ids_are_raster_ordered():
    volume = phantom_volume()
    for scale, min_size in ((30.0, 40), (100.0, 10), (10.0, 1)):
        labels = felzenszwalb_3d(volume, scale=scale, sigma=supervoxel_sigma(0.8, (4.0, 4.0, 5.0)), min_size=min_size)
        assert labels.shape == volume.shape and labels.dtype == np.int64
        _assert_raster_numbering(labels, start=0)
        assert labels.max() > 20
        # the min_size rule: at least min_size voxels, unless the whole volume has fewer
        assert np.bincount(labels.ravel()).min() >= min_size
        for r, box in enumerate(ndimage.find_objects(labels + 1)):
            assert ndimage.label(labels[box] == r)[1] == 1, f"region {r} is not 6-connected"
    tiny = felzenszwalb_3d(np.random.default_rng(0).random((2, 3, 3)), scale=1, sigma=0, min_size=50)
    assert (tiny == 0).all()  # 18 voxels < min_size: one region


def test_same_input_gives_the_same_ids():
    volume = phantom_volume(seed=1)
    body = volume > 0.05
    cfg = SuperpixelConfig(scale=30, min_size_mm2=100.0)
    first = compute_supervoxels(volume, body, (4.0, 4.0, 5.0), cfg)
    again = compute_supervoxels(volume.copy(), body.copy(), (4.0, 4.0, 5.0), cfg)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.int32
    assert (first[~body] == 0).all() and (first[body] > 0).all()
    ids, first_voxel = np.unique(first[body], return_index=True)
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert (np.diff(first_voxel) > 0).all()  # numbered 1..R in raster order, as in 2D
    np.testing.assert_array_equal(felzenszwalb_3d(volume, 30, 0.8, 25), felzenszwalb_3d(volume, 30, 0.8, 25))


def test_spacing_sets_sigma_and_min_size_in_mm():
    assert supervoxel_sigma(0.8, (1.5, 1.5, 3.0)) == (0.4, 0.8, 0.8)
    assert min_size_voxels(110.0 * 3.0, (1.5, 1.5, 3.0)) == 49  # the 2D minimum, through one slice
    volume = phantom_volume(seed=2)
    body = np.ones(volume.shape, bool)
    cfg = SuperpixelConfig(scale=30, sigma=0.8, min_size_mm2=100.0)
    regions = compute_supervoxels(volume, body, (4.0, 4.0, 5.0), cfg)
    expected = felzenszwalb_3d(volume, scale=30, sigma=supervoxel_sigma(0.8, (4.0, 4.0, 5.0)),
                               min_size=min_size_voxels(500.0, (4.0, 4.0, 5.0)))
    np.testing.assert_array_equal(regions, expected + 1)
    assert np.bincount(regions.ravel())[1:].min() >= 6  # 100 mm^2 * 5 mm = 500 mm^3 = 6.25 voxels
    coarse = compute_supervoxels(volume, body, (4.0, 4.0, 5.0), cfg, min_size_mm3=4000.0)
    assert np.bincount(coarse.ravel())[1:].min() >= 50 and coarse.max() < regions.max()


def test_windows_as_channels_and_bad_input():
    volume = phantom_volume(seed=4)
    body = np.ones(volume.shape, bool)
    two = np.stack([volume, np.sqrt(volume)], axis=1)  # (Z, C, H, W), the preprocessed layout
    regions = compute_supervoxels(two, body, (4.0, 4.0, 5.0), SuperpixelConfig(scale=30))
    expected = felzenszwalb_3d(np.moveaxis(two, 1, -1), 30, supervoxel_sigma(0.8, (4.0, 4.0, 5.0)),
                               min_size_voxels(550.0, (4.0, 4.0, 5.0)))
    np.testing.assert_array_equal(regions, expected + 1)
    cfg = SuperpixelConfig()
    for image, mask, match in [(volume[0], body[0], r"\(Z, H, W\) or \(Z, C, H, W\)"),
                               (volume, body[:, :-1], "does not match"),
                               (volume[:, :1], body[:, :1], "too small"),
                               (volume * 2, body, r"expected a windowed volume in \[0, 1\]"),
                               (np.where(body, np.nan, volume), body, "NaN")]:
        with pytest.raises(ValueError, match=match):
            compute_supervoxels(image, mask, (4.0, 4.0, 5.0), cfg)
    with pytest.raises(ValueError, match="spacing"):
        compute_supervoxels(volume, body, (4.0, 4.0, 0.0), cfg)
    with pytest.raises(ValueError, match="min_size_mm3"):
        compute_supervoxels(volume, body, (4.0, 4.0, 5.0), cfg, min_size_mm3=-1.0)
    with pytest.raises(ValueError, match="felzenszwalb"):
        compute_supervoxels(volume, body, (4.0, 4.0, 5.0), SuperpixelConfig(method="grid"))
    with pytest.raises(ValueError, match="sigma"):
        felzenszwalb_3d(volume, sigma=(0.5, -1.0, 0.5))
    with pytest.raises(ValueError, match=r"\(Z, H, W\) or \(Z, H, W, C\)"):
        felzenszwalb_3d(volume[0])


def _stack_slices(volume: np.ndarray, body: np.ndarray, spacing_mm: float, cfg: SuperpixelConfig) -> np.ndarray:
    """compute_regions slice by slice, ids made unique across slices: (Z, H, W) int64."""
    out = np.zeros(volume.shape, np.int64)
    offset = 0
    for z in range(len(volume)):
        regions = compute_regions(volume[z], body[z], spacing_mm, cfg)
        out[z] = np.where(regions > 0, regions + offset, 0)
        offset += int(regions.max())
    return out


def test_supervoxels_respect_organs_at_least_as_well_as_stacked_superpixels_on_real_ct():
    """ASA over the whole volume at about the same number of voxels per region: the 2D defaults
    (scale 100, 110 mm^2) against supervoxels at scale 33 and 110 mm^2 x slice thickness, the
    scale that gives about as many regions (numbers in docs/METHOD.md)."""
    if not REAL_CT.is_dir():
        pytest.skip(f"labelled real CT not found at {REAL_CT} (set LRCSEG_REAL_CT to Dataset902_RealAbdomen)")
    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.preprocess import preprocess_volume
    from lrcseg.data.readers import read_image, read_label

    case = load_dataset(REAL_CT).cases[0]
    image = read_image(case.image)
    pre = preprocess_volume(image, PreprocessConfig(), read_label(case.label, image))
    volume = pre.image[:, 0].astype(np.float16).astype(np.float32)  # as the slice cache stores it
    body, labels = pre.body, pre.label.astype(np.int64)
    cfg = SuperpixelConfig()
    stacked = _stack_slices(volume, body, pre.spacing_mm[0], cfg)
    supervoxels = compute_supervoxels(volume, body, pre.spacing_mm, dataclasses.replace(cfg, scale=33.0))

    def asa(regions: np.ndarray) -> float:  # the 2D function over all voxels: slices side by side
        return achievable_segmentation_accuracy(regions.reshape(-1, regions.shape[-1]),
                                                labels.reshape(-1, labels.shape[-1]))

    voxels_2d, voxels_3d = body.sum() / stacked.max(), body.sum() / supervoxels.max()
    report = (f"stacked 2D: {stacked.max()} regions, {voxels_2d:.0f} voxels/region, ASA {asa(stacked):.4f}; "
              f"3D: {supervoxels.max()} regions, {voxels_3d:.0f} voxels/region, ASA {asa(supervoxels):.4f}")
    assert 0.9 < voxels_3d / voxels_2d < 1.1, report
    assert asa(supervoxels) >= asa(stacked), report
