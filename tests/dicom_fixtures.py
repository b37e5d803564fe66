"""Write small CT DICOM series with pydicom, for reader tests.

Geometry convention (DICOM, LPS): pixel (row r, column c) of slice k sits at
``origin + c * col_spacing * row_cos + r * row_spacing * col_cos + k * step * normal``,
``normal = row_cos x col_cos``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_dicom_series(
    folder: Path,
    stored: np.ndarray,
    *,
    origin: tuple[float, float, float] = (-20.0, -30.0, 100.0),
    row_cos: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col_cos: tuple[float, float, float] = (0.0, 1.0, 0.0),
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    step: float = 2.5,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    file_order: np.ndarray | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    positions: list[np.ndarray] | None = None,
    rescale: bool = True,
    signed: bool = False,
    modality: str = "CT",
    extra: dict | None = None,
) -> list[Path]:
    """Write ``stored`` ``(Z, Rows, Columns)`` uint16 as one file per slice under ``folder``.

    ``file_order[k]`` gives the file number of slice k (names ``img_{n:03d}.dcm``), so a
    permutation writes the series in shuffled file-name order. ``positions`` overrides the
    ImagePositionPatient of each slice (to make gaps). ``rescale=False`` leaves out
    RescaleSlope/RescaleIntercept; ``signed`` stores int16 (PixelRepresentation 1); ``extra``
    sets further attributes by keyword (e.g. ``GantryDetectorTilt``). Returns the written
    paths by slice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    nz, rows, cols = stored.shape
    row_cos_a, col_cos_a = np.asarray(row_cos, float), np.asarray(col_cos, float)
    normal = np.cross(row_cos_a, col_cos_a)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    file_order = np.arange(nz) if file_order is None else np.asarray(file_order)
    paths = []
    for k in range(nz):
        pos = (np.asarray(origin, float) + k * step * normal) if positions is None else positions[k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.PatientName = "Test^Phantom"
        ds.InstanceNumber = int(file_order[k]) + 1
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos_a, *col_cos_a)]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = float(step)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        if rescale:
            ds.RescaleSlope = float(slope)
            ds.RescaleIntercept = float(intercept)
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        dtype = np.int16 if signed else np.uint16
        ds.PixelData = np.ascontiguousarray(stored[k].astype(dtype)).tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = folder / f"img_{int(file_order[k]):03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def edit_dicom(paths: list[Path], **attributes) -> None:
    """Set DICOM attributes by keyword on already written files (``None`` deletes one)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


def write_rtstruct(path: Path, series_uid: str | None = None) -> Path:
    """Write a minimal RT Structure Set file (no pixel data, no geometry) at ``path``."""
    from pydicom.uid import RTStructureSetStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientName = "Test^Phantom"
    ds.StructureSetLabel = "organs"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
