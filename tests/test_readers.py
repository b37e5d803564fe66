"""Readers: NIfTI round trips, DICOM series ordering/HU/geometry, the real chest CT, bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from dicom_fixtures import write_dicom_series
from pydicom.uid import JPEG2000Lossless, RLELossless

from lrcseg.data.readers import Volume, read_image, read_label, write_nifti
from lrcseg.errors import DataError

NZ, NR, NC = 8, 40, 36  # slices, rows, columns: tiny, non-square, enough for JPEG 2000


def _stored(seed: int = 0) -> np.ndarray:
    """(Z, Rows, Columns) uint16 with a distinct value per slice so the order is testable."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 1400, size=(NZ, NR, NC)).astype(np.uint16)
    base[:, 0, 0] = np.arange(NZ) * 10 + 2000  # slice marker
    return base


def _expected_ras(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    # Axial LPS series (row_cos = +x_L, col_cos = +y_P): RAS flips the column and row axes.
    hu = stored.astype(np.float32) * slope + intercept
    return hu.transpose(2, 1, 0)[::-1, ::-1, :]


def _oblique_affine() -> np.ndarray:
    a = np.diag([0.8, 1.1, 3.0, 1.0])
    a[:3, 3] = [-12.5, 40.0, -7.0]
    return a


def test_nifti_round_trip_keeps_array_affine_spacing(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.normal(0, 300, size=(10, 12, 6)).astype(np.float32)
    affine = _oblique_affine()
    path = tmp_path / "ct.nii.gz"
    write_nifti(path, array, affine)
    vol = read_image(path)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.spacing == pytest.approx((0.8, 1.1, 3.0))
    assert not list(tmp_path.glob(".ct.nii.gz*")), "temporary file left behind"


def test_nifti_non_canonical_is_reoriented_to_ras(tmp_path):
    array = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3) * 10 - 1000  # HU
    affine = np.diag([-2.0, 1.0, 1.0, 1.0])  # x runs to the Left: LAS
    affine[0, 3] = 10.0
    write_nifti(tmp_path / "las.nii", array, affine)
    vol = read_image(tmp_path / "las.nii")
    np.testing.assert_array_equal(vol.array, array[::-1])
    assert vol.affine[0, 0] == pytest.approx(2.0)
    assert vol.affine[0, 3] == pytest.approx(10.0 - 2.0 * 3)  # world x of the old last voxel


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless])
def test_dicom_shuffled_files_read_in_position_order_with_hu(tmp_path, syntax):
    if syntax == JPEG2000Lossless:
        pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg not installed")
    stored = _stored()
    order = np.random.default_rng(3).permutation(NZ)
    kwargs = {} if syntax is None else {"transfer_syntax": syntax}
    write_dicom_series(tmp_path / "s", stored, slope=2.0, intercept=-2048.0, file_order=order,
                       **kwargs)
    vol = read_image(tmp_path / "s")
    expected = _expected_ras(stored, 2.0, -2048.0)
    np.testing.assert_array_equal(vol.array, expected)
    # the slice markers rise with z although file names are shuffled
    assert list(vol.array[-1, -1, :]) == [(k * 10 + 2000) * 2.0 - 2048.0 for k in range(NZ)]
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))


def test_dicom_descending_positions_sorted_along_normal(tmp_path):
    stored = _stored()
    positions = [np.array([-20.0, -30.0, 100.0 - 2.5 * k]) for k in range(NZ)]  # feet-first
    write_dicom_series(tmp_path / "s", stored, positions=positions)
    vol = read_image(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, _expected_ras(stored, 1.0, -1024.0)[:, :, ::-1])
    assert vol.affine[2, 3] == pytest.approx(100.0 - 2.5 * (NZ - 1))
    assert vol.affine[2, 2] == pytest.approx(2.5)


def test_dicom_and_nifti_of_same_volume_agree(tmp_path):
    stored = _stored(5)
    origin, ps, step = (-20.0, -30.0, 100.0), (0.8, 0.7), 2.5
    write_dicom_series(tmp_path / "dcm", stored, origin=origin, pixel_spacing=ps, step=step)
    # The same volume as NIfTI, written independently in RAS: x_R = -x_L, y_A = -y_P.
    ras_hu = _expected_ras(stored, 1.0, -1024.0)
    affine = np.diag([ps[1], ps[0], step, 1.0])
    affine[:3, 3] = [-(origin[0] + (NC - 1) * ps[1]), -(origin[1] + (NR - 1) * ps[0]), origin[2]]
    write_nifti(tmp_path / "ct.nii.gz", ras_hu, affine)
    from_dicom, from_nifti = read_image(tmp_path / "dcm"), read_image(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-5)


def test_real_chest_ct(chest_ct_dir):
    vol = read_image(chest_ct_dir)
    assert vol.shape == (512, 512, 64)
    assert vol.spacing[0] == pytest.approx(0.84, abs=0.01)
    assert vol.spacing[1] == pytest.approx(0.84, abs=0.01)
    assert vol.spacing[2] == pytest.approx(5.0, abs=0.01)
    corner = vol.array[5:40, 5:40, 32]  # air outside the patient
    assert corner.mean() == pytest.approx(-1000, abs=50)
    # soft tissue: the densest 25 HU bin between fat/lung (-200) and bone (300) is in 0..100 HU
    tissue = vol.array[(vol.array >= -200) & (vol.array < 300)]
    counts, edges = np.histogram(tissue, bins=np.arange(-200, 301, 25))
    assert 0 <= edges[np.argmax(counts)] < 100
    assert vol.array.min() >= -1100 and vol.array.max() > 300  # HU = stored - 1024, bone present


# --------------------------------------------------------------------------- labels


def _image(tmp_path) -> Volume:
    hu = np.linspace(-1000, 100, 6 * 7 * 4, dtype=np.float32).reshape(6, 7, 4)
    write_nifti(tmp_path / "img.nii.gz", hu, _oblique_affine())
    return read_image(tmp_path / "img.nii.gz")


def test_label_read_on_grid(tmp_path):
    ref = _image(tmp_path)
    lab = np.zeros((6, 7, 4), np.uint8)
    lab[1:3, 2:5, 1] = 3
    write_nifti(tmp_path / "lab.nii.gz", lab, _oblique_affine())
    vol = read_label(tmp_path / "lab.nii.gz", ref)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, lab)


def test_label_float_with_integer_values_is_accepted(tmp_path):
    ref = _image(tmp_path)
    lab = np.zeros((6, 7, 4), np.float32)
    lab[0, 0, 0] = 2.0
    write_nifti(tmp_path / "lab.nii.gz", lab, _oblique_affine())
    assert read_label(tmp_path / "lab.nii.gz", ref).array[0, 0, 0] == 2


def test_label_non_integer_values(tmp_path):
    ref = _image(tmp_path)
    lab = np.zeros((6, 7, 4), np.float32)
    lab[0, 0, 0] = 1.5
    write_nifti(tmp_path / "lab.nii.gz", lab, _oblique_affine())
    with pytest.raises(DataError, match="non-integer values.*1.5") as exc:
        read_label(tmp_path / "lab.nii.gz", ref)
    assert exc.value.path.endswith("lab.nii.gz")


def test_label_shape_mismatch_names_both_files(tmp_path):
    ref = _image(tmp_path)
    write_nifti(tmp_path / "lab.nii.gz", np.zeros((6, 7, 5), np.uint8), _oblique_affine())
    with pytest.raises(DataError, match=r"shape \(6, 7, 5\).*\(6, 7, 4\).*img.nii.gz") as exc:
        read_label(tmp_path / "lab.nii.gz", ref)
    assert exc.value.path.endswith("lab.nii.gz")


def test_label_affine_mismatch(tmp_path):
    ref = _image(tmp_path)
    shifted = _oblique_affine()
    shifted[0, 3] += 0.5
    write_nifti(tmp_path / "lab.nii.gz", np.zeros((6, 7, 4), np.uint8), shifted)
    with pytest.raises(DataError, match=r"affine differs.*img.nii.gz.*0\.5 mm"):
        read_label(tmp_path / "lab.nii.gz", ref)
    assert read_label(tmp_path / "lab.nii.gz", ref, atol_mm=0.6).shape == (6, 7, 4)


def test_missing_label_file(tmp_path):
    with pytest.raises(DataError, match="label file not found"):
        read_label(tmp_path / "nope.nii.gz", _image(tmp_path))


# --------------------------------------------------------------------------- bad images


def test_missing_image(tmp_path):
    with pytest.raises(DataError, match="image not found") as exc:
        read_image(tmp_path / "nope.nii.gz")
    assert exc.value.path.endswith("nope.nii.gz")


def test_truncated_nifti_gz(tmp_path):
    path = tmp_path / "ct.nii.gz"
    write_nifti(path, np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32),
                np.eye(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated|cannot read NIfTI") as exc:
        read_image(path)
    assert exc.value.path == str(path)


def test_garbage_nifti(tmp_path):
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 3))
    with pytest.raises(DataError, match="NIfTI"):
        read_image(path)


def test_nan_intensities(tmp_path):
    array = np.zeros((4, 4, 4), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    write_nifti(tmp_path / "ct.nii", array, np.eye(4))
    with pytest.raises(DataError, match="2 NaN or infinite"):
        read_image(tmp_path / "ct.nii")


def test_non_3d_nifti(tmp_path):
    write_nifti(tmp_path / "ct.nii", np.zeros((4, 4, 4, 2), np.float32), np.eye(4))
    with pytest.raises(DataError, match="expected a 3D volume"):
        read_image(tmp_path / "ct.nii")


def test_dicom_two_series_mixed(tmp_path):
    stored = _stored()
    write_dicom_series(tmp_path / "s", stored[:4], series_uid="1.2.3.4")
    write_dicom_series(tmp_path / "s", stored[4:], series_uid="1.2.3.5", file_order=np.arange(4, 8))
    with pytest.raises(DataError, match=r"2 DICOM series mixed.*1\.2\.3\.4, 1\.2\.3\.5") as exc:
        read_image(tmp_path / "s")
    assert exc.value.path == str(tmp_path / "s")


def test_dicom_missing_slice(tmp_path):
    paths = write_dicom_series(tmp_path / "s", _stored(), step=2.5)
    paths[3].unlink()
    with pytest.raises(DataError, match=r"uneven slice spacing: gap of 5\.000 mm.*steps 2\.500 mm"):
        read_image(tmp_path / "s")


def test_dicom_without_pixel_data(tmp_path):
    import pydicom

    paths = write_dicom_series(tmp_path / "s", _stored())
    ds = pydicom.dcmread(paths[2])
    del ds.PixelData
    ds.save_as(paths[2])
    with pytest.raises(DataError, match="no pixel data") as exc:
        read_image(tmp_path / "s")
    assert exc.value.path == str(paths[2])


def test_dicom_without_decoder_names_transfer_syntax(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate

    paths = write_dicom_series(tmp_path / "s", _stored()[:2])
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom has no decoder
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(DataError, match=r"no decoder for transfer syntax .*1\.2\.840\.10008\.1\.2\.4\.100"):
        read_image(tmp_path / "s")


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM files"):
        read_image(tmp_path / "empty")
