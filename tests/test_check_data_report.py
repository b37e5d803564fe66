"""check-data's wording: the split of an unlabelled series, and the orientation of the source
beside the orientation after the reader's reorientation to RAS."""

from __future__ import annotations

import numpy as np
from dicom_fixtures import write_dicom_series

from lrcseg.cli import main
from lrcseg.data.check import check_data
from lrcseg.data.readers import write_nifti


def test_a_dicom_series_is_unlabelled_lps_reoriented_to_ras(tmp_path, capsys):
    stored = np.full((3, 6, 5), 1024, np.uint16)  # (Z, Rows, Columns)
    write_dicom_series(tmp_path / "series", stored)  # rows along +x LPS (L), columns +y (P)
    report = check_data(tmp_path / "series")
    case = report["cases"][0]
    assert case["split"] == "unlabelled"
    assert (case["source_orientation"], case["orientation"]) == ("LPS", "RAS")
    assert main(["check-data", str(tmp_path / "series")]) == 0
    table = capsys.readouterr().out
    assert "training" not in table
    assert "unlabelled" in table and "LPS -> RAS" in table


def test_nifti_source_orientation_and_labelled_training_cases(tmp_path):
    hu = np.zeros((6, 5, 4), np.float32)
    # voxel axes: x towards patient Left, y Posterior, z Inferior: an "LPI" file
    write_nifti(tmp_path / "lpi.nii.gz", hu, np.diag([-1.0, -1.0, -2.0, 1.0]))
    case = check_data(tmp_path / "lpi.nii.gz")["cases"][0]
    assert (case["source_orientation"], case["orientation"]) == ("LPI", "RAS")
    assert case["split"] == "unlabelled"
    from lrcseg.phantoms.generate import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", cases=2, seed=0, spacing_mm=(8.0, 8.0, 16.0),
                                 montage=False, pretrain_fraction=0.0, train_fraction=0.5)
    splits = {c["split"] for c in check_data(data)["cases"]}
    assert splits == {"training"}  # labelled imagesTr cases keep the word
