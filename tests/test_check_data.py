"""check-data: per-case JSON report, errors collected per case, exit codes, human table."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_fixtures import edit_dicom, write_dicom_series

from lrcseg.cli import main
from lrcseg.config import PreprocessConfig
from lrcseg.data.check import check_data
from lrcseg.data.layouts import load_dataset
from lrcseg.data.readers import write_nifti
from lrcseg.data.slice_cache import SliceCache
from lrcseg.errors import DataError, DataWarning

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _dataset(root: Path) -> Path:
    """nnU-Net dataset: a good; b label on another grid; c undeclared label 7; d (test) NaN."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    hu = np.full((12, 10, 4), -1000.0, np.float32)
    hu[3:9, 3:8] = 45.0
    lab = np.zeros(hu.shape, np.uint8)
    lab[4:6, 4:6, 1] = 1
    lab[6:8, 4:6, 2] = 2
    for cid in "abc":
        write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", hu, AFFINE)
    write_nifti(root / "labelsTr" / "a.nii.gz", lab, AFFINE)
    write_nifti(root / "labelsTr" / "b.nii.gz", lab[:, :, :3], AFFINE)
    bad = lab.copy()
    bad[0, 0, 0] = 7
    write_nifti(root / "labelsTr" / "c.nii.gz", bad, AFFINE)
    nan = hu.copy()
    nan[0, 0, 0] = np.nan
    write_nifti(root / "imagesTs" / "d_0000.nii.gz", nan, AFFINE)
    return root


def test_check_data_collects_errors_per_case(tmp_path):
    root = _dataset(tmp_path / "ds")
    report = check_data(root)
    assert report["layout"] == "nnunet"
    assert [c["id"] for c in report["cases"]] == ["a"]
    a = report["cases"][0]
    assert a["shape"] == [12, 10, 4] and a["spacing_mm"] == [0.8, 0.8, 2.5]
    assert a["orientation"] == "RAS" and a["labels"] == [0, 1, 2]
    assert a["intensity_min"] == -1000.0 and a["intensity_max"] == 45.0
    errors = {e["case"]: e for e in report["errors"]}
    assert sorted(errors) == ["b", "c", "d"]
    assert errors["b"]["file"] == str(root / "labelsTr" / "b.nii.gz")
    assert "does not match image shape" in errors["b"]["message"]
    assert errors["c"]["file"] == str(root / "labelsTr" / "c.nii.gz")
    assert "[7] are not declared" in errors["c"]["message"]
    assert errors["d"]["file"] == str(root / "imagesTs" / "d_0000.nii.gz")
    assert "NaN" in errors["d"]["message"]


def test_cli_json_and_exit_codes(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    assert main(["check-data", str(root), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"cases", "errors"}
    assert set(out["cases"][0]) >= {"id", "image", "shape", "spacing_mm", "orientation",
                                    "intensity_min", "intensity_max", "labels"}
    assert all(set(e) == {"case", "file", "message"} for e in out["errors"])
    for f in ["labelsTr/b.nii.gz", "labelsTr/c.nii.gz", "imagesTs/d_0000.nii.gz"]:
        (root / f).unlink()
    (root / "imagesTr" / "b_0000.nii.gz").unlink()
    (root / "imagesTr" / "c_0000.nii.gz").unlink()
    assert main(["check-data", str(root)]) == 0
    text = capsys.readouterr().out
    assert "12x10x4" in text and "1 case(s) ok, 0 error(s)" in text


def test_cli_dicom_series_shape_after_canonical(tmp_path, capsys):
    write_dicom_series(tmp_path / "ser", np.full((3, 16, 12), 1000, np.uint16),
                       pixel_spacing=(0.9, 0.6), step=4.0)
    assert main(["check-data", str(tmp_path / "ser"), "--json"]) == 0
    case = json.loads(capsys.readouterr().out)["cases"][0]
    assert case["shape"] == [12, 16, 3] and case["spacing_mm"] == [0.6, 0.9, 4.0]
    assert case["intensity_min"] == case["intensity_max"] == -24.0 and case["labels"] is None


def test_cli_broken_dataset_json(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    (root / "dataset.json").write_text("not json")
    assert main(["check-data", str(root), "--json"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert errors[0]["file"] == str(root / "dataset.json") and "not valid JSON" in errors[0]["message"]


def test_truncated_case_does_not_stop_the_others(tmp_path):
    root = tmp_path / "folder"
    for i in range(3):
        write_nifti(root / f"v{i}.nii.gz", np.full((20, 20, 20), float(i), np.float32), AFFINE)
    data = (root / "v1.nii.gz").read_bytes()
    (root / "v1.nii.gz").write_bytes(data[: len(data) // 2])
    report = check_data(root)
    assert [c["id"] for c in report["cases"]] == ["v0", "v2"]
    assert [(e["case"], Path(e["file"]).name) for e in report["errors"]] == [("v1", "v1.nii.gz")]


def test_check_data_reports_what_the_training_path_raises(tmp_path):
    """Every case's error or warnings in check-data are those that reading it for training (the
    slice cache) gives."""
    root = tmp_path / "folder"
    hu = np.full((12, 10, 4), -1000.0, np.float32)
    hu[3:9, 3:8] = 45.0
    write_nifti(root / "good.nii.gz", hu, AFFINE)
    stored = np.full((5, 10, 12), 24, np.uint16)
    stored[:, 3:7, 3:9] = 1064
    paths = write_dicom_series(root / "spacing", stored)
    edit_dicom(paths[2:3], PixelSpacing=[0.9, 0.9])
    positions = [np.array([0.0, 0.0, 2.5 * k]) for k in range(5)]
    positions[2] = positions[2] + [0.0, 2.0, 0.0]
    write_dicom_series(root / "shifted", stored, positions=positions)
    img = nib.Nifti1Image(hu, None)
    img.header.set_sform(AFFINE, code=1)
    shifted = AFFINE.copy()
    shifted[0, 3] = 4.0
    img.header.set_qform(shifted, code=1)
    nib.save(img, root / "xforms.nii.gz")
    report = check_data(root)
    errors = {e["case"]: e for e in report["errors"]}
    warned = {c["id"]: c["warnings"] for c in report["cases"]}
    assert sorted(errors) == ["shifted", "spacing"] and sorted(warned) == ["good", "xforms"]
    assert len(warned["xforms"]) == 1
    cache = SliceCache(PreprocessConfig())
    for case in load_dataset(root).cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if case.id in errors:
                with pytest.raises(DataError) as exc:
                    cache.get(case)
                assert (exc.value.path, exc.value.message) == \
                    (errors[case.id]["file"], errors[case.id]["message"])
            else:
                cache.get(case)
        assert [{"file": w.message.path, "message": w.message.message} for w in caught
                if issubclass(w.category, DataWarning)] == warned.get(case.id, [])


def test_check_data_shows_each_phantoms_contrast_phase(tmp_path):
    from lrcseg.data.check import format_report
    from lrcseg.phantoms.generate import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", cases=4, seed=3, spacing_mm=(6.0, 6.0, 12.0),
                                 montage=False, anatomy=2)
    recorded = json.loads((data / "dataset.json").read_text())["phantoms"]["phases"]
    report = check_data(data)
    assert {c["id"]: c["phase"] for c in report["cases"]} == recorded
    text = format_report(report)
    assert "phase" in text.splitlines()[2]
    for case_id, phase in recorded.items():
        assert any(line.startswith(case_id) and line.rstrip().endswith(phase)
                   for line in text.splitlines())
