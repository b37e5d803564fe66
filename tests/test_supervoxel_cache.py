"""SupervoxelCache: a per-volume supervoxel map beside the slice cache, reused while nothing that
changes it changed, checked against its record, rebuilt with one warning when damaged, written
atomically under the umask, safe for concurrent writers. Fixtures are real NIfTI files."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import lrcseg.superpixels.cache_files as cache_files_mod
import lrcseg.superpixels.supervoxel_cache as cache_mod
from lrcseg.config import PreprocessConfig, SuperpixelConfig
from lrcseg.data.layouts import Case
from lrcseg.data.readers import write_nifti
from lrcseg.data.slice_cache import SliceCache
from lrcseg.errors import DataWarning
from lrcseg.superpixels.region_cache import record_path
from lrcseg.superpixels.supervoxel_cache import SUPERVOXEL_FORMAT, SupervoxelCache
from lrcseg.superpixels.supervoxels import compute_supervoxels

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
SUPERVOXELS = SuperpixelConfig(scale=33.0, min_size_mm2=20.0)


def ct_case(folder: Path, name: str, seed: int, z: int = 6) -> Case:
    """A small NIfTI CT (48 x 40 x z at 1.5 x 1.5 x 3 mm): air around a body of 6-voxel tissue
    blocks (-100..200 HU, two blocks deep along z) plus noise."""
    rng = np.random.default_rng(seed)
    hu = np.full((48, 40, z), -1000.0, np.float32)
    blocks = rng.choice([-100.0, 0.0, 60.0, 200.0], size=(6, 5, -(-z // 2)))
    tissue = np.repeat(np.repeat(np.repeat(blocks, 6, axis=0), 6, axis=1), 2, axis=2)[:36, :28, :z]
    hu[6:42, 6:34] = ndimage.gaussian_filter(tissue + rng.normal(0, 5, tissue.shape), (0.7, 0.7, 0.3))
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / f"{name}.nii.gz", hu, AFFINE)
    return Case(name, folder / f"{name}.nii.gz")


@pytest.fixture
def counted(monkeypatch) -> list[tuple]:
    """Every compute_supervoxels call the cache makes (shape of the image), calls passed on."""
    calls = []

    def count(image, *args, **kwargs):
        calls.append(np.shape(image))
        return compute_supervoxels(image, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "compute_supervoxels", count)
    return calls


def single_warning(caught, path: Path) -> str:
    messages = [w.message for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 1, [str(m) for m in messages]
    assert messages[0].path == str(path)
    return str(messages[0])


def flip_byte(path: Path, fraction: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(fraction * len(data))] ^= 0xFF
    path.write_bytes(bytes(data))


def test_get_matches_compute_supervoxels_and_a_hit_does_not_recompute(tmp_path, counted):
    case = ct_case(tmp_path / "data", "c1", seed=0)
    slices = SliceCache(PreprocessConfig())
    cache = SupervoxelCache(slices, SUPERVOXELS)
    regions = cache.get(case)
    vol = slices.get(case)
    expected = compute_supervoxels(np.asarray(vol.image[:, 0], np.float32), vol.body,
                                   vol.spacing_mm, SUPERVOXELS)
    assert isinstance(regions, np.memmap) and regions.dtype == np.uint16
    assert regions.shape == (6, 48, 40)
    np.testing.assert_array_equal(regions, expected)
    assert regions.max() > 10 and (regions[~np.asarray(vol.body)] == 0).all()
    assert counted == [(6, 48, 40)] and cache.computed_volumes == 1
    path = cache.path(vol)
    assert path.parent == vol.dir and path.name == f"supervoxels-{cache.key}.npy"
    mtime = path.stat().st_mtime_ns

    for again in (cache, SupervoxelCache(SliceCache(PreprocessConfig()),
                                         SuperpixelConfig(scale=33.0, min_size_mm2=20.0,
                                                          implementation="skimage"))):
        np.testing.assert_array_equal(again.get(case), expected)  # same key: read, not computed
    assert len(counted) == 1 and path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("change", ["scale", "sigma", "min_size_mm3", "window", "spacing",
                                    "source"])
def test_a_changed_setting_or_source_misses(tmp_path, counted, change):
    case = ct_case(tmp_path / "data", "c1", seed=1)
    first = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
    reference = np.asarray(first.get(case)).copy()
    first_path = first.path(first.slice_cache.get(case))
    pre, cfg, min_size = PreprocessConfig(), SUPERVOXELS, None
    if change == "scale":
        cfg = SuperpixelConfig(scale=200.0, min_size_mm2=20.0)
    elif change == "sigma":
        cfg = SuperpixelConfig(scale=33.0, sigma=0.0, min_size_mm2=20.0)
    elif change == "min_size_mm3":
        min_size = 400.0
    elif change == "window":
        pre = PreprocessConfig(window_hu=(-100.0, 150.0))
    elif change == "spacing":
        pre = PreprocessConfig(spacing_mm=3.0)
    else:  # the same file name, other content: the slice cache entry is keyed by size and mtime
        case = ct_case(tmp_path / "data", "c1", seed=2)
    other = SupervoxelCache(SliceCache(pre), cfg, min_size_mm3=min_size)
    got = np.asarray(other.get(case))
    assert len(counted) == 2 and other.computed_volumes == 1
    assert other.path(other.slice_cache.get(case)) != first_path
    assert got.shape != reference.shape or not np.array_equal(got, reference)
    first.get(case)  # its own map still there (for the new source: the one just computed)
    assert len(counted) == 2


def test_windows_as_channels_are_the_felzenszwalb_input(tmp_path):
    """cfg.windows_hu the slice cache lacks come from a window cache, as for the 2D regions."""
    case = ct_case(tmp_path / "data", "c1", seed=9)
    cfg = SuperpixelConfig(scale=33.0, min_size_mm2=20.0, windows_hu=[(-175, 250), (-150, 0)])
    got = SupervoxelCache(SliceCache(PreprocessConfig()), cfg).get(case)
    two = SliceCache(PreprocessConfig(extra_windows_hu=[(-150, 0)])).get(case)
    expected = compute_supervoxels(np.asarray(two.image, np.float32), two.body, two.spacing_mm, cfg)
    np.testing.assert_array_equal(got, expected)
    one = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS).get(case)
    assert not np.array_equal(got, one)  # the second window splits what the first shows flat


def test_the_key_names_the_format_and_every_setting():
    base = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
    keys = {base.key,
            SupervoxelCache(base.slice_cache, SUPERVOXELS, min_size_mm3=60.0).key,
            SupervoxelCache(base.slice_cache, SuperpixelConfig(scale=34.0, min_size_mm2=20.0)).key,
            SupervoxelCache(base.slice_cache, SuperpixelConfig(
                scale=33.0, min_size_mm2=20.0, windows_hu=[(-175, 250), (-1350, 150)])).key}
    assert len(keys) == 4
    assert SUPERVOXEL_FORMAT == 1
    with pytest.raises(ValueError, match="felzenszwalb"):
        SupervoxelCache(base.slice_cache, SuperpixelConfig(method="grid"))
    with pytest.raises(ValueError, match="min_size_mm3"):
        SupervoxelCache(base.slice_cache, SUPERVOXELS, min_size_mm3=-1.0)


def _other_settings(path: Path) -> None:
    """The map and record of a coarser setting of the same case, renamed into place."""
    coarse = next(p for p in path.parent.glob("supervoxels-*.npy") if p != path)
    shutil.copyfile(coarse, path)
    shutil.copyfile(record_path(coarse), record_path(path))


DAMAGE = [  # (the file the warning names, what it says, the damage)
    ("npy", "SHA-256", lambda p: flip_byte(p, 0.6)),
    ("npy", "truncated", lambda p: p.write_bytes(p.read_bytes()[:-100])),
    ("record", "missing", lambda p: record_path(p).unlink()),
    ("record", "not readable JSON", lambda p: flip_byte(record_path(p), 0.0)),
    ("record", "other supervoxel settings", _other_settings),
]


@pytest.mark.parametrize(("named", "reason", "damage"), DAMAGE,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(DAMAGE)])
def test_a_damaged_entry_is_rebuilt_with_one_warning_naming_the_file(tmp_path, counted, named,
                                                                      reason, damage):
    case = ct_case(tmp_path / "data", "c1", seed=3)
    reference = np.asarray(SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS).get(case)).copy()
    SupervoxelCache(SliceCache(PreprocessConfig()),
                    SuperpixelConfig(scale=300.0, min_size_mm2=20.0)).get(case)
    cache = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
    path = cache.path(cache.slice_cache.get(case))
    damage(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = np.asarray(cache.get(case))
    text = single_warning(caught, path if named == "npy" else record_path(path))
    assert "damaged supervoxel cache file" in text and reason in text and "recomputing" in text
    np.testing.assert_array_equal(got, reference)
    assert cache.computed_volumes == 1 and len(counted) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt once, then reused without a warning
        again = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
        np.testing.assert_array_equal(again.get(case), reference)
    assert again.computed_volumes == 0


def test_the_sha256_is_checked_once_per_object_and_again_when_the_file_changes(tmp_path,
                                                                                 monkeypatch):
    case = ct_case(tmp_path / "data", "c1", seed=4)
    cache = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
    cache.get(case)
    path = cache.path(cache.slice_cache.get(case))
    hashed = []
    import lrcseg.data.slice_cache as slice_cache_mod

    real = slice_cache_mod.file_sha256
    monkeypatch.setattr(slice_cache_mod, "file_sha256", lambda p: hashed.append(Path(p)) or real(p))
    for _ in range(3):
        cache.get(case)
    assert path not in hashed  # checked when this object wrote it
    fresh = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
    fresh.get(case)
    fresh.get(case)
    assert hashed.count(path) == 1
    flip_byte(path, 0.7)  # a change after the check: the file's mtime moves, it is checked again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.get(case)
    single_warning(caught, path)


def test_an_interrupted_write_leaves_no_visible_entry(tmp_path, monkeypatch):
    case = ct_case(tmp_path / "data", "c1", seed=5)
    cache = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
    folder = cache.slice_cache.get(case).dir
    before = sorted(p.name for p in folder.iterdir())

    def interrupted(path):  # the map is fully written to its temporary name by now
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cache_files_mod, "file_record", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cache.get(case)
    assert sorted(p.name for p in folder.iterdir()) == before  # no map, no temporary file
    regions = cache.get(case)
    assert cache.computed_volumes == 2 and regions.max() > 10
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*before, f"supervoxels-{cache.key}.npy", f"supervoxels-{cache.key}.json"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_follow_the_umask(tmp_path, umask):
    case = ct_case(tmp_path / "data", "c1", seed=6)
    previous = os.umask(umask)
    try:
        cache = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
        path = cache.path(cache.slice_cache.get(case))
        cache.get(case)
    finally:
        os.umask(previous)
    for written in (path, record_path(path)):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written.name


def test_concurrent_writers_both_get_the_complete_map(tmp_path, monkeypatch):
    """Two caches compute the same case at once (a barrier holds both until both have
    computed): both renames land, both readers get the map, nothing temporary is left."""
    case = ct_case(tmp_path / "data", "c1", seed=7)
    SliceCache(PreprocessConfig()).get(case)
    barrier = threading.Barrier(2, timeout=60)

    def together(*args, **kwargs):
        regions = compute_supervoxels(*args, **kwargs)
        barrier.wait()
        return regions

    monkeypatch.setattr(cache_mod, "compute_supervoxels", together)
    caches = [SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS) for _ in range(2)]
    results: list = [None, None]

    def work(i: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            results[i] = np.asarray(caches[i].get(case)).copy()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c.computed_volumes == 1 for c in caches)
    np.testing.assert_array_equal(results[0], results[1])
    folder = caches[0].slice_cache.get(case).dir
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(cache_mod, "compute_supervoxels", None)  # a third reader must not compute
    np.testing.assert_array_equal(SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
                                  .get(case), results[0])


def test_more_than_65535_regions_are_stored_as_uint32(tmp_path):
    """A noise volume segmented at a tiny scale with no minimum size: about one region per
    voxel, 73728 voxels, more ids than uint16 holds."""
    rng = np.random.default_rng(8)
    hu = rng.uniform(-100.0, 200.0, (48, 48, 32)).astype(np.float32)
    write_nifti(tmp_path / "noise.nii.gz", hu, AFFINE)
    case = Case("noise", tmp_path / "noise.nii.gz")
    cache = SupervoxelCache(SliceCache(PreprocessConfig()),
                            SuperpixelConfig(scale=0.01, sigma=0.0, min_size_mm2=0.0))
    regions = cache.get(case)
    assert regions.dtype == np.uint32 and int(regions.max()) > 65535
    assert SupervoxelCache(SliceCache(PreprocessConfig()), cache.cfg).get(case).dtype == np.uint32
    small = SupervoxelCache(cache.slice_cache, SuperpixelConfig(scale=33.0, min_size_mm2=110.0))
    assert small.get(case).dtype == np.uint16 and int(small.get(case).max()) <= 65535


@pytest.mark.parametrize("workers", [1, 2])
def test_build_reports_regions_mean_volume_and_rate(tmp_path, workers):
    cases = [ct_case(tmp_path / "data", f"c{i}", seed=10 + i, z=4 + 2 * i) for i in range(2)]
    cache = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS)
    stats = cache.build(cases, workers=workers, progress=False)  # 2: one case per process
    maps = [np.asarray(cache.get(c)) for c in cases]
    bodies = [np.asarray(cache.slice_cache.get(c).body) for c in cases]
    assert stats["cases"] == 2 and stats["computed_volumes"] == cache.computed_volumes == 2
    assert stats["voxels"] == sum(m.size for m in maps) == 48 * 40 * 10
    counts = sorted(int(m.max()) for m in maps)
    assert (stats["regions_min"], stats["regions_max"]) == (counts[0], counts[1])
    body_ml = sum(int(b.sum()) for b in bodies) * 1.5 * 1.5 * 3.0 / 1000.0
    assert stats["region_volume_mean_ml"] == pytest.approx(body_ml / sum(counts), abs=1e-4)
    assert stats["voxels_per_s"] > 0
    again = SupervoxelCache(SliceCache(PreprocessConfig()), SUPERVOXELS).build(cases, workers=1,
                                                                               progress=False)
    assert again["computed_volumes"] == 0 and again["voxels_per_s"] is None
    assert again["region_volume_mean_ml"] == stats["region_volume_mean_ml"]
