"""SliceCache: memory-mapped, reused, keyed by settings and source files, race-safe."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import lrcseg.data.slice_cache as cache_mod
from lrcseg.config import PreprocessConfig
from lrcseg.data.layouts import Case
from lrcseg.data.preprocess import preprocess_volume
from lrcseg.data.readers import read_image, read_label, write_nifti
from lrcseg.data.slice_cache import SliceCache

AFFINE = np.diag([0.75, 0.75, 2.0, 1.0])


def _case(folder: Path, seed: int = 0, name: str = "c1") -> Case:
    rng = np.random.default_rng(seed)
    hu = np.full((40, 36, 4), -1000.0, np.float32)
    hu[6:34, 6:30] = rng.normal(40, 30, size=(28, 24, 4))
    lab = np.zeros(hu.shape, np.uint8)
    lab[10:20, 10:20, 1:3] = 2
    write_nifti(folder / f"{name}.nii.gz", hu, AFFINE)
    write_nifti(folder / f"{name}_seg.nii.gz", lab, AFFINE)
    return Case(name, folder / f"{name}.nii.gz", folder / f"{name}_seg.nii.gz")


def _data(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def test_cache_matches_preprocessing_and_is_memmapped(tmp_path):
    case = _case(_data(tmp_path))
    cfg = PreprocessConfig(spacing_mm=1.5)
    cached = SliceCache(cfg).get(case)
    image = read_image(case.image)
    ref = preprocess_volume(image, cfg, read_label(case.label, image))
    assert isinstance(cached.image, np.memmap) and cached.image.dtype == np.float16
    assert isinstance(cached.body, np.memmap) and isinstance(cached.label, np.memmap)
    assert cached.image.shape == (4, 1, 20, 18)
    np.testing.assert_allclose(cached.image, ref.image, atol=1e-3)
    np.testing.assert_array_equal(cached.body, ref.body)
    np.testing.assert_array_equal(cached.label, ref.label)
    assert cached.spacing_mm == (1.5, 1.5, 2.0) and cached.original_shape == (40, 36, 4)
    np.testing.assert_allclose(cached.affine, AFFINE)
    root = Path(os.environ["LRCSEG_CACHE"])
    assert cached.dir.parent == root / "slices" / cfg.key()
    assert cached.dir.name.startswith("c1-") and cached.case_id == "c1"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["c1.nii.gz", "c1_seg.nii.gz"]


def test_cache_is_reused_without_rereading(tmp_path, monkeypatch):
    case = _case(_data(tmp_path))
    cfg = PreprocessConfig()
    first = SliceCache(cfg).get(case)
    meta_mtime = (first.dir / "meta.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("volume re-read although cached")

    monkeypatch.setattr(cache_mod, "read_image", fail)
    second = SliceCache(cfg).get(case)
    assert second.dir == first.dir
    assert (second.dir / "meta.json").stat().st_mtime_ns == meta_mtime
    np.testing.assert_array_equal(second.image, first.image)


def test_cache_rebuilt_when_settings_or_file_change(tmp_path):
    data = _data(tmp_path)
    case = _case(data)
    a = SliceCache(PreprocessConfig(window_hu=(-175.0, 250.0))).get(case)
    b = SliceCache(PreprocessConfig(window_hu=(-1000.0, 1000.0))).get(case)
    assert a.dir.parent != b.dir.parent
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))
    # the source changes: a new entry with the new content
    old = np.asarray(a.image).copy()
    _case(data, seed=1)
    os.utime(case.image, ns=(10**18, 10**18))
    c = SliceCache(PreprocessConfig(window_hu=(-175.0, 250.0))).get(case)
    assert c.dir != a.dir and c.dir.parent == a.dir.parent
    assert not np.array_equal(np.asarray(c.image), old)


def test_losing_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
    case = _case(_data(tmp_path))
    cfg = PreprocessConfig()
    real_atomic_dir = cache_mod.atomic_dir
    raced = []

    @contextmanager
    def racing_dir(target):
        with real_atomic_dir(target) as tmp:
            yield tmp
            if not raced:  # our copy is complete; another process renames its copy first
                raced.append(tmp)
                SliceCache(cfg).get(case)

    monkeypatch.setattr(cache_mod, "atomic_dir", racing_dir)
    got = SliceCache(cfg).get(case)
    assert raced, "the race was not exercised"
    assert not raced[0].exists(), "the losing copy was not discarded"
    assert list(got.dir.parent.iterdir()) == [got.dir]
    assert got.image.shape == (4, 1, 20, 18)
    np.testing.assert_array_equal(np.asarray(got.label)[1:3].max(), 2)


def test_case_built_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    case = _case(_data(tmp_path))
    cfg = PreprocessConfig()
    real = cache_mod.preprocess_volume
    calls = []

    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # another process finishes the case while we compute
            SliceCache(cfg).get(case)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "preprocess_volume", slow)
    got = SliceCache(cfg).get(case)
    assert len(calls) == 2 and list(got.dir.parent.iterdir()) == [got.dir]


def test_failed_build_leaves_nothing(tmp_path):
    data = _data(tmp_path)
    case = _case(data)
    write_nifti(case.label, np.zeros((40, 36, 5), np.uint8), AFFINE)  # wrong grid
    cache = SliceCache(PreprocessConfig())
    with pytest.raises(Exception, match="does not match image shape"):
        cache.get(case)
    assert not cache.dir.exists() or not any(cache.dir.iterdir())


def test_build_all_with_read_only_data(tmp_path):
    data = _data(tmp_path)
    cases = [_case(data, seed=i, name=f"c{i}") for i in range(3)]
    data.chmod(0o555)
    try:
        vols = SliceCache(PreprocessConfig(), root=tmp_path / "elsewhere").build_all(cases, progress=True)
    finally:
        data.chmod(0o755)
    assert [v.case_id for v in vols] == ["c0", "c1", "c2"]
    assert all(v.dir.is_relative_to(tmp_path / "elsewhere" / "slices") for v in vols)


def test_dicom_case_cached(tmp_path):
    from dicom_fixtures import write_dicom_series

    stored = np.full((4, 32, 32), 1024, np.uint16)
    write_dicom_series(tmp_path / "series", stored, pixel_spacing=(0.75, 0.75), step=3.0)
    cached = SliceCache(PreprocessConfig()).get(Case("s", tmp_path / "series"))
    assert cached.image.shape == (4, 1, 16, 16) and cached.label is None
    assert cached.spacing_mm == (1.5, 1.5, 3.0)
    np.testing.assert_allclose(np.asarray(cached.image, np.float32), 175 / 425, atol=1e-3)
