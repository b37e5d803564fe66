"""Case selection: held-out cases never reach pre-training or fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lrcseg.data.layouts import load_dataset
from lrcseg.data.readers import write_nifti
from lrcseg.data.splits import (
    choose_labelled,
    held_out_ids,
    pretraining_cases,
    split_cases,
    supervised_cases,
)
from lrcseg.errors import ConfigError

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def _nii(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(path, np.zeros((4, 4, 2), np.float32), np.eye(4))


@pytest.fixture
def root(tmp_path) -> Path:
    """imagesTr a..e (labelled), imagesTs t (labelled); splits pretrain a,b / train c,d / val e."""
    root = tmp_path / "Dataset001_Toy"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 5,
        "file_ending": ".nii.gz"}))
    for cid in "abcde":
        _nii(root / "imagesTr" / f"{cid}_0000.nii.gz")
        _nii(root / "labelsTr" / f"{cid}.nii.gz")
    _nii(root / "imagesTs" / "t_0000.nii.gz")
    _nii(root / "labelsTs" / "t.nii.gz")
    (root / "splits.json").write_text(json.dumps(
        {"pretrain": ["a", "b"], "train": ["c", "d"], "val": ["e"]}))
    return root


def test_each_stage_takes_its_split_and_never_a_held_out_case(root):
    ds = load_dataset(root)
    assert held_out_ids(ds) == {"e", "t"}
    cases, sources = pretraining_cases([str(root)])
    assert [c.id for c in cases] == ["a", "b"] and sources[0]["cases"] == ["a", "b"]
    cases, _, num_classes = supervised_cases(str(root))
    assert [c.id for c in cases] == ["c", "d"] and num_classes == 3
    chosen = choose_labelled(ds, 1, split_seed=0)
    assert chosen["candidates"] == ["c", "d"] and chosen["test"] == ["e", "t"]
    assert chosen["labeled"] in (["c"], ["d"])
    assert chosen == choose_labelled(ds, 1, split_seed=0)
    assert [c.id for c in split_cases(ds, "val")] == ["e"]
    assert [c.id for c in split_cases(ds, "test")] == ["t"]


def test_refusals_name_the_problem(root):
    ds = load_dataset(root)
    with pytest.raises(ConfigError, match="--labeled 3 but only 2"):
        choose_labelled(ds, 3, split_seed=0)
    with pytest.raises(ConfigError, match="no split 'nope'"):
        split_cases(ds, "nope")
    (root / "splits.json").write_text(json.dumps({"val": list("abcde")}))
    with pytest.raises(ConfigError, match="no pre-training cases"):
        pretraining_cases([str(root)])
