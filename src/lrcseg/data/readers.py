"""Read CT volumes and label maps into one canonical orientation (RAS+), write NIfTI.

Every reader returns a :class:`Volume`: an ``(X, Y, Z)`` array in nibabel's closest canonical
orientation (+x patient Right, +y Anterior, +z Superior) and the 4x4 affine mapping voxel
indices ``(i, j, k, 1)`` to RAS millimetres. Images are float32 Hounsfield units; labels are
integer ids on the image grid.

Sources:
- NIfTI (``.nii``, ``.nii.gz``) via nibabel.
- A DICOM series folder via pydicom: one SeriesInstanceUID, slices ordered by the projection
  of ImagePositionPatient on the slice normal ``n = row_cos x col_cos`` (never by file name),
  HU = stored * RescaleSlope + RescaleIntercept, the slice step taken from the positions. The
  affine is built in DICOM's LPS frame, ``A_lps[:, 0] = row_cos * dc`` (along a row, i.e. the
  column index), ``A_lps[:, 1] = col_cos * dr``, ``A_lps[:, 2] = (P_last - P_first) / (Z - 1)``,
  translation ``P_first``, then converted to RAS with ``diag(-1, -1, 1)`` and canonicalised.

Compressed transfer syntaxes: RLE is decoded by pydicom itself; JPEG (lossless), JPEG-LS and
JPEG 2000 use pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg (installed with lrcseg).
A syntax no installed decoder handles gives an error naming the transfer syntax.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from lrcseg.errors import DataError
from lrcseg.io_utils import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative tolerance on the slice step before a series counts as unevenly spaced.
_SPACING_RTOL = 0.05


@dataclass
class Volume:
    """A 3D volume in RAS+ canonical orientation.

    array: ``(X, Y, Z)``; float32 HU for images, an integer dtype for labels.
    affine: ``(4, 4)`` float64, voxel index -> RAS mm.
    path: the file or DICOM folder it was read from.
    source_affine: for a NIfTI file, its own affine before canonicalisation (its voxel order),
        so outputs can be written on exactly the input's grid; None for DICOM series.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    source_affine: np.ndarray | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm: the column norms of ``affine[:3, :3]``."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.array.shape)


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A ``.dcm`` file or any file with the ``DICM`` magic at byte 128."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | os.PathLike) -> Volume:
    """Read a CT image: a ``.nii``/``.nii.gz`` file or a DICOM series folder.

    Returns a :class:`Volume` with a float32 ``(X, Y, Z)`` HU array in RAS+ orientation.
    Raises DataError naming the file for anything unreadable, non-3D or non-finite.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "image not found")
    if path.is_dir():
        vol = read_dicom_series(path)
    elif is_nifti(path):
        img, source_affine = _load_nifti(path, return_source_affine=True)
        try:
            array = np.asarray(img.get_fdata(dtype=np.float32))
        except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
            raise DataError(path, f"corrupt or truncated NIfTI file ({exc})") from exc
        vol = Volume(array, img.affine.astype(np.float64), path, source_affine)
    elif is_dicom_file(path):
        raise DataError(path, "a single DICOM file: pass the folder holding the whole series")
    else:
        raise DataError(path, "not a NIfTI file (.nii, .nii.gz) or DICOM series folder")
    _check_finite(vol.array, path)
    return vol


def read_label(path: str | os.PathLike, reference: Volume, atol_mm: float = 1e-3) -> Volume:
    """Read an integer label map (NIfTI) and check it lies on ``reference``'s grid.

    The label is canonicalised like the image, then its shape must equal the reference's and
    its affine must match within ``atol_mm`` (elementwise). Non-integer values raise DataError.
    Returns a Volume whose array is int16 (int32 if ids exceed the int16 range).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "label file not found")
    if not is_nifti(path):
        raise DataError(path, "labels must be NIfTI files (.nii, .nii.gz)")
    img = _load_nifti(path)
    try:
        raw = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(path, f"corrupt or truncated NIfTI file ({exc})") from exc
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            raise DataError(path, "label map contains NaN or infinite values")
        if not np.array_equal(raw, np.round(raw)):
            bad = raw[raw != np.round(raw)]
            raise DataError(path, f"label map has non-integer values (e.g. {float(bad.flat[0]):g})")
    elif raw.dtype.kind not in "iub":
        raise DataError(path, f"label map has unsupported data type {raw.dtype}")
    lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
    if lo < 0:
        raise DataError(path, f"label map has negative value {lo}")
    dtype = np.int16 if hi <= np.iinfo(np.int16).max else np.int32
    array = raw.astype(dtype)
    affine = img.affine.astype(np.float64)
    if array.shape != reference.array.shape:
        raise DataError(path, f"label shape {array.shape} does not match image shape "
                              f"{reference.array.shape} of {reference.path}")
    if not np.allclose(affine, reference.affine, atol=atol_mm, rtol=0):
        diff = float(np.abs(affine - reference.affine).max())
        raise DataError(path, f"label affine differs from the affine of image {reference.path} "
                              f"by up to {diff:.4g} mm (tolerance {atol_mm:g} mm)")
    return Volume(array, affine, path)


def to_source_grid(array: np.ndarray, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """``array`` on ``volume``'s canonical grid -> (array, affine) in the input file's own voxel
    order and affine (identity for DICOM series and already-canonical files)."""
    if volume.source_affine is None:
        return array, volume.affine
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(volume.affine),
        nib.orientations.io_orientation(volume.source_affine))
    return nib.orientations.apply_orientation(array, transform), volume.source_affine


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
                dtype: np.dtype | type | str | None = None) -> None:
    """Write ``array`` ``(X, Y, Z)`` with its voxel -> RAS ``affine`` as NIfTI, atomically.

    ``dtype`` None keeps the array's type, except bool -> uint8 and 64-bit integers -> int32
    (NIfTI readers often reject int64). qform and sform both hold ``affine`` (code 1, scanner).
    """
    array = np.asarray(array)
    if dtype is None:
        if array.dtype == bool:
            dtype = np.uint8
        elif array.dtype.kind in "iu" and array.dtype.itemsize == 8:
            dtype = np.int32
        else:
            dtype = array.dtype
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {affine.shape}")
    img = nib.Nifti1Image(array.astype(dtype, copy=False), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(dtype)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


# --------------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path, return_source_affine: bool = False):
    """Load, check dimensionality and canonicalise (header-level: no pixel data decoded yet).

    Returns the canonical image, and with ``return_source_affine`` also the file's own affine.
    """
    try:
        img = nib.load(path)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError) as exc:
        raise DataError(path, f"cannot read NIfTI file ({exc})") from exc
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise DataError(path, f"expected a 3D volume, got shape {shape}")
    canonical = nib.as_closest_canonical(img)
    return (canonical, img.affine.astype(np.float64)) if return_source_affine else canonical


def _check_finite(array: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(array)):
        n = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise DataError(path, f"image contains {n} NaN or infinite values")


# --------------------------------------------------------------------------- DICOM


def list_dicom_files(folder: Path) -> list[Path]:
    """Files of ``folder`` (not recursive) that look like DICOM (``.dcm`` or DICM magic)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
                  and is_dicom_file(p))


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read one DICOM series folder into a RAS+ float32 HU :class:`Volume` (see module doc)."""
    folder = Path(folder)
    files = list_dicom_files(folder)
    if not files:
        raise DataError(folder, "no DICOM files in folder")
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise DataError(f, f"cannot read DICOM file ({exc})") from exc
        headers.append((f, ds))

    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(uids) > 1:
        shown = ", ".join(uids[:4]) + (" ..." if len(uids) > 4 else "")
        raise DataError(folder, f"{len(uids)} DICOM series mixed in one folder "
                                f"(SeriesInstanceUID {shown}); put each series in its own folder")

    for f, ds in headers:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise DataError(f, f"DICOM file lacks {tag}: cannot place it in a volume")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(f, "multi-frame DICOM is not supported; export single-frame slices")

    orient = np.array([float(v) for v in headers[0][1].ImageOrientationPatient])
    row_cos, col_cos = orient[:3], orient[3:]
    for f, ds in headers[1:]:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orient, atol=1e-4):
            raise DataError(f, f"ImageOrientationPatient differs from {headers[0][0].name}: "
                               "slices of one series must share one orientation")
    normal = np.cross(row_cos, col_cos)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions, along = positions[order], along[order]
    _check_slice_spacing(folder, headers, along)

    slices = []
    for f, _ in headers:
        ds = pydicom.dcmread(f)
        slices.append(_slice_hu(f, ds))
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise DataError(folder, f"slices of different sizes {sorted(shapes)} in one series")
    # pixel_array is (Rows, Columns); index it as (column i, row j, slice k).
    array = np.stack([s.T for s in slices], axis=-1)

    row_spacing, col_spacing = (float(v) for v in headers[0][1].PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing
    affine_lps[:3, 1] = col_cos * row_spacing
    if len(headers) > 1:
        affine_lps[:3, 2] = (positions[-1] - positions[0]) / (len(headers) - 1)
    else:
        thickness = float(headers[0][1].get("SliceThickness", 1.0) or 1.0)
        affine_lps[:3, 2] = normal * thickness
    affine_lps[:3, 3] = positions[0]
    img = nib.as_closest_canonical(nib.Nifti1Image(array, _LPS_TO_RAS @ affine_lps))
    array = np.asarray(img.dataobj, dtype=np.float32)
    return Volume(array, img.affine.astype(np.float64), folder)


def _check_slice_spacing(folder: Path, headers: list, along: np.ndarray) -> None:
    """Duplicate positions or a step that deviates from the median (a missing slice) -> error."""
    if len(along) < 2:
        return
    steps = np.diff(along)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise DataError(folder, f"two slices at the same position {along[i]:.3f} mm along the "
                                f"slice normal ({headers[i][0].name}, {headers[i + 1][0].name})")
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > _SPACING_RTOL * step + 1e-3)
    if bad.size:
        i = int(bad[0])
        raise DataError(folder, f"uneven slice spacing: gap of {steps[i]:.3f} mm between "
                                f"{headers[i][0].name} and {headers[i + 1][0].name} (positions "
                                f"{along[i]:.3f} and {along[i + 1]:.3f} mm along the normal) where "
                                f"the series steps {step:.3f} mm; a slice may be missing")


def _slice_hu(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """``(Rows, Columns)`` float32 HU of one slice: stored * RescaleSlope + RescaleIntercept."""
    if "PixelData" not in ds:
        raise DataError(path, "DICOM file has no pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID", None)
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = getattr(syntax, "name", str(syntax))
        raise DataError(path, f"no decoder for transfer syntax {name} ({syntax}): the pylibjpeg "
                              "decoders installed with lrcseg do not handle it; convert the "
                              "series (e.g. gdcmconv --raw) or install a pydicom pixel "
                              "handler for it") from exc
    except (ValueError, EOFError) as exc:
        raise DataError(path, f"cannot decode pixel data ({exc})") from exc
    if pixels.ndim != 2:
        raise DataError(path, f"expected a 2D grey-level slice, got pixel array shape {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
