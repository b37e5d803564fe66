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

Checks (docs/ACCEPTED_DATA.md): images whose values cannot be CT in HU (outside
-32768..32767, or no value below 0 HU: MR, or stored values without the rescale) are refused
(DataError), and so is geometry that does not define one regular grid: a zero, negative or
non-finite voxel size or affine, voxel axes that do not span 3D; in a DICOM series, any
per-slice difference of PixelSpacing, Rows x Columns, ImageOrientationPatient,
FrameOfReferenceUID, Modality or the presence of the rescale tags, duplicate or unevenly
spaced positions, a slice off the line of the others. Oblique or sheared grids (gantry tilt),
spacing outside 0.05..50 mm, a NIfTI sform and qform that disagree, a constant image, a CT
series without RescaleSlope/RescaleIntercept whose values still look like HU, and series
skipped beside the CT series (non-CT, CT localizer) are warned about (``DataWarning``).
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
from pydicom.multival import MultiValue

from lrcseg.errors import DataError, warn_data
from lrcseg.io_utils import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative tolerance on the slice step before a series counts as unevenly spaced.
_SPACING_RTOL = 0.05
# The range of CT values in HU (16-bit signed: air -1000, padding down to -32768, metal up).
_HU_RANGE = (-32768.0, 32767.0)
# Voxel sizes outside this range (mm) are warned about: no CT scanner makes them.
_SPACING_RANGE_MM = (0.05, 50.0)
# Angles (degrees) from the scanner axes / from orthogonal axes beyond which a grid is called
# oblique / sheared.
_OBLIQUE_DEG = 1.0
_SHEAR_DEG = 0.5
# |det| of the unit voxel axis directions below which the axes do not span 3D (two axes within
# about 0.6 deg of each other, or all three within about that of one plane).
_DEGENERATE_DET = 1e-2
# sform and qform may place a corner voxel this many voxels apart before a warning.
_XFORM_AGREE_VOXELS = 0.1
# DICOM direction cosines: allowed error of their unit length and of their perpendicularity.
_COSINE_TOL = 1e-2
# A slice may sit this many pixels off the line through the first and last slice's positions.
_IN_LINE_PIXELS = 0.1
# How DICOM separates the values of a multi-valued attribute (used in messages).
_DICOM_SEP = "\\"


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
    Refuses values that cannot be CT in HU and zero spacing; warns (``DataWarning``) about
    oblique or sheared grids, absurd spacing and constant images (see module doc).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "image not found")
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti(path):
        img, source_affine = _load_nifti(path, return_source_affine=True)
        try:
            array = np.asarray(img.get_fdata(dtype=np.float32))
        except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
            raise DataError(path, f"corrupt or truncated NIfTI file ({exc})") from exc
        vol = Volume(array, img.affine.astype(np.float64), path, source_affine)
        _check_image(vol)
        return vol
    if is_dicom_file(path):
        raise DataError(path, "a single DICOM file: pass the folder holding the whole series")
    raise DataError(path, "not a NIfTI file (.nii, .nii.gz) or DICOM series folder")


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
    """Load, check dimensionality and geometry, canonicalise (header-level: no pixel data
    decoded yet). Trailing axes of length 1 (``(X, Y, Z, 1)``) are dropped. Returns the
    canonical image, and with ``return_source_affine`` also the file's own affine."""
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # header fixes: checked below instead
            img = nib.load(path)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError) as exc:
        raise DataError(path, f"cannot read NIfTI file ({exc})") from exc
    shape = img.shape
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise DataError(path, f"expected a 3D volume, got shape {shape}")
    if len(shape) > 3:
        img = img.slicer[(..., *([0] * (len(shape) - 3)))]
    _check_nifti_geometry(path, img)
    canonical = nib.as_closest_canonical(img)
    return (canonical, img.affine.astype(np.float64)) if return_source_affine else canonical


def _check_nifti_geometry(path: Path, img) -> None:
    """DataError for geometry nibabel would use silently although it is invalid: a non-finite
    sform/qform, a zero (or negative) voxel size, voxel axes that do not span 3D; a warning
    when the sform and qform place the voxels differently."""
    header = img.header
    for name in ("sform", "qform"):
        matrix, code = getattr(header, f"get_{name}")(coded=True)
        if code and not np.all(np.isfinite(matrix)):
            raise DataError(path, f"the {name} (code {int(code)}) has NaN or infinite entries: no "
                                  "valid geometry; fix the header")
    if int(header["sform_code"]) == 0:
        _check_stored_pixdim(path, img)
    affine = img.affine
    columns = np.linalg.norm(affine[:3, :3], axis=0)
    bad = [i for i, v in enumerate(columns) if not (np.isfinite(v) and v > 1e-6)]
    if bad:
        raise DataError(path, f"affine column {bad[0]} (voxel axis {'ijk'[bad[0]]}) is zero or "
                              "invalid: zero voxel spacing; fix the header's sform/qform")
    volume = abs(float(np.linalg.det(affine[:3, :3] / columns)))
    if volume < _DEGENERATE_DET:
        raise DataError(path, f"the affine's voxel axes (nearly) lie in one plane (|det| of their "
                              f"directions {volume:.2g}): not a 3D grid; fix the header's "
                              "sform/qform")
    _warn_sform_qform(path, img)


def _check_stored_pixdim(path: Path, img) -> None:
    """Without an sform the geometry comes from pixdim, where nibabel silently turns 0 into 1 mm
    and a negative size into its absolute value, so the header is re-read as stored."""
    with nib.openers.ImageOpener(path) as fh:
        stored = type(img.header).from_fileobj(fh, check=False)
    pixdim = [float(v) for v in stored["pixdim"][1:4]]
    bad = [i for i, v in enumerate(pixdim) if not (np.isfinite(v) and v > 0)]
    if bad:
        raise DataError(path, f"voxel size pixdim[{bad[0] + 1}] = {pixdim[bad[0]]:g} and no "
                              "sform: zero or invalid spacing; fix the header (pixdim or "
                              "sform)")


def _warn_sform_qform(path: Path, img) -> None:
    """Warn when both the sform and the qform are set and put a corner voxel more than
    ``_XFORM_AGREE_VOXELS`` voxels apart: nibabel (and lrcseg) use the sform, other tools the
    qform. A sheared sform, which no qform can hold, is warned about as sheared instead."""
    header = img.header
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    if not scode or not qcode or _shear_deg(sform) > _SHEAR_DEG:
        return
    corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[0] - 1)
                        for j in (0, img.shape[1] - 1) for k in (0, img.shape[2] - 1)])
    apart = float(np.linalg.norm((corners @ (sform - qform).T)[:, :3], axis=1).max())
    voxel = float(np.linalg.norm(sform[:3, :3], axis=0).min())
    if apart > _XFORM_AGREE_VOXELS * voxel:
        warn_data(path, f"sform and qform disagree: they place voxels up to {apart:.3g} mm apart "
                        f"({apart / voxel:.2g} voxels); the sform is used (as nibabel does), "
                        "tools that use the qform (ITK) see another grid")


def _check_image(vol: Volume, shear_cause: str = "sheared affine", hint: str = "") -> None:
    """Refuse values that cannot be CT in HU; warn about the grid and constant images.

    hint: appended to the refusal (e.g. why the values may be raw stored values).
    """
    array, path = vol.array, vol.path
    if array.size == 0:
        raise DataError(path, f"empty image (shape {array.shape})")
    if not np.all(np.isfinite(array)):
        n = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise DataError(path, f"image contains {n} NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < _HU_RANGE[0] or hi > _HU_RANGE[1]:
        raise DataError(path, f"intensities {lo:.6g}..{hi:.6g} cannot be CT Hounsfield units "
                              f"(CT lies within {_HU_RANGE[0]:.0f}..{_HU_RANGE[1]:.0f} HU){hint}")
    if lo == hi:
        warn_data(path, f"constant image: every voxel is {lo:g} HU")
    elif lo >= 0:
        raise DataError(path, f"intensities {lo:.6g}..{hi:.6g} have no value below 0, so they are "
                              "not CT Hounsfield units (air is -1000 HU, fat -100 HU): an MR "
                              f"image, or CT stored values without their rescale?{hint}")
    _warn_geometry(vol, shear_cause)


def _shear_deg(affine: np.ndarray) -> float:
    """How far (degrees) the affine's most skewed pair of voxel axes is from perpendicular."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    cosines = np.abs(directions.T @ directions)[np.triu_indices(3, 1)]
    return float(np.degrees(np.arcsin(np.clip(cosines.max(), 0, 1))))


def _warn_geometry(vol: Volume, shear_cause: str) -> None:
    """DataWarnings for oblique axes, non-orthogonal (sheared) axes and absurd spacing."""
    affine = vol.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    directions = affine[:3, :3] / spacing
    shear = _shear_deg(affine)
    oblique = float(np.degrees(np.arccos(np.clip(np.abs(directions).max(axis=0), 0, 1))).max())
    if shear > _SHEAR_DEG:  # a sheared grid is oblique too; one warning says it
        warn_data(vol.path, f"{shear_cause}: voxel axes meet {shear:.1f} deg off 90 deg; slices "
                            "are used as stored, so the 2D model sees sheared anatomy (resample "
                            "to an orthogonal grid first)")
    elif oblique > _OBLIQUE_DEG:
        warn_data(vol.path, f"oblique grid: voxel axes up to {oblique:.1f} deg off the scanner "
                            "axes; slices are taken along the voxel grid (not resampled to "
                            "axial), so the 2D model sees tilted slices")
    lo, hi = _SPACING_RANGE_MM
    if spacing.min() < lo or spacing.max() > hi:
        shown = " x ".join(f"{v:.4g}" for v in spacing)
        warn_data(vol.path, f"voxel spacing {shown} mm is outside {lo:g}..{hi:g} mm, which no CT "
                            "scanner makes: check the header's spacing")


# --------------------------------------------------------------------------- DICOM


def list_dicom_files(folder: Path) -> list[Path]:
    """Files of ``folder`` (not recursive) that look like DICOM (``.dcm`` or DICM magic)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
                  and is_dicom_file(p))


def dicom_modality(path: Path) -> str:
    """The Modality of one DICOM file, upper case ("" if absent or unreadable)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return ""
    return str(ds.get("Modality", "") or "").upper()


@dataclass(frozen=True)
class _Slice:
    """One file of a series with its checked geometry (DICOM LPS millimetres).

    position: ImagePositionPatient (3,); orientation: ImageOrientationPatient (6,), row then
    column direction cosines, normalised; spacing: PixelSpacing (2,), between rows then
    between columns.
    """

    path: Path
    header: pydicom.Dataset
    position: np.ndarray
    orientation: np.ndarray
    spacing: np.ndarray


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read one DICOM series folder into a RAS+ float32 HU :class:`Volume` (see module doc).

    Series that are not CT images (RTSTRUCT, SEG, SR, an MR series, a CT localizer...) beside
    the one CT series are skipped with a warning naming them; a folder without a CT series is
    refused, and so is a series whose slices do not form one regular grid
    (:func:`_check_series_grid`).
    """
    folder = Path(folder)
    headers = _ct_series(folder, _read_headers(folder))
    slices = _check_series_grid(folder, [_parse_slice(f, ds) for f, ds in headers])
    no_rescale = [s.path for s in slices
                  if "RescaleSlope" not in s.header or "RescaleIntercept" not in s.header]
    array = _stack_slices(slices)
    affine = _LPS_TO_RAS @ _affine_lps(slices)
    img = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    array = np.asarray(img.dataobj, dtype=np.float32)
    vol = Volume(array, img.affine.astype(np.float64), folder)
    tilt = slices[0].header.get("GantryDetectorTilt", None)
    shear_cause = "gantry tilt (slices do not step along the slice normal" + (
        f"; GantryDetectorTilt {float(tilt):g} deg)" if tilt not in (None, "") else ")")
    which = _files_named(no_rescale)
    hint = (f"; {which} lack RescaleSlope/RescaleIntercept: these are raw stored values; "
            "restore the rescale tags") if no_rescale else ""
    _check_image(vol, shear_cause=shear_cause, hint=hint)
    if no_rescale:
        warn_data(folder, f"CT series without RescaleSlope/RescaleIntercept ({which}): stored "
                          f"values taken as HU (their range {float(array.min()):g}.."
                          f"{float(array.max()):g} looks like HU)")
    return vol


def _read_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """``(file, header without pixels)`` of every DICOM file of ``folder``, in file-name order."""
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
    return headers


def _ct_series(folder: Path, headers: list) -> list:
    """The headers of the folder's one CT image series; others are skipped with a warning.

    A series is CT if any of its files is (files without a Modality count as CT: older exports
    omit it), unless all of them are LOCALIZER images (the scout). DataError if there is no CT
    series or more than one.
    """
    by_series: dict[str, list] = {}
    for f, ds in headers:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "") or "(none)"), []).append((f, ds))
    kinds = {uid: _series_kind(items) for uid, items in by_series.items()}
    ct = {uid: items for uid, items in by_series.items() if kinds[uid] == "CT"}
    described = ", ".join(f"{kinds[uid]} series {uid} ({len(items)} file(s), e.g. "
                          f"{items[0][0].name})" for uid, items in sorted(by_series.items())
                          if uid not in ct)
    if not ct:
        raise DataError(folder, f"no CT series in this folder, only {described}: lrcseg reads "
                                "CT images")
    if len(ct) > 1:
        uids = sorted(ct)
        shown = ", ".join(uids[:4]) + (" ..." if len(uids) > 4 else "")
        raise DataError(folder, f"{len(uids)} DICOM series mixed in one folder (all CT, "
                                f"SeriesInstanceUID {shown}); put each series in its own folder")
    if described:
        warn_data(folder, f"read the CT series, skipped {described}")
    return next(iter(ct.values()))


def _series_kind(items: list) -> str:
    """"CT" for a CT image series, "CT LOCALIZER" for a scout series, else its Modality."""
    modalities = {str(ds.get("Modality", "") or "").upper() for _, ds in items}
    if not modalities & {"CT", ""}:
        return ", ".join(sorted(modalities))
    if all(is_localizer(ds) for _, ds in items):
        return "CT LOCALIZER"
    return "CT"


def is_localizer(ds: pydicom.Dataset) -> bool:
    """Whether the header's ImageType names a LOCALIZER (scout) image."""
    value = ds.get("ImageType", None) or []
    values = [value] if isinstance(value, str) else value
    return "LOCALIZER" in [str(v).upper() for v in values]


def _parse_slice(path: Path, ds: pydicom.Dataset) -> _Slice:
    """The slice's geometry, checked: a single frame with a position, two perpendicular unit
    direction cosines and a positive pixel spacing (DataError naming the file otherwise)."""
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds:
            raise DataError(path, f"DICOM file lacks {tag}: cannot place it in a volume")
    if ds.get("NumberOfFrames") not in (None, "") and _numbers(path, ds, "NumberOfFrames", 1)[0] > 1:
        raise DataError(path, "multi-frame DICOM is not supported; export single-frame slices")
    position = _numbers(path, ds, "ImagePositionPatient", 3)
    cosines = _numbers(path, ds, "ImageOrientationPatient", 6)
    spacing = _numbers(path, ds, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise DataError(path, f"PixelSpacing {_shown(spacing, 'x')} is not positive: zero or "
                              "negative pixel size; fix the header")
    axes = cosines.reshape(2, 3)
    lengths = np.linalg.norm(axes, axis=1)
    cosine = float(axes[0] @ axes[1] / max(float(lengths.prod()), 1e-12))
    if np.any(np.abs(lengths - 1) > _COSINE_TOL) or abs(cosine) > _COSINE_TOL:
        raise DataError(path, f"ImageOrientationPatient {_shown(cosines, _DICOM_SEP)} is not two "
                              f"perpendicular unit vectors (lengths {_shown(lengths, ', ')}, "
                              f"cosine between them {cosine:.3g}): cannot place the slice")
    return _Slice(path, ds, position, (axes / lengths[:, None]).ravel(), spacing)


def _numbers(path: Path, ds: pydicom.Dataset, keyword: str, count: int) -> np.ndarray:
    """``count`` finite numbers of a numeric DICOM attribute (DataError naming the file)."""
    try:
        raw = ds[keyword].value
    except (TypeError, ValueError, OverflowError) as exc:  # pydicom converts when asked
        raise DataError(path, f"{keyword} is not readable as numbers ({exc}): cannot place the "
                              "slice in a volume; fix the header") from exc
    values = raw if isinstance(raw, list | tuple | MultiValue) else [raw]
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        numbers = np.array([])
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        shown = _DICOM_SEP.join(str(v) for v in values) if raw not in (None, "") else "(empty)"
        raise DataError(path, f"{keyword} {shown} is not {count} finite number(s): cannot place "
                              "the slice in a volume; fix the header")
    return numbers


def _shown(values: np.ndarray, sep: str) -> str:
    """Numbers as written in messages: ``0.7x0.7``, ``1\\0\\0\\0\\1\\0``."""
    return sep.join(f"{float(v) + 0.0:.6g}" for v in values)


# What every slice of one series must share, as (name, value of a slice, tolerance of numeric
# values, why). Per-slice RescaleSlope/RescaleIntercept values may differ (each slice is
# rescaled by its own), but not their presence.
_SHARED = (
    ("PixelSpacing", lambda s: s.spacing, 1e-4, "the volume has one pixel size"),
    ("Rows x Columns", lambda s: (s.header.get("Rows"), s.header.get("Columns")), 0,
     "the volume has one slice size"),
    ("ImageOrientationPatient", lambda s: s.orientation, 1e-4,
     "the volume has one slice orientation"),
    ("FrameOfReferenceUID", lambda s: str(s.header.get("FrameOfReferenceUID", "") or "(none)"), 0,
     "positions in different frames of reference cannot be compared"),
    ("Modality", lambda s: str(s.header.get("Modality", "") or "(none)").upper(), 0,
     "one series is one kind of image"),
    ("RescaleSlope/RescaleIntercept", lambda s: "present" if "RescaleSlope" in s.header
     and "RescaleIntercept" in s.header else "missing", 0,
     "slices without them cannot be converted to HU like the others; restore the tags"),
)


def _check_series_grid(folder: Path, slices: list[_Slice]) -> list[_Slice]:
    """The slices of one series must form one regular grid: the attributes of ``_SHARED``
    equal on every slice, positions along the slice normal distinct and evenly spaced, each
    where the affine puts it (on one line: a gantry tilt steps in-plane too, evenly). Returns
    the slices ordered along the normal ``n = row_cos x col_cos`` (stable). DataError naming
    the folder and the offending files and values otherwise."""
    for name, value, atol, why in _SHARED:
        _check_shared(folder, slices, name, value, atol, why)
    orient = slices[0].orientation
    normal = np.cross(orient[:3], orient[3:])
    along = np.array([s.position @ normal for s in slices])
    order = np.argsort(along, kind="stable")
    slices, along = [slices[i] for i in order], along[order]
    _check_slice_spacing(folder, slices, along)
    _check_even_grid(folder, slices, along, normal)
    return slices


def _check_shared(folder: Path, slices: list[_Slice], name: str, value, atol: float,
                  why: str) -> None:
    """DataError if ``value(slice)`` differs between slices, naming the values by count and the
    files of all but the most common one."""
    groups: list[tuple[object, list[Path]]] = []
    for s in slices:
        v = value(s)
        for g in groups:
            same = (np.allclose(g[0], v, rtol=0, atol=atol) if isinstance(v, np.ndarray)
                    else g[0] == v)
            if same:
                g[1].append(s.path)
                break
        else:
            groups.append((v, [s.path]))
    if len(groups) == 1:
        return
    groups.sort(key=lambda g: -len(g[1]))  # stable: the most common value first

    def shown(v) -> str:
        if isinstance(v, np.ndarray):
            return _shown(v, "x" if v.size == 2 else _DICOM_SEP)
        return "x".join(str(x) for x in v) if isinstance(v, tuple) else str(v)

    first, rest = groups[0], groups[1:]
    parts = [f"{shown(first[0])} on {len(first[1])} slice{'s' * (len(first[1]) != 1)}"]
    parts += [f"{shown(v)} on {len(files)} ({_files_named(files, shown=4)})" for v, files in rest]
    raise DataError(folder, f"{name} {', '.join(parts)}: the slices of one series must share "
                            f"one {name} ({why})")


def _check_slice_spacing(folder: Path, slices: list[_Slice], along: np.ndarray) -> None:
    """Duplicate positions or a step that deviates from the median (a missing slice) -> error."""
    if len(along) < 2:
        return
    steps = np.diff(along)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        more = f"; {dup.size} such pairs" if dup.size > 1 else ""
        raise DataError(folder, f"two slices at the same position {along[i]:.3f} mm along the "
                                f"slice normal ({slices[i].path.name}, "
                                f"{slices[i + 1].path.name}){more}")
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > _SPACING_RTOL * step + 1e-3)
    if bad.size:
        i = int(bad[0])
        more = f" ({bad.size} uneven gaps in all)" if bad.size > 1 else ""
        raise DataError(folder, f"uneven slice spacing: gap of {steps[i]:.3f} mm between "
                                f"{slices[i].path.name} and {slices[i + 1].path.name} (positions "
                                f"{along[i]:.3f} and {along[i + 1]:.3f} mm along the normal) where "
                                f"the series steps {step:.3f} mm{more}; a slice may be missing")


def _check_even_grid(folder: Path, slices: list[_Slice], along: np.ndarray,
                     normal: np.ndarray) -> None:
    """DataError if a slice lies off the place the volume's affine gives it, ``P_first + k *
    (P_last - P_first) / (Z - 1)``: along the normal by more than ``_SPACING_RTOL`` of the step
    (steps that drift although each is near the median), or in-plane by more than
    ``_IN_LINE_PIXELS`` pixels (a shifted slice; a gantry tilt shifts evenly and passes)."""
    if len(slices) < 3:
        return
    positions = np.array([s.position for s in slices])
    k = np.arange(len(slices))[:, None] / (len(slices) - 1)
    deviation = positions - (positions[0] + k * (positions[-1] - positions[0]))
    normal_off = np.abs(deviation @ normal)
    in_plane = np.linalg.norm(deviation - np.outer(deviation @ normal, normal), axis=1)
    step = (along[-1] - along[0]) / (len(slices) - 1)
    i = int(np.argmax(normal_off))
    if normal_off[i] > _SPACING_RTOL * step:
        steps = np.diff(along)
        raise DataError(folder, f"uneven slice spacing: {slices[i].path.name} lies "
                                f"{normal_off[i]:.3f} mm along the slice normal from its place in "
                                f"an evenly spaced series of step {step:.3f} mm (the steps drift "
                                f"from {steps.min():.3f} to {steps.max():.3f} mm)")
    tolerance = _IN_LINE_PIXELS * float(slices[0].spacing.min()) + 1e-3
    bad = np.flatnonzero(in_plane > tolerance)
    if bad.size:
        i = int(bad[np.argmax(in_plane[bad])])
        raise DataError(folder, f"ImagePositionPatient of {len(bad)} slice(s) off the line "
                                f"through the first and last slice, e.g. "
                                f"{slices[i].path.name} at {_shown(positions[i], _DICOM_SEP)} is "
                                f"{in_plane[i]:.3f} mm off it (tolerance {tolerance:.3f} mm): the "
                                "slices of one series must be stacked along one direction")


def _stack_slices(slices: list[_Slice]) -> np.ndarray:
    """The sorted slices' HU as one float32 ``(X, Y, Z)`` array, indexed (column i, row j,
    slice k): each slice's pixel_array is (Rows, Columns), hence the transpose."""
    return np.stack([_slice_hu(s.path, pydicom.dcmread(s.path)).T for s in slices], axis=-1)


def _affine_lps(slices: list[_Slice]) -> np.ndarray:
    """The (4, 4) voxel (column, row, slice) -> LPS mm affine of the sorted series (module doc);
    one slice steps its SliceThickness (1 mm if absent) along the normal."""
    first = slices[0]
    orient = first.orientation
    row_spacing, col_spacing = first.spacing
    affine = np.eye(4)
    affine[:3, 0] = orient[:3] * col_spacing
    affine[:3, 1] = orient[3:] * row_spacing
    if len(slices) > 1:
        affine[:3, 2] = (slices[-1].position - first.position) / (len(slices) - 1)
    else:
        thickness = float(first.header.get("SliceThickness", 1.0) or 1.0)
        affine[:3, 2] = np.cross(orient[:3], orient[3:]) * thickness
    affine[:3, 3] = first.position
    return affine


def _files_named(files: list[Path], shown: int = 1) -> str:
    """"a.dcm", "a.dcm and N more file(s)" or, with ``shown`` 3, "a.dcm, b.dcm, c.dcm and N
    more file(s)" ("" for none)."""
    names = ", ".join(f.name for f in files[:shown])
    return names + (f" and {len(files) - shown} more file(s)" if len(files) > shown else "")


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
