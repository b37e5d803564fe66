"""Case selection: held-out cases never reach pre-training or fine-tuning; an experiment's
draws can be pairwise different labelled sets, stratified by contrast phase."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lrcseg.data.layouts import load_dataset
from lrcseg.data.readers import write_nifti
from lrcseg.data.splits import (
    case_phases,
    choose_labelled,
    distinct_labelled_sets,
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


# --------------------------------------------------------------------------- distinct draws

SIX = [f"c{i}" for i in range(6)]
#: 4 portal-venous, 2 unenhanced candidates
PHASES = {"c0": "portal_venous", "c1": "unenhanced", "c2": "portal_venous",
          "c3": "portal_venous", "c4": "unenhanced", "c5": "portal_venous"}


def _dataset(tmp_path: Path, ids: list[str]):
    """A dataset whose "train" split is ``ids`` (what choose_labelled draws from)."""
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(ids),
        "file_ending": ".nii.gz", "phantoms": {"phases": PHASES}}))
    for cid in ids:
        _nii(root / "imagesTr" / f"{cid}_0000.nii.gz")
        _nii(root / "labelsTr" / f"{cid}.nii.gz")
    (root / "splits.json").write_text(json.dumps({"train": ids}))
    return load_dataset(root)


@pytest.mark.parametrize("k, n_draws", [(1, 6), (2, 15), (3, 10)])
def test_distinct_sets_differ_pairwise_and_each_is_its_split_seeds_draw(tmp_path, k, n_draws):
    dataset = _dataset(tmp_path, SIX)
    sets = distinct_labelled_sets(SIX, k, n_draws, seed=0)
    assert len({tuple(s.cases) for s in sets}) == n_draws
    assert all(len(s.cases) == k and s.cases == sorted(s.cases) for s in sets)
    for s in sets:  # fine-tuning draws exactly this set from the split seed
        assert choose_labelled(dataset, k, s.split_seed)["labeled"] == s.cases
    assert distinct_labelled_sets(SIX, k, n_draws, seed=0) == sets  # reproducible
    assert distinct_labelled_sets(SIX, k, n_draws - 1, seed=0) == sets[:-1]  # growing keeps them
    if n_draws == 15:  # every pair once
        assert {tuple(s.cases) for s in sets} == set(itertools.combinations(SIX, 2))


def test_distinct_sets_keep_the_seeded_draws_that_were_already_different(tmp_path):
    dataset = _dataset(tmp_path, SIX)
    seeded = [choose_labelled(dataset, 1, d)["labeled"] for d in range(6)]
    first_repeat = next(i for i, s in enumerate(seeded) if s in seeded[:i])
    assert first_repeat < 6  # the seeded draws of six candidates repeat one at K = 1
    sets = distinct_labelled_sets(SIX, 1, 6)
    assert [s.cases for s in sets[:first_repeat]] == seeded[:first_repeat]
    assert [s.split_seed for s in sets[:first_repeat]] == list(range(first_repeat))


def test_phase_strata_cover_the_phases_in_proportion():
    at_k1 = distinct_labelled_sets(SIX, 1, 6, strata=PHASES)
    assert [PHASES[s.cases[0]] for s in at_k1] == ["portal_venous", "unenhanced", "portal_venous",
                                                   "portal_venous", "unenhanced", "portal_venous"]
    assert sorted(c for s in at_k1 for c in s.cases) == SIX  # each candidate once
    for n in range(1, 7):  # after every draw, as close to 2/3 portal-venous as counts allow
        pv = sum(PHASES[s.cases[0]] == "portal_venous" for s in at_k1[:n])
        assert abs(pv - 2 * n / 3) < 1
    at_k2 = distinct_labelled_sets(SIX, 2, 6, strata=PHASES)
    assert len({tuple(s.cases) for s in at_k2}) == 6
    assert Counter(PHASES[c] for s in at_k2 for c in s.cases) == {"portal_venous": 8,
                                                                   "unenhanced": 4}
    assert distinct_labelled_sets(SIX, 2, 6, strata=PHASES) == at_k2
    # Without strata the first four draws hold two unenhanced cases of four: not in proportion.
    plain = distinct_labelled_sets(SIX, 1, 4)
    assert Counter(PHASES[s.cases[0]] for s in plain)["unenhanced"] == 2
    assert Counter(PHASES[s.cases[0]] for s in at_k1[:4])["unenhanced"] == 1


def test_distinct_sets_are_refused_when_the_candidates_cannot_give_them():
    with pytest.raises(ConfigError, match="7 draws need as many different sets of K = 1 "
                                          "labelled cases, but 6 candidates give only 6"):
        distinct_labelled_sets(SIX, 1, 7)
    with pytest.raises(ConfigError, match="but 6 candidates give only 15"):
        distinct_labelled_sets(SIX, 2, 16, strata=PHASES)
    with pytest.raises(ConfigError, match="no stratum .* for labelled candidate.* c5"):
        distinct_labelled_sets(SIX, 1, 2, strata={c: p for c, p in PHASES.items() if c != "c5"})
    with pytest.raises(ConfigError, match="Illegal K 7"):
        distinct_labelled_sets(SIX, 7, 1)


def test_case_phases_read_the_phantom_record_and_nothing_else(tmp_path, root):
    dataset = _dataset(tmp_path, SIX)
    assert case_phases(dataset.root) == PHASES
    assert case_phases(dataset.root / "dataset.json") == PHASES
    assert case_phases(root) == {}  # a dataset.json without a phantom record
    assert case_phases(tmp_path / "nowhere") == {}
