"""Issue 15, bad inputs: each one is built as a real NIfTI / DICOM / JSON file, then read.

Refused inputs raise DataError naming the file and the value; accepted-but-doubtful inputs are
read and give a DataWarning (docs/ACCEPTED_DATA.md).
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_fixtures import write_dicom_series, write_rtstruct

from lrcseg.cli import main
from lrcseg.data.check import check_data
from lrcseg.data.layouts import load_dataset
from lrcseg.data.readers import read_image, write_nifti
from lrcseg.errors import DataError, DataWarning

LABELS = {"background": 0, "liver": 1}


def _hu(shape=(8, 9, 5), seed=0) -> np.ndarray:
    """Air around soft tissue: a plausible CT in HU."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[2:-2, 2:-2] = np.random.default_rng(seed).normal(40, 20, size=(shape[0] - 4, shape[1] - 4,
                                                                       shape[2]))
    return hu


def _data_warnings(fn, *args):
    """Call ``fn(*args)``; return (result, [DataWarning messages])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args)
    return result, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def _raw_nifti(path: Path, array: np.ndarray, edit, pixdim: list[float] | None = None) -> Path:
    """Write ``array`` as NIfTI after ``edit(header)``; ``pixdim[1:4]`` is then written into
    the file's bytes as given (nibabel would turn a 0 into 1 when saving)."""
    img = nib.Nifti1Image(array, np.eye(4))
    edit(img.header)
    plain = path.with_name("plain.nii")
    nib.save(nib.Nifti1Image(array, None, img.header), plain)
    data = bytearray(plain.read_bytes())
    if pixdim is not None:
        offset = nib.Nifti1Header.template_dtype.fields["pixdim"][1] + 4  # skip pixdim[0]
        data[offset:offset + 12] = np.asarray(pixdim, "<f4").tobytes()
    plain.unlink()
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))
    return path


# --------------------------------------------------------------------------- refused: values


def test_dicom_ct_without_rescale_tags_is_refused_as_not_hu(tmp_path):
    stored = np.zeros((4, 12, 10), np.uint16)
    stored[:, 3:9, 3:8] = 1064  # 40 HU once the (missing) intercept -1024 is applied
    stored[0, 0, 0] = 4000
    write_dicom_series(tmp_path / "s", stored, rescale=False)
    with pytest.raises(DataError, match=r"0\.\.4000 have no value below 0.*RescaleSlope") as exc:
        read_image(tmp_path / "s")
    assert exc.value.path == str(tmp_path / "s")


def test_dicom_without_rescale_but_hu_values_is_read_with_a_warning(tmp_path):
    stored = np.full((3, 12, 10), -1000, np.int16)
    stored[:, 3:9, 3:8] = 40
    write_dicom_series(tmp_path / "s", stored, rescale=False, signed=True)
    vol, warned = _data_warnings(read_image, tmp_path / "s")
    assert vol.array.min() == -1000 and vol.array.max() == 40
    assert len(warned) == 1 and "without RescaleSlope/RescaleIntercept" in warned[0]
    assert str(tmp_path / "s") in warned[0]


@pytest.mark.parametrize("lo,hi,match", [
    (0.0, 3237.0, r"0\.\.3237 have no value below 0"),  # an MR image
    (-1e9, 1e9, r"-1e\+09\.\.1e\+09 cannot be CT Hounsfield units"),
])
def test_intensities_that_cannot_be_ct_are_refused(tmp_path, lo, hi, match):
    array = np.linspace(lo, hi, 8 * 9 * 5, dtype=np.float32).reshape(8, 9, 5)
    path = tmp_path / "ct.nii.gz"
    write_nifti(path, array, np.diag([0.8, 0.8, 2.5, 1.0]))
    with pytest.raises(DataError, match=match) as exc:
        read_image(path)
    assert exc.value.path == str(path)


def test_mr_dicom_series_is_refused_naming_the_modality(tmp_path):
    write_dicom_series(tmp_path / "s", np.full((3, 12, 10), 500, np.uint16), modality="MR")
    with pytest.raises(DataError, match=r"no CT series in this folder, only MR series"):
        read_image(tmp_path / "s")


# --------------------------------------------------------------------------- refused: geometry


def test_nifti_zero_sform_column_is_refused(tmp_path):
    def zero_y(header):
        header.set_sform(np.eye(4), code=1)
        header.set_qform(None, code=0)
        header["srow_y"] = [0, 0, 0, 0]

    path = _raw_nifti(tmp_path / "ct.nii", _hu(), zero_y)
    with pytest.raises(DataError, match=r"affine column 1 \(voxel axis j\) is zero") as exc:
        read_image(path)
    assert exc.value.path == str(path)


@pytest.mark.parametrize("qform_code", [0, 1])
def test_nifti_zero_pixdim_without_sform_is_refused(tmp_path, qform_code):
    def no_sform(header):
        header.set_sform(None, code=0)
        header.set_qform(np.eye(4) if qform_code else None, code=qform_code)

    path = _raw_nifti(tmp_path / "ct.nii.gz", _hu(), no_sform, pixdim=[0.8, 0.8, 0.0])
    with pytest.raises(DataError, match=r"pixdim\[3\] = 0 and no sform"):
        read_image(path)


def test_nifti_zero_pixdim_is_fine_when_the_sform_gives_the_spacing(tmp_path):
    def sform_only(header):
        header.set_sform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)

    vol = read_image(_raw_nifti(tmp_path / "ct.nii.gz", _hu(), sform_only, pixdim=[0.8, 0.8, 0]))
    assert vol.spacing == pytest.approx((0.8, 0.8, 2.5))


# --------------------------------------------------------------------------- warned: geometry


def _rotation_x(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def test_oblique_affine_is_read_with_a_warning(tmp_path):
    affine = np.eye(4)
    affine[:3, :3] = _rotation_x(30) @ np.diag([0.8, 0.8, 2.5])
    path = tmp_path / "ct.nii.gz"
    write_nifti(path, _hu(), affine)
    vol, warned = _data_warnings(read_image, path)
    assert vol.shape == (8, 9, 5)
    assert len(warned) == 1 and "oblique grid" in warned[0] and "30.0 deg" in warned[0]
    assert warned[0].startswith(str(path))


def test_sheared_affine_is_read_with_a_warning(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[1, 2] = 2.5 * np.tan(np.radians(12))  # z steps also move along y
    path = tmp_path / "ct.nii.gz"
    write_nifti(path, _hu(), affine)
    _, warned = _data_warnings(read_image, path)
    assert len(warned) == 1 and "sheared affine" in warned[0] and "12.0 deg" in warned[0]


def test_axis_aligned_affine_gives_no_warning(tmp_path):
    write_nifti(tmp_path / "ct.nii.gz", _hu(), np.diag([-0.8, 0.8, 2.5, 1.0]))
    assert _data_warnings(read_image, tmp_path / "ct.nii.gz")[1] == []


def test_dicom_gantry_tilt_is_read_with_a_warning(tmp_path):
    stored = (_hu((10, 12, 4)).transpose(2, 1, 0) + 1024).astype(np.uint16)
    step, tilt = 2.5, 15.0
    positions = [np.array([-20.0, -30.0 + k * step * np.tan(np.radians(tilt)), 100.0 + k * step])
                 for k in range(4)]
    write_dicom_series(tmp_path / "s", stored, positions=positions,
                       extra={"GantryDetectorTilt": tilt})
    vol, warned = _data_warnings(read_image, tmp_path / "s")
    assert vol.shape == (10, 12, 4)
    assert len(warned) == 1 and "gantry tilt" in warned[0] and "GantryDetectorTilt 15" in warned[0]
    assert "15.0 deg" in warned[0]


def test_absurd_spacing_is_read_with_a_warning(tmp_path):
    write_nifti(tmp_path / "ct.nii.gz", _hu(), np.diag([0.8, 0.8, 2000.0, 1.0]))
    _, warned = _data_warnings(read_image, tmp_path / "ct.nii.gz")
    assert len(warned) == 1 and "0.8 x 0.8 x 2000 mm is outside 0.05..50 mm" in warned[0]


def test_constant_image_is_read_with_a_warning(tmp_path):
    write_nifti(tmp_path / "ct.nii.gz", np.full((8, 9, 5), -1000.0, np.float32), np.eye(4))
    _, warned = _data_warnings(read_image, tmp_path / "ct.nii.gz")
    assert warned == [f"{tmp_path / 'ct.nii.gz'}: constant image: every voxel is -1000 HU"]


# --------------------------------------------------------------------------- DICOM folders


def test_rtstruct_beside_the_ct_series_is_skipped_and_named(tmp_path):
    stored = (_hu((10, 12, 4)).transpose(2, 1, 0) + 1024).astype(np.uint16)
    write_dicom_series(tmp_path / "s", stored)
    write_rtstruct(tmp_path / "s" / "rtstruct.dcm", series_uid="1.2.826.0.1.99")
    vol, warned = _data_warnings(read_image, tmp_path / "s")
    assert vol.shape == (10, 12, 4) and vol.array.min() == -1000
    assert len(warned) == 1
    assert "read the CT series, skipped RTSTRUCT series 1.2.826.0.1.99" in warned[0]
    assert "rtstruct.dcm" in warned[0]


def test_rtstruct_folder_beside_the_ct_folder_is_skipped_and_named(tmp_path):
    patient = tmp_path / "patient"
    stored = (_hu((10, 12, 4)).transpose(2, 1, 0) + 1024).astype(np.uint16)
    write_dicom_series(patient / "CT", stored)
    write_rtstruct(patient / "RTSTRUCT" / "rs.dcm")
    ds, warned = _data_warnings(load_dataset, patient)
    assert [c.image for c in ds.cases] == [patient / "CT"]
    assert warned == [f"{patient / 'RTSTRUCT'}: skipped: a DICOM folder without CT images "
                      "(RTSTRUCT)"]
    for p in (patient / "CT").iterdir():
        p.unlink()
    (patient / "CT").rmdir()
    with pytest.raises(DataError, match=r"no CT images: only DICOM folders without CT"):
        _data_warnings(load_dataset, patient)


def test_two_ct_series_in_one_folder_are_still_refused(tmp_path):
    stored = np.full((2, 12, 10), 1000, np.uint16)
    write_dicom_series(tmp_path / "s", stored, series_uid="1.2.3.4")
    write_dicom_series(tmp_path / "s", stored, series_uid="1.2.3.5", file_order=np.arange(2, 4))
    with pytest.raises(DataError, match=r"2 DICOM series mixed in one folder \(all CT"):
        read_image(tmp_path / "s")


# --------------------------------------------------------------------------- layouts


def _nnunet(root: Path, cases=("a", "b")) -> Path:
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "file_ending": ".nii.gz"}))
    for i, cid in enumerate(cases):
        write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", _hu(seed=i), np.eye(4))
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", np.zeros((8, 9, 5), np.uint8), np.eye(4))
    return root


def test_splits_listing_a_case_in_train_and_test_is_refused(tmp_path):
    root = _nnunet(tmp_path / "d")
    (root / "splits.json").write_text(json.dumps({"train": ["a", "b"], "test": ["b"]}))
    with pytest.raises(DataError, match=r"1 case\(s\) listed twice: 'b' in 'train' and 'test'") \
            as exc:
        load_dataset(root)
    assert exc.value.path == str(root / "splits.json")


def test_nii_and_nii_gz_of_one_image_warn_naming_both(tmp_path):
    root = _nnunet(tmp_path / "d")
    other = root / "imagesTr" / "a_0000.nii"
    write_nifti(other, _hu(seed=7), np.eye(4))
    ds, warned = _data_warnings(load_dataset, root)
    assert [c.image.name for c in ds.cases] == ["a_0000.nii.gz", "b_0000.nii.gz"]
    assert len(warned) == 1 and warned[0].startswith(f"{other}: ignored: two files for one image")
    assert str(root / "imagesTr" / "a_0000.nii.gz") in warned[0]


def test_nii_and_nii_gz_in_a_plain_folder_are_refused_naming_both(tmp_path):
    for name in ("v.nii", "v.nii.gz"):
        write_nifti(tmp_path / "f" / name, _hu(), np.eye(4))
    with pytest.raises(DataError, match=r"'v' is both .*v\.nii and .*v\.nii\.gz"):
        load_dataset(tmp_path / "f")


def test_missing_dataset_json_is_blamed_not_splits_json(tmp_path):
    root = _nnunet(tmp_path / "d")
    (root / "splits.json").write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    (root / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"not found: .* has imagesTr, labelsTr .* no dataset.json") \
            as exc:
        load_dataset(root)
    assert exc.value.path == str(root / "dataset.json")


def test_undeclared_channel_file_is_ignored_with_a_warning(tmp_path):
    root = _nnunet(tmp_path / "d")
    extra = root / "imagesTr" / "a_0001.nii.gz"
    write_nifti(extra, _hu(), np.eye(4))
    ds, warned = _data_warnings(load_dataset, root)
    assert [c.id for c in ds.cases] == ["a", "b"]
    assert warned == [f"{extra}: ignored: channel 1 is not declared in dataset.json channel_names "
                      "(only channel 0, the CT, is used)"]
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"]["1"] = "CT_contrast"
    (root / "dataset.json").write_text(json.dumps(meta))
    assert _data_warnings(load_dataset, root)[1] == []


# --------------------------------------------------------------------------- check-data and CLI


def test_check_data_lists_warnings_per_case(tmp_path, capsys):
    root = _nnunet(tmp_path / "d", cases=("a", "b", "c"))
    oblique = np.eye(4)
    oblique[:3, :3] = _rotation_x(20)
    write_nifti(root / "imagesTr" / "a_0000.nii.gz", _hu(), oblique)
    write_nifti(root / "labelsTr" / "a.nii.gz", np.zeros((8, 9, 5), np.uint8), oblique)
    write_nifti(root / "imagesTr" / "a_0001.nii.gz", _hu(), np.eye(4))
    write_nifti(root / "imagesTr" / "c_0000.nii.gz", np.linspace(0, 3237, 360, dtype=np.float32)
                .reshape(8, 9, 5), np.eye(4))
    report = check_data(root)
    by_id = {c["id"]: c for c in report["cases"]}
    assert sorted(by_id) == ["a", "b"]
    a_messages = [w["message"] for w in by_id["a"]["warnings"]]
    assert len(a_messages) == 2
    assert a_messages[0].startswith("ignored: channel 1 is not declared")
    assert a_messages[1].startswith("oblique grid: voxel axes up to 20.0 deg")
    assert by_id["b"]["warnings"] == []
    assert [(e["case"], e["file"]) for e in report["errors"]] == \
        [("c", str(root / "imagesTr" / "c_0000.nii.gz"))]
    assert report["warnings"] == []
    assert main(["check-data", str(root / "dataset.json"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["cases"][0]["warnings"][1]["file"] == \
        str(root / "imagesTr" / "a_0000.nii.gz")
    (root / "imagesTr" / "c_0000.nii.gz").unlink()
    (root / "labelsTr" / "c.nii.gz").unlink()
    assert main(["check-data", str(root)]) == 0  # warnings alone do not fail the check
    text = capsys.readouterr().out
    assert f"WARNING [a] {root / 'imagesTr' / 'a_0000.nii.gz'}: oblique grid" in text
    assert "2 case(s) ok, 0 error(s), 2 warning(s)" in text
