"""Phantom generator, dataset writer, splits and realism report (small, coarse volumes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from lrcseg.cli import main
from lrcseg.data.readers import read_image, read_label
from lrcseg.data.splits import make_splits
from lrcseg.errors import DataError
from lrcseg.phantoms.generate import (
    LABELS,
    TISSUES,
    generate_phantom,
    phantom_affine,
    write_phantom_dataset,
)
from lrcseg.phantoms.realism import interval_dice_table, realism_report

SHAPE = (100, 75, 16)
SPACING = (4.0, 4.0, 12.5)


@pytest.fixture(scope="module")
def pv_case():
    return generate_phantom(np.random.default_rng(4), SHAPE, SPACING, phase="portal_venous",
                            noise_std_hu=15.0, return_tissues=True, enhancement=1.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "Dataset900_Phantoms"
    write_phantom_dataset(out, 4, seed=11, spacing_mm=SPACING, shape=SHAPE)
    return out


def test_generate_is_deterministic_per_seed():
    a = generate_phantom(np.random.default_rng(5), (60, 45, 8), (6.0, 6.0, 20.0))
    b = generate_phantom(np.random.default_rng(5), (60, 45, 8), (6.0, 6.0, 20.0))
    c = generate_phantom(np.random.default_rng(6), (60, 45, 8), (6.0, 6.0, 20.0))
    assert a[0].dtype == np.float32 and a[1].dtype == np.uint8 and a[0].shape == (60, 45, 8)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()


def _eroded_mean(hu, tissue, name):
    mask = ndimage.binary_erosion(tissue == TISSUES[name], np.ones((3, 3, 1), bool))
    assert mask.sum() > 20, name
    return float(hu[mask].mean())


@pytest.mark.parametrize("name, expected, spread", [
    ("fat", -100.0, 40.0), ("muscle", 60.0, 25.0), ("liver", 110.0, 40.0),  # liver: steatosis -20 HU
    ("spleen", 115.0, 30.0), ("kidney_cortex", 175.0, 40.0), ("aorta", 180.0, 40.0),
])
def test_tissue_hu_in_phantoms_md_ranges(pv_case, name, expected, spread):
    hu, _, tissue = pv_case
    assert abs(_eroded_mean(hu, tissue, name) - expected) <= spread


def test_unenhanced_liver_darker_and_noise_level(pv_case):
    hu_u, _, tis_u = generate_phantom(np.random.default_rng(4), SHAPE, SPACING, phase="unenhanced",
                                      noise_std_hu=15.0, return_tissues=True)
    assert abs(_eroded_mean(hu_u, tis_u, "liver") - 60.0) <= 25.0
    hu, _, tissue = pv_case
    fat = ndimage.binary_erosion(tissue == TISSUES["fat"], np.ones((5, 5, 1), bool))
    assert 8.0 < float(hu[fat].std()) < 30.0  # noise + texture, not flat


def test_enhancement_level_scales_contrast_uptake():
    kw = dict(shape_xyz=SHAPE, spacing_mm=SPACING, noise_std_hu=0.0, return_tissues=True)
    weak = generate_phantom(np.random.default_rng(3), enhancement=0.3, **kw)
    strong = generate_phantom(np.random.default_rng(3), enhancement=1.0, **kw)
    assert np.array_equal(weak[1], strong[1])  # same anatomy, only intensities change
    # aorta: u = 40, p = 180 HU; uptake g ~ U(0.8, 1.2) is the same draw for both
    gain_weak = _eroded_mean(weak[0], weak[2], "aorta") - _eroded_mean(weak[0], weak[2], "fat")
    gain_strong = _eroded_mean(strong[0], strong[2], "aorta") - _eroded_mean(strong[0], strong[2], "fat")
    assert gain_strong - gain_weak == pytest.approx(0.7 * 140.0, rel=0.25)
    with pytest.raises(ValueError, match="enhancement"):
        generate_phantom(np.random.default_rng(0), (20, 15, 2), (20.0, 20.0, 50.0), enhancement=-0.1)


def test_anatomy_in_ras_orientation(pv_case):
    _, lab, _ = pv_case
    centroid = {name: np.argwhere(lab == i).mean(axis=0) for name, i in LABELS.items() if (lab == i).any()}
    cx = (SHAPE[0] - 1) / 2
    assert centroid["liver"][0] > cx > centroid["spleen"][0]  # liver on the patient's right (+x)
    assert centroid["kidney_right"][0] > cx > centroid["kidney_left"][0]
    assert centroid["aorta"][0] < centroid["ivc"][0]  # aorta left of the IVC
    assert centroid["spleen"][1] < centroid["stomach"][1]  # spleen posterior to the stomach


def test_dataset_layout_labels_and_readback(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 4 and meta["labels"] == LABELS
    seen = set()
    for i in range(4):
        img = read_image(dataset / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz")
        lab = read_label(dataset / "labelsTr" / f"phantom_{i:03d}.nii.gz", img)
        assert img.spacing == pytest.approx(SPACING) and img.shape == SHAPE
        np.testing.assert_allclose(img.affine, phantom_affine(SHAPE, SPACING))
        seen |= set(np.unique(lab.array).tolist())
    assert seen == set(LABELS.values())  # every organ present, no unknown ids
    assert (dataset / "montage.png").stat().st_size > 10_000


def test_dataset_case_independent_of_count(dataset, tmp_path):
    other = write_phantom_dataset(tmp_path / "two", 2, seed=11, spacing_mm=SPACING, shape=SHAPE,
                                  montage=False)
    a = read_image(dataset / "imagesTr" / "phantom_001_0000.nii.gz").array
    b = read_image(other / "imagesTr" / "phantom_001_0000.nii.gz").array
    assert np.array_equal(a, b)
    with pytest.raises(FileExistsError):
        write_phantom_dataset(other, 1, seed=0, spacing_mm=SPACING, shape=SHAPE)


def test_splits_disjoint_and_covering(dataset):
    splits = json.loads((dataset / "splits.json").read_text())
    ids = [f"phantom_{i:03d}" for i in range(4)]
    flat = splits["pretrain"] + splits["train"] + splits["test"]
    assert sorted(flat) == ids and len(set(flat)) == 4
    s = make_splits([f"c{i}" for i in range(20)], 0.5, 0.2)
    assert [len(s[k]) for k in ("pretrain", "train", "test")] == [10, 4, 6]
    with pytest.raises(ValueError, match="split fractions"):
        make_splits(ids, 0.8, 0.3)


def test_interval_dice_known_answer():
    hu = np.array([0.0, 0.0, 100.0, 100.0, 100.0, 200.0])
    organ = np.array([False, False, True, True, False, False])
    dice, edges = interval_dice_table(hu, organ, np.ones(6, bool))
    i, j = np.unravel_index(np.nanargmax(dice), dice.shape)
    assert 0.0 < edges[i] <= 100.0 and edges[j] == 100.0  # takes the 100s, leaves 0 and 200 out
    assert dice[i, j] == pytest.approx(2 * 2 / (3 + 2))


def test_realism_report_on_tiny_dataset(dataset):
    report = realism_report(dataset, max_cases=2, slices_per_case=2, spacing_mm=3.0)
    assert report["preprocess"]["spacing_mm"] == 3.0
    assert report["superpixel_settings"]["min_size_px"] == 12  # 110 mm^2 at 3 mm
    assert (dataset / "realism.json").is_file()
    for name in ("liver", "spleen", "aorta"):
        row = report["intensity_interval"][name]
        assert 0.0 <= row["dice_fit"] <= 1.0 and 0.0 <= row["dice_other"] <= 1.0
        assert row["interval_hu"][0] < row["interval_hu"][1]
    for key in ("scale_100", "scale_200"):
        stats = report["superpixels"][key]
        assert 0.0 <= stats["asa"] <= 1.0 and 0.0 <= stats["boundary_recall"] <= 1.0
        assert stats["regions_median"] >= 1
    assert set(report["within_targets"]) >= {"interval_dice_fit_liver", "scale_100_asa"}


def test_cli_writes_small_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["phantoms", "--out", str(out), "--cases", "1", "--seed", "2",
               "--spacing", "8", "8", "25", "--size", "50", "38", "8"])
    assert rc == 0 and (out / "labelsTr" / "phantom_000.nii.gz").is_file()
    assert main(["phantoms", "--out", str(out), "--cases", "1"]) == 1  # exists: refused
    assert "already exists" in capsys.readouterr().err


def test_realism_report_needs_two_labelled_cases(dataset, tmp_path):
    # cases come from load_dataset: without labelsTr the images are unlabelled, none can be fit
    unlabelled = tmp_path / "Dataset901_NoLabels"
    (unlabelled / "imagesTr").mkdir(parents=True)
    for f in sorted((dataset / "imagesTr").iterdir())[:2]:
        (unlabelled / "imagesTr" / f.name).symlink_to(f)
    (unlabelled / "dataset.json").write_text((dataset / "dataset.json").read_text())
    with pytest.raises(DataError, match="need at least 2 labelled training cases"):
        realism_report(unlabelled, max_cases=2)
    with pytest.raises(ValueError, match="max_cases"):
        realism_report(dataset, max_cases=1)
