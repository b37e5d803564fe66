"""``check_data``: read every case of a dataset and report geometry, intensities and labels.

Errors are collected per case (a broken case does not stop the check of the others) as
``{"case", "file", "message"}``; warnings (``DataWarning``: data that is read but may not be
what the user means, docs/ACCEPTED_DATA.md) are listed with the case they concern. The result
is the JSON object printed by ``lrcseg check-data --json``::

    {"root", "layout", "labels": {name: id} | null,
     "cases": [{"id", "split", "image", "label", "shape": [x, y, z], "spacing_mm": [x, y, z],
                "source_orientation": "LPS", "orientation": "RAS", "intensity_min",
                "intensity_max", "labels": [ids] | null, "warnings": [{"file", "message"}]}],
     "errors": [{"case", "file", "message"}],
     "warnings": [{"case", "file", "message"}]}

Shape and spacing are after canonical (RAS+) orientation; ``source_orientation`` is the voxel
axis order of the file itself (nibabel axis codes; for a DICOM series: columns, rows, then
slices by position, as the reader stacks them) and ``orientation`` that after reorientation
(always RAS). ``split`` is "training" for a labelled case of the dataset's training part,
"unlabelled" for one without a label map (an unlabelled series is not training data for
fine-tuning) and "test" for held-out images (imagesTs). ``labels`` lists the ids present in
the case's label map (null for an unlabelled case). The top-level ``warnings`` holds those not
listed under a case in "cases" (about the dataset as a whole, or a case that failed).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from lrcseg.data.labels import check_label_values
from lrcseg.data.layouts import Case, load_dataset
from lrcseg.data.readers import Volume, is_localizer, list_dicom_files, read_image, read_label
from lrcseg.data.splits import case_phases
from lrcseg.errors import DataError, DataWarning, handle_data_warnings


def check_data(path: str | os.PathLike) -> dict:
    """Validate the dataset, NIfTI file or DICOM folder at ``path`` (see module doc)."""
    path = Path(path)
    report: dict = {"root": str(path), "layout": None, "labels": None, "cases": [], "errors": [],
                    "warnings": []}
    dataset_warnings: list[DataWarning] = []
    try:
        with handle_data_warnings(dataset_warnings.append):
            ds = load_dataset(path)
    except DataError as exc:
        report["errors"].append({"case": None, "file": exc.path, "message": exc.message})
        report["warnings"] = [_row(w, w.case) for w in dataset_warnings]
        return report
    report.update(root=str(ds.root), layout=ds.layout, labels=ds.labels)
    phases = case_phases(ds.root)  # generated phantoms record each case's contrast phase
    ids = {c.id for c in ds.all_cases}
    unplaced = [_row(w, w.case) for w in dataset_warnings if w.case not in ids]
    for split, cases in (("training", ds.cases), ("test", ds.test_cases)):
        for case in cases:
            caught = [w for w in dataset_warnings if w.case == case.id]
            if split == "training" and case.label is None:
                split = "unlabelled"
            try:
                with handle_data_warnings(caught.append):
                    entry = _check_case(case, split, ds.labels)
            except DataError as exc:
                report["errors"].append({"case": case.id, "file": exc.path, "message": exc.message})
                unplaced += [_row(w, case.id) for w in caught]
                continue
            entry["warnings"] = [{"file": w.path, "message": w.message} for w in caught]
            if phases:
                entry["phase"] = phases.get(case.id)
            report["cases"].append(entry)
    report["warnings"] = unplaced
    return report


def _row(warning: DataWarning, case: str | None) -> dict:
    return {"case": case, "file": warning.path, "message": warning.message}


def _check_case(case: Case, split: str, declared: dict[str, int] | None) -> dict:
    image = read_image(case.image)
    present = None
    if case.label is not None:
        label = read_label(case.label, image)
        if declared is not None:
            check_label_values(label.array, declared, case.label)
        present = [int(v) for v in np.unique(label.array)]
    return {
        "id": case.id,
        "split": split,
        "image": str(case.image),
        "label": None if case.label is None else str(case.label),
        "shape": list(image.shape),
        "spacing_mm": [round(s, 6) for s in image.spacing],
        "source_orientation": _source_orientation(image),
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        "intensity_min": float(image.array.min()),
        "intensity_max": float(image.array.max()),
        "labels": present,
    }


def _source_orientation(image: Volume) -> str:
    """Axis codes of the input's own voxel order, before the reader's reorientation to RAS."""
    if image.source_affine is not None:
        return "".join(nib.aff2axcodes(image.source_affine))
    if image.path.is_dir():  # DICOM: columns, rows, slices by position along their normal
        for f in list_dicom_files(image.path):
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=[
                "ImageOrientationPatient", "Modality", "ImageType"])
            if (str(ds.get("Modality", "") or "").upper() not in ("CT", "")
                    or is_localizer(ds) or "ImageOrientationPatient" not in ds):
                continue  # a series the reader skipped
            cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
            axes_lps = np.eye(4)
            axes_lps[:3, 0], axes_lps[:3, 1] = cosines[:3], cosines[3:]
            axes_lps[:3, 2] = np.cross(cosines[:3], cosines[3:])
            return "".join(nib.aff2axcodes(np.diag([-1.0, -1.0, 1.0, 1.0]) @ axes_lps))
    return "".join(nib.aff2axcodes(image.affine))


def format_report(report: dict) -> str:
    """A human-readable table of the cases, then the errors and a one-line summary."""
    header = ["case", "split", "shape (x,y,z)", "spacing mm", "orientation", "HU min..max",
              "labels"]
    rows = [[c["id"], c["split"], "x".join(map(str, c["shape"])),
             "x".join(f"{s:.3g}" for s in c["spacing_mm"]),
             f"{c['source_orientation']} -> {c['orientation']}",
             f"{c['intensity_min']:.0f}..{c['intensity_max']:.0f}",
             "-" if c["labels"] is None else ",".join(map(str, c["labels"]))]
            for c in report["cases"]]
    if any("phase" in c for c in report["cases"]):  # phantoms: the contrast phase of each case
        header.append("phase")
        for row, c in zip(rows, report["cases"], strict=True):
            row.append(c.get("phase") or "-")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"{report['root']}  layout: {report['layout'] or '?'}"]
    if report["labels"]:
        lines.append("labels: " + ", ".join(f"{i}={n}" for n, i in
                                             sorted(report["labels"].items(), key=lambda kv: kv[1])))
    if rows:
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    warnings = [{"case": c["id"], **w} for c in report["cases"] for w in c["warnings"]]
    for kind, items in (("WARNING", warnings + report["warnings"]), ("ERROR", report["errors"])):
        for e in items:
            who = f"[{e['case']}] " if e["case"] else ""
            lines.append(f"{kind} {who}{e['file']}: {e['message']}")
    if rows:
        lines.append("orientation: the file's voxel axes -> after reorientation (shape and "
                     "spacing are given after it)")
    lines.append(f"{len(report['cases'])} case(s) ok, {len(report['errors'])} error(s), "
                 f"{len(warnings) + len(report['warnings'])} warning(s)")
    return "\n".join(lines)
