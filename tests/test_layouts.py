"""Dataset layouts, splits and label maps, on real files written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from dicom_fixtures import write_dicom_series

from lrcseg.data.labels import (
    apply_label_map,
    check_label_values,
    labelled_volumes,
    load_label_map,
)
from lrcseg.data.layouts import Case, load_dataset
from lrcseg.data.readers import write_nifti
from lrcseg.errors import ConfigError, DataError

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def _nii(path: Path, value: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(path, np.full((4, 4, 2), value, np.float32), np.eye(4))
    return path


def _nnunet(root: Path, train=("a", "b"), test=("c",), test_labels=False) -> Path:
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(train),
        "file_ending": ".nii.gz"}))
    for cid in train:
        _nii(root / "imagesTr" / f"{cid}_0000.nii.gz")
        _nii(root / "labelsTr" / f"{cid}.nii.gz")
    for cid in test:
        _nii(root / "imagesTs" / f"{cid}_0000.nii.gz")
        if test_labels:
            _nii(root / "labelsTs" / f"{cid}.nii.gz")
    return root


def test_nnunet_layout(tmp_path):
    root = _nnunet(tmp_path / "Dataset001_Toy", test_labels=True)
    ds = load_dataset(root)
    assert ds.layout == "nnunet" and ds.labels == LABELS and ds.splits is None
    assert [c.id for c in ds.cases] == ["a", "b"]
    assert ds.cases[0].image == root / "imagesTr" / "a_0000.nii.gz"
    assert ds.cases[1].label == root / "labelsTr" / "b.nii.gz"
    assert [(c.id, c.label.name) for c in ds.test_cases] == [("c", "c.nii.gz")]
    assert load_dataset(root / "dataset.json").cases == ds.cases


def test_nnunet_splits_json(tmp_path):
    root = _nnunet(tmp_path / "d")
    (root / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"]}))
    assert load_dataset(root).splits == {"train": ["a"], "val": ["b"]}
    (root / "splits.json").write_text(json.dumps({"train": ["a", "zzz"]}))
    with pytest.raises(DataError, match=r"unknown case ids \['zzz'\]") as exc:
        load_dataset(root)
    assert exc.value.path.endswith("splits.json")


def test_nnunet_missing_label_file(tmp_path):
    root = _nnunet(tmp_path / "d")
    (root / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DataError, match="missing label file for image .*b_0000.nii.gz") as exc:
        load_dataset(root)
    assert exc.value.path == str(root / "labelsTr" / "b.nii.gz")


def test_nnunet_missing_image_file(tmp_path):
    root = _nnunet(tmp_path / "d")
    (root / "imagesTr" / "a_0000.nii.gz").unlink()
    with pytest.raises(DataError, match="missing image file for label") as exc:
        load_dataset(root)
    assert exc.value.path == str(root / "imagesTr" / "a_0000.nii.gz")


def test_dataset_json_not_json(tmp_path):
    root = _nnunet(tmp_path / "d")
    (root / "dataset.json").write_text("{labels: oops")
    with pytest.raises(DataError, match="not valid JSON") as exc:
        load_dataset(root)
    assert exc.value.path == str(root / "dataset.json")


def test_dataset_json_without_labels(tmp_path):
    root = _nnunet(tmp_path / "d")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    with pytest.raises(DataError, match="no 'labels'"):
        load_dataset(root)


def test_datalist_relative_paths_and_msd_labels(tmp_path):
    _nii(tmp_path / "imgs" / "p1.nii.gz")
    _nii(tmp_path / "segs" / "p1.nii.gz")
    _nii(tmp_path / "imgs" / "p2.nii")
    (tmp_path / "lists").mkdir()
    datalist = tmp_path / "lists" / "split.json"
    datalist.write_text(json.dumps({
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "../imgs/p1.nii.gz", "label": "../segs/p1.nii.gz"}],
        "test": ["../imgs/p2.nii"]}))
    ds = load_dataset(datalist)
    assert ds.layout == "datalist" and ds.labels == {"background": 0, "liver": 1}
    assert [(c.id, c.image, c.label) for c in ds.cases] == [
        ("p1", tmp_path / "imgs" / "p1.nii.gz", tmp_path / "segs" / "p1.nii.gz")]
    assert [(c.id, c.label) for c in ds.test_cases] == [("p2", None)]


def test_datalist_missing_image(tmp_path):
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "nope.nii.gz"}]}))
    with pytest.raises(DataError, match="missing image file") as exc:
        load_dataset(datalist)
    assert exc.value.path == str(tmp_path / "nope.nii.gz")


def test_unlabelled_folder_recursive(tmp_path):
    root = tmp_path / "archive"
    _nii(root / "x.nii.gz")
    _nii(root / "sub" / "deeper" / "y.nii")
    stored = np.zeros((2, 8, 8), np.uint16)
    write_dicom_series(root / "patient1" / "series2", stored)
    magic_only = write_dicom_series(root / "patient2" / "s", stored)
    for p in magic_only:  # files without extension, found by their DICM magic
        p.rename(p.with_suffix(""))
    (root / "notes.txt").write_text("not an image")
    ds = load_dataset(root)
    assert ds.layout == "folder" and ds.labels is None
    assert [c.id for c in ds.cases] == ["patient1__series2", "patient2__s", "sub__deeper__y", "x"]
    assert ds.cases[0].image == root / "patient1" / "series2"


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no NIfTI files or DICOM series") as exc:
        load_dataset(tmp_path / "empty")
    assert exc.value.path == str(tmp_path / "empty")


def test_single_file_and_single_series(tmp_path):
    ds = load_dataset(_nii(tmp_path / "ct_07.nii.gz"))
    assert ds.layout == "single" and [c.id for c in ds.cases] == ["ct_07"]
    write_dicom_series(tmp_path / "ser", np.zeros((2, 8, 8), np.uint16))
    ds = load_dataset(tmp_path / "ser")
    assert ds.layout == "single" and ds.cases[0].image == tmp_path / "ser"


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nothing")


def test_apply_label_map():
    dataset = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "tumour": 4}
    model = {"background": 0, "spleen": 1, "liver": 2, "kidney": 3}
    lab = np.array([[0, 1, 2], [3, 4, 1]], np.uint8)
    out = apply_label_map(lab, dataset, model, {"kidney_left": "kidney", "4": "liver"})
    np.testing.assert_array_equal(out, [[0, 2, 1], [3, 2, 2]])
    assert out.dtype == np.int16
    # without a mapping: same names map, the rest becomes background
    np.testing.assert_array_equal(apply_label_map(lab, dataset, model), [[0, 2, 1], [0, 0, 2]])
    with pytest.raises(ConfigError, match="'pancreas' is not a model label"):
        apply_label_map(lab, dataset, model, {"liver": "pancreas"})
    with pytest.raises(ValueError, match=r"\[9\]"):
        apply_label_map(np.array([9]), dataset, model)


def test_load_label_map_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"1": "liver", "spleen": "spleen"}))
    assert load_label_map(path) == {"1": "liver", "spleen": "spleen"}
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object") as exc:
        load_label_map(path)
    assert exc.value.path == str(path)


def test_undeclared_label_values_named():
    with pytest.raises(DataError, match=r"label values \[7\] are not declared") as exc:
        check_label_values(np.array([0, 1, 7]), LABELS, "labelsTr/a.nii.gz")
    assert exc.value.path == "labelsTr/a.nii.gz"
    check_label_values(np.array([0, 2]), LABELS, "ok.nii.gz")


def test_labelled_volumes_checks_every_case_in_order():
    class Cache:  # SliceCache's get(case), with the label volume as the case's "image"
        def get(self, case):
            return SimpleNamespace(label=case.image, case_id=case.id)

    good = [Case("a", np.array([0, 1])), Case("b", np.array([2, 0]))]
    assert [v.case_id for v in labelled_volumes(Cache(), good, LABELS)] == ["a", "b"]
    bad = Case("c", np.array([0, 3]), label=Path("labelsTr/c.nii.gz"))
    with pytest.raises(DataError, match=r"label values \[3\]") as exc:
        labelled_volumes(Cache(), [*good, bad], LABELS)
    assert exc.value.path == str(Path("labelsTr/c.nii.gz"))
