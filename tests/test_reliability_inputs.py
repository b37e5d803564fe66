"""Issues 15 and 27 B, bad inputs: each one is built as a real NIfTI / DICOM / JSON file, then
read.

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
from dicom_fixtures import edit_dicom, write_dicom_series, write_rtstruct

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


def test_nii_beside_nii_gz_in_imagestr_is_refused_naming_both(tmp_path, capsys):
    root = _nnunet(tmp_path / "d")
    other = root / "imagesTr" / "a_0000.nii"
    write_nifti(other, _hu(seed=7), np.eye(4))
    with pytest.raises(DataError, match=r"image name 'a_0000' is both .*a_0000\.nii and "
                                        r".*a_0000\.nii\.gz: two files for one case") as exc:
        load_dataset(root)
    assert exc.value.path == str(root / "imagesTr")
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    line, = [x for x in out.splitlines() if x.startswith("ERROR")]
    assert str(other) in line and str(root / "imagesTr" / "a_0000.nii.gz") in line
    assert "0 case(s) ok, 1 error(s)" in out


def test_nii_alone_with_another_file_ending_is_ignored_with_a_warning(tmp_path):
    root = _nnunet(tmp_path / "d")
    other = root / "imagesTs" / "z_0000.nii"
    write_nifti(other, _hu(), np.eye(4))
    ds, warned = _data_warnings(load_dataset, root)
    assert [c.id for c in ds.all_cases] == ["a", "b"]
    assert warned == [f"{other}: ignored: its ending differs from dataset.json file_ending "
                      "'.nii.gz'"]


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


# --------------------------------------------------------------------------- issue 27 B: one
# series, one grid. Every per-slice inconsistency is refused naming the folder, the values by
# count and the offending files.


def _ct_stored(nz: int = 6, rows: int = 8, cols: int = 7) -> np.ndarray:
    """(Z, Rows, Columns) stored values: air (-1000 HU) around soft tissue (40 HU)."""
    stored = np.full((nz, rows, cols), 24, np.uint16)
    stored[:, 2:-2, 2:-2] = 1064
    return stored


def _one_error_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_pixel_spacing_changing_on_4_of_64_slices_is_refused_by_every_command(tmp_path, capsys):
    series = tmp_path / "series"
    paths = write_dicom_series(series, _ct_stored(64), pixel_spacing=(0.7, 0.7))
    edit_dicom(paths[5:9], PixelSpacing=[0.8, 0.8])
    message = (r"PixelSpacing 0\.7x0\.7 on 60 slices, 0\.8x0\.8 on 4 \(img_005\.dcm, img_006\.dcm, "
               r"img_007\.dcm, img_008\.dcm\): the slices of one series must share one PixelSpacing")
    with pytest.raises(DataError, match=message) as exc:
        read_image(series)
    assert exc.value.path == str(series)
    report = check_data(series)
    assert report["cases"] == []
    assert [(e["file"], e["case"]) for e in report["errors"]] == [(str(series), "series")]
    assert main(["check-data", str(series)]) == 1
    out = capsys.readouterr().out
    assert "0 warning(s)" in out and "1 error(s)" in out
    assert f"ERROR [series] {series}: PixelSpacing 0.7x0.7 on 60 slices" in out
    rc = main(["superpixels", "--data", str(series), "--out", str(tmp_path / "sp"), "--workers",
               "1", "--no-progress"])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 1
    assert err.startswith(f"lrcseg superpixels: error: {series}: PixelSpacing 0.7x0.7 on 60 "
                          "slices, 0.8x0.8 on 4 (img_005.dcm")


@pytest.mark.parametrize("attributes,expected", [
    ({"Rows": 6}, r"Rows x Columns 8x7 on 5 slices, 6x7 on 1 \(img_002\.dcm\)"),
    ({"ImageOrientationPatient": [1, 0, 0, 0, 0.98480775, 0.17364818]},
     r"ImageOrientationPatient 1\\0\\0\\0\\1\\0 on 5 slices, 1\\0\\0\\0\\0\.984808\\0\.173648 on 1 "
     r"\(img_002\.dcm\)"),
    ({"FrameOfReferenceUID": "1.2.3.9"}, r"FrameOfReferenceUID \(none\) on 5 slices, 1\.2\.3\.9 on 1 "
                                         r"\(img_002\.dcm\)"),
    ({"Modality": "MR"}, r"Modality CT on 5 slices, MR on 1 \(img_002\.dcm\)"),
    ({"RescaleSlope": None, "RescaleIntercept": None},
     r"RescaleSlope/RescaleIntercept present on 5 slices, missing on 1 \(img_002\.dcm\).*"
     r"cannot be converted to HU"),
])
def test_a_per_slice_attribute_differing_within_the_series_is_refused(tmp_path, attributes,
                                                                       expected):
    paths = write_dicom_series(tmp_path / "s", _ct_stored())
    if "Rows" in attributes:  # a smaller slice: its pixel data shrinks with it
        edit_dicom(paths[2:3], PixelData=_ct_stored(1, 6, 7)[0].tobytes())
    edit_dicom(paths[2:3], **attributes)
    with pytest.raises(DataError, match=expected) as exc:
        read_image(tmp_path / "s")
    assert exc.value.path == str(tmp_path / "s")


def test_rescale_values_may_differ_per_slice(tmp_path):
    stored = _ct_stored(4)
    paths = write_dicom_series(tmp_path / "s", stored)
    # the same HU (stored - 1024) as (stored + 1024) / 2 * 2 - 2048
    edit_dicom(paths[1:2], RescaleSlope=2.0, RescaleIntercept=-2048.0,
               PixelData=((stored[1] + 1024) // 2).astype(np.uint16).tobytes())
    vol, warned = _data_warnings(read_image, tmp_path / "s")
    assert warned == []
    np.testing.assert_array_equal(vol.array[2:-2, 2:-2], 40.0)
    assert np.unique(vol.array).tolist() == [-1000.0, 40.0]


def test_a_slice_shifted_in_plane_is_refused_naming_it(tmp_path):
    positions = [np.array([-20.0, -30.0, 100.0 + 2.5 * k]) for k in range(6)]
    positions[3] = positions[3] + [1.5, 0.0, 0.0]
    write_dicom_series(tmp_path / "s", _ct_stored(), positions=positions)
    with pytest.raises(DataError, match=r"ImagePositionPatient of 1 slice\(s\) off the line .* "
                                        r"img_003\.dcm at -18\.5\\-30\\107\.5 is 1\.500 mm off"):
        read_image(tmp_path / "s")


def test_slice_steps_drifting_within_the_gap_tolerance_are_refused(tmp_path):
    steps = np.linspace(2.4, 2.6, 11)  # each within 5% of the median, the sum is not
    z = 100.0 + np.concatenate([[0.0], np.cumsum(steps)])
    write_dicom_series(tmp_path / "s", _ct_stored(12),
                       positions=[np.array([-20.0, -30.0, v]) for v in z])
    with pytest.raises(DataError, match=r"uneven slice spacing: img_00[56]\.dcm lies 0\.[0-9]+ mm "
                                        r"along the slice normal .*drift from 2\.400 to 2\.600 mm"):
        read_image(tmp_path / "s")


def test_duplicate_slice_positions_are_refused_naming_both_files(tmp_path):
    positions = [np.array([-20.0, -30.0, 100.0 + 2.5 * k]) for k in range(6)]
    positions[4] = positions[3]
    write_dicom_series(tmp_path / "s", _ct_stored(), positions=positions)
    with pytest.raises(DataError, match=r"two slices at the same position 107\.500 mm .*"
                                        r"\(img_003\.dcm, img_004\.dcm\)"):
        read_image(tmp_path / "s")


@pytest.mark.parametrize("attributes,expected", [
    ({"PixelSpacing": [0.0, 0.7]}, r"PixelSpacing 0x0\.7 is not positive"),
    ({"PixelSpacing": [0.7]}, r"PixelSpacing 0\.7 is not 2 finite number\(s\)"),
    ({"ImagePositionPatient": ["nan", "0", "0"]}, r"ImagePositionPatient nan\\0\\0 is not 3 finite"),
    ({"ImageOrientationPatient": [1, 0, 0, 0.5, 0.8660254, 0]},
     r"ImageOrientationPatient 1\\0\\0\\0\.5\\0\.866025\\0 is not two perpendicular unit vectors"),
    ({"ImageOrientationPatient": [0, 0, 0, 0, 1, 0]}, r"is not two perpendicular unit vectors"),
    ({"PixelSpacing": None}, r"DICOM file lacks PixelSpacing"),
])
def test_invalid_slice_geometry_is_refused_naming_the_file(tmp_path, attributes, expected):
    paths = write_dicom_series(tmp_path / "s", _ct_stored(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own warning about writing "nan"
        edit_dicom(paths[1:2], **attributes)
    with pytest.raises(DataError, match=expected) as exc:
        _data_warnings(read_image, tmp_path / "s")
    assert exc.value.path == str(paths[1])


def test_a_ct_localizer_series_beside_the_ct_series_is_skipped_with_a_warning(tmp_path):
    write_dicom_series(tmp_path / "s", _ct_stored(4), series_uid="1.2.3.1",
                       file_order=np.arange(1, 5))
    scout, = write_dicom_series(tmp_path / "s", _ct_stored(1), series_uid="1.2.3.2",
                                file_order=np.array([0]), row_cos=(1, 0, 0), col_cos=(0, 0, -1),
                                extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    vol, warned = _data_warnings(read_image, tmp_path / "s")
    assert vol.shape == (7, 8, 4)
    assert warned == [f"{tmp_path / 's'}: read the CT series, skipped CT LOCALIZER series 1.2.3.2 "
                      "(1 file(s), e.g. img_000.dcm)"]
    assert check_data(tmp_path / "s")["cases"][0]["source_orientation"] == "LPS"  # not the scout's
    edit_dicom([scout], ImageType="LOCALIZER")  # a single value
    assert len(_data_warnings(read_image, tmp_path / "s")[1]) == 1


def test_slices_without_a_series_uid_beside_a_series_are_refused(tmp_path):
    paths = write_dicom_series(tmp_path / "s", _ct_stored(4), series_uid="1.2.3.1")
    edit_dicom(paths[:1], SeriesInstanceUID=None)
    with pytest.raises(DataError, match=r"2 DICOM series mixed in one folder \(all CT, "
                                        r"SeriesInstanceUID \(none\), 1\.2\.3\.1\)"):
        read_image(tmp_path / "s")


def test_an_empty_series_folder_of_a_datalist_is_reported_by_check_data(tmp_path):
    (tmp_path / "empty").mkdir()
    write_nifti(tmp_path / "ok.nii.gz", _hu(), np.eye(4))
    (tmp_path / "list.json").write_text(json.dumps({"training": ["ok.nii.gz", "empty"]}))
    report = check_data(tmp_path / "list.json")
    assert [c["id"] for c in report["cases"]] == ["ok"]
    assert [(e["file"], e["message"]) for e in report["errors"]] == \
        [(str(tmp_path / "empty"), "no DICOM files in folder")]


# --------------------------------------------------------------------------- issue 27 B: NIfTI
# geometry nibabel would take silently.


def _xform_nifti(path: Path, sform: np.ndarray | None, qform: np.ndarray | None) -> Path:
    img = nib.Nifti1Image(_hu(), None)
    img.header.set_sform(sform, code=0 if sform is None else 1)
    img.header.set_qform(qform, code=0 if qform is None else 1)
    nib.save(img, path)
    return path


def test_nifti_non_finite_affine_is_refused(tmp_path, capsys):
    sform = np.eye(4)
    sform[0, 3] = np.nan  # nibabel would quietly fall back to the qform
    path = _xform_nifti(tmp_path / "ct.nii.gz", sform, np.eye(4))
    with pytest.raises(DataError, match=r"the sform \(code 1\) has NaN or infinite entries"):
        read_image(path)
    img = nib.Nifti1Image(_hu(), None)
    img.header.set_qform(np.eye(4), code=1)
    img.header["qoffset_x"] = np.inf
    nib.save(img, tmp_path / "q.nii")
    with pytest.raises(DataError, match=r"the qform \(code 1\) has NaN or infinite entries") as exc:
        read_image(tmp_path / "q.nii")
    assert exc.value.path == str(tmp_path / "q.nii")
    assert main(["check-data", str(tmp_path / "q.nii")]) == 1
    assert f"ERROR [q] {tmp_path / 'q.nii'}: the qform" in capsys.readouterr().out


def test_nifti_negative_pixdim_without_sform_is_refused(tmp_path):
    def no_sform(header):
        header.set_sform(None, code=0)
        header.set_qform(np.eye(4), code=1)

    path = _raw_nifti(tmp_path / "ct.nii", _hu(), no_sform, pixdim=[0.8, -0.8, 2.5])
    with pytest.raises(DataError, match=r"pixdim\[2\] = -0\.8 and no sform"):
        read_image(path)


def test_nifti_with_coplanar_voxel_axes_is_refused(tmp_path):
    sform = np.diag([0.8, 0.8, 2.5, 1.0])
    sform[:3, 2] = [0.8, 0.0, 0.001]  # the third axis almost along the first
    path = _xform_nifti(tmp_path / "ct.nii.gz", sform, None)
    with pytest.raises(DataError, match=r"voxel axes \(nearly\) lie in one plane"):
        read_image(path)


def test_nifti_sform_and_qform_that_disagree_are_warned_about(tmp_path):
    qform = np.diag([0.8, 0.8, 2.5, 1.0])
    sform = qform.copy()
    sform[:3, 3] = [0.0, 5.0, 0.0]
    path = _xform_nifti(tmp_path / "ct.nii.gz", sform, qform)
    vol, warned = _data_warnings(read_image, path)
    assert vol.affine[1, 3] == pytest.approx(5.0)  # the sform, as nibabel reads it
    assert warned == [f"{path}: sform and qform disagree: they place voxels up to 5 mm apart "
                      "(6.2 voxels); the sform is used (as nibabel does), tools that use the "
                      "qform (ITK) see another grid"]
    entry = check_data(path)["cases"][0]
    assert [w["file"] for w in entry["warnings"]] == [str(path)]
    assert _data_warnings(read_image, _xform_nifti(tmp_path / "ok.nii.gz", qform, qform))[1] == []


def test_nifti_with_trailing_axes_of_length_one_is_3d(tmp_path):
    write_nifti(tmp_path / "ct.nii.gz", _hu()[..., None, None], np.eye(4))
    assert read_image(tmp_path / "ct.nii.gz").shape == (8, 9, 5)
    write_nifti(tmp_path / "t.nii.gz", np.stack([_hu(), _hu()], axis=-1), np.eye(4))
    report = check_data(tmp_path / "t.nii.gz")
    assert report["errors"][0]["message"] == "expected a 3D volume, got shape (8, 9, 5, 2)"


# --------------------------------------------------------------------------- issue 27 B: one
# case, two files. Refused naming both, in every layout; never one of them picked.


def _refused_naming(root, *files) -> str:
    with pytest.raises(DataError) as exc:
        load_dataset(root)
    for f in files:
        assert str(f) in exc.value.message
    report = check_data(root)
    assert report["cases"] == [] and len(report["errors"]) == 1
    assert report["errors"][0]["message"] == exc.value.message
    return exc.value.message


def test_nii_beside_nii_gz_in_labelstr_is_refused(tmp_path):
    root = _nnunet(tmp_path / "d")
    other = root / "labelsTr" / "a.nii"
    write_nifti(other, np.zeros((8, 9, 5), np.uint8), np.eye(4))
    message = _refused_naming(root, other, root / "labelsTr" / "a.nii.gz")
    assert message.startswith("case id 'a' is both")


@pytest.mark.parametrize("name", ["A_0000.nii.gz", "a_0000.NII.GZ"])
def test_image_names_differing_in_letter_case_only_are_refused(tmp_path, name):
    root = _nnunet(tmp_path / "d")
    write_nifti(root / "imagesTr" / name, _hu(), np.eye(4))
    message = _refused_naming(root, root / "imagesTr" / name, root / "imagesTr" / "a_0000.nii.gz")
    if name.startswith("A"):
        assert "'A_0000' / 'a_0000' (differing in letter case only) is both" in message


def test_a_dicom_folder_and_a_nifti_of_one_name_are_refused(tmp_path):
    root = _nnunet(tmp_path / "d")
    write_dicom_series(root / "imagesTr" / "a_0000", _ct_stored(2))
    _refused_naming(root, root / "imagesTr" / "a_0000", root / "imagesTr" / "a_0000.nii.gz")
    (root / "imagesTs").mkdir()
    (root / "imagesTr" / "a_0000").rename(root / "imagesTs" / "z_0000")
    ds, warned = _data_warnings(load_dataset, root)
    assert [c.id for c in ds.all_cases] == ["a", "b"]
    assert warned == [f"{root / 'imagesTs' / 'z_0000'}: ignored: a DICOM folder, but nnU-Net "
                      "images are NIfTI files (<case>_0000.nii.gz); convert it or use a plain "
                      "folder or a datalist"]
    plain = tmp_path / "plain"
    write_dicom_series(plain / "V", _ct_stored(2))
    write_nifti(plain / "v.nii.gz", _hu(), np.eye(4))
    _refused_naming(plain, plain / "V", plain / "v.nii.gz")


def test_one_case_id_in_imagestr_and_imagests_is_refused(tmp_path):
    root = _nnunet(tmp_path / "d")
    write_nifti(root / "imagesTs" / "b_0000.nii.gz", _hu(), np.eye(4))
    message = _refused_naming(root, root / "imagesTr" / "b_0000.nii.gz",
                              root / "imagesTs" / "b_0000.nii.gz")
    assert message.startswith("case id 'b' is both")


def test_datalist_entries_of_one_case_or_one_file_are_refused(tmp_path):
    for name in ("p1.nii", "p1.nii.gz", "p2.nii.gz"):
        write_nifti(tmp_path / name, _hu(), np.eye(4))
    write_nifti(tmp_path / "l1.nii.gz", np.zeros((8, 9, 5), np.uint8), np.eye(4))
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": ["p1.nii"], "test": ["p1.nii.gz"]}))
    _refused_naming(datalist, tmp_path / "p1.nii", tmp_path / "p1.nii.gz")
    datalist.write_text(json.dumps({"training": [{"image": "p2.nii.gz", "id": "x"},
                                                 {"image": "p2.nii.gz", "id": "y"}]}))
    assert _refused_naming(datalist, tmp_path / "p2.nii.gz").startswith(
        f"image {tmp_path / 'p2.nii.gz'} is listed for two cases, 'x' and 'y'")
    datalist.write_text(json.dumps({"training": ["p2.nii.gz"], "test": ["./p2.nii.gz"]}))
    assert _refused_naming(datalist, tmp_path / "p2.nii.gz").startswith(
        f"image {tmp_path / 'p2.nii.gz'} is listed twice (case 'p2')")
    datalist.write_text(json.dumps({"training": [
        {"image": "p1.nii.gz", "label": "l1.nii.gz"}, {"image": "p2.nii.gz", "label": "l1.nii.gz"}]}))
    _refused_naming(datalist, tmp_path / "l1.nii.gz", tmp_path / "p1.nii.gz", tmp_path / "p2.nii.gz")


def test_plain_folder_names_differing_in_letter_case_only_are_refused(tmp_path, capsys):
    for name in ("V.nii.gz", "v.nii.gz"):
        write_nifti(tmp_path / "f" / name, _hu(), np.eye(4))
    _refused_naming(tmp_path / "f", tmp_path / "f" / "V.nii.gz", tmp_path / "f" / "v.nii.gz")
    assert main(["check-data", str(tmp_path / "f")]) == 1
    line, = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ERROR")]
    assert "V.nii.gz" in line and "v.nii.gz" in line
