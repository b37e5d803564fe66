"""Case selection: which cases of a dataset each stage may use.

One rule runs through all of it: held-out cases (imagesTs / datalist "test", and the
"test"/"val" lists of ``splits.json``) are never trained on, neither in pre-training nor in
fine-tuning.

    pre-training pool    splits "pretrain" if present, else every training case   pretraining_cases
    supervised source    labelled training cases ("train" split if present)        supervised_cases
    fine-tuning          K of the labelled training candidates, seeded             choose_labelled
    evaluation           the labelled cases of a named split                       split_cases
    phantom datasets     pretrain / train / test cut in case order                 make_splits
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lrcseg.data.layouts import Case, Dataset, load_dataset
from lrcseg.errors import ConfigError


def held_out_ids(dataset: Dataset) -> set[str]:
    """Cases that must never be trained on: imagesTs/"test" cases and the "test"/"val"
    lists of splits.json."""
    ids = {c.id for c in dataset.test_cases}
    for key in ("test", "val"):
        ids |= set((dataset.splits or {}).get(key, []))
    return ids


def pretraining_cases(paths: list[str]) -> tuple[list[Case], list[dict[str, Any]]]:
    """Cases for the pre-training pool from each data path.

    A dataset with a "pretrain" list in ``splits.json`` contributes those cases; otherwise all
    of its training cases (imagesTr / "training" / every volume of an unlabelled folder).
    Evaluation cases (imagesTs, splits "test"/"val") never enter the pool.
    """
    cases, sources = [], []
    for path in paths:
        ds = load_dataset(path)
        held_out = held_out_ids(ds)
        chosen = [c for c in ds.cases if c.id not in held_out]
        if ds.splits and "pretrain" in ds.splits:
            wanted = set(ds.splits["pretrain"])
            chosen = [c for c in chosen if c.id in wanted]
        cases.extend(chosen)
        sources.append({"path": str(Path(path).resolve()), "layout": ds.layout,
                        "cases": [c.id for c in chosen]})
    if not cases:
        raise ConfigError(f"no pre-training cases found in {paths}")
    return cases, sources


def supervised_cases(path: str) -> tuple[list[Case], list[dict[str, Any]], int]:
    """Labelled source cases for supervised pre-training, and the number of label ids.

    The dataset must name its labels (nnU-Net dataset.json or datalist). Its labelled training
    cases are used ("train" split only if it has ``splits.json``; test cases never).
    Returns (cases, sources, K) with K = largest label id + 1.
    """
    ds = load_dataset(path)
    if not ds.labels:
        raise ConfigError(f"{path}: --labels needs a dataset with label names "
                          "(nnU-Net dataset.json or datalist)")
    held_out = held_out_ids(ds)
    chosen = [c for c in ds.cases if c.label is not None and c.id not in held_out]
    if ds.splits and "train" in ds.splits:
        wanted = set(ds.splits["train"])
        chosen = [c for c in chosen if c.id in wanted]
    if not chosen:
        raise ConfigError(f"{path}: no labelled training cases for supervised pre-training")
    sources = [{"path": str(Path(path).resolve()), "layout": ds.layout,
                "cases": [c.id for c in chosen], "labels": ds.labels}]
    return chosen, sources, max(ds.labels.values()) + 1


def choose_labelled(dataset: Dataset, labeled: float, split_seed: int) -> dict[str, list[str]]:
    """Draw the K labelled training cases reproducibly; test cases are never candidates.

    Candidates are the dataset's "train" split if its ``splits.json`` has one, else every
    labelled training case that is not held out (imagesTs, splits "test"/"val"). ``labeled``
    >= 1 is a count, < 1 a fraction (at least one case).
    Returns {"labeled": [...], "candidates": [...], "test": [...]}.
    """
    held_out = held_out_ids(dataset)
    labelled = {c.id for c in dataset.cases if c.label is not None} - held_out
    candidates = sorted(labelled)
    if dataset.splits and "train" in dataset.splits:
        candidates = sorted(set(dataset.splits["train"]) & labelled)
    test = sorted(c.id for c in dataset.all_cases if c.id in held_out and c.label is not None)
    if not candidates:
        raise ConfigError(f"{dataset.root}: no labelled training cases to fine-tune on")
    k = int(labeled) if labeled >= 1 else max(1, int(round(labeled * len(candidates))))
    if k > len(candidates):
        raise ConfigError(f"{dataset.root}: --labeled {k} but only {len(candidates)} labelled "
                          f"training cases are available ({', '.join(candidates)})")
    order = np.random.default_rng(split_seed).permutation(len(candidates))
    return {"labeled": sorted(candidates[i] for i in order[:k]), "candidates": candidates,
            "test": test}


def split_cases(dataset: Dataset, split: str) -> list[Case]:
    """Cases of ``split``: from splits.json if the dataset has one, else imagesTs ("test") or
    imagesTr ("train"); only cases with a label can be evaluated."""
    if dataset.splits and split in dataset.splits:
        wanted = dataset.splits[split]
        by_id = {c.id: c for c in dataset.all_cases}
        cases = [by_id[i] for i in wanted if i in by_id]
    elif split == "test":
        cases = dataset.test_cases
    elif split == "train":
        cases = dataset.cases
    elif split == "all":
        cases = dataset.all_cases
    else:
        raise ConfigError(f"{dataset.root}: no split {split!r} (splits.json has "
                          f"{sorted(dataset.splits or {})})")
    cases = [c for c in cases if c.label is not None]
    if not cases:
        raise ConfigError(f"{dataset.root}: no labelled cases in split {split!r}")
    return cases


def make_splits(case_ids: list[str], pretrain_fraction: float = 0.5,
                train_fraction: float = 0.2) -> dict[str, list[str]]:
    """Standard disjoint splits: the first cases form the pre-training pool, then labelled
    training candidates, the rest test. With >= 3 cases, train and test get >= 1 case each.
    """
    if not (0 <= pretrain_fraction < 1 and 0 < train_fraction < 1
            and pretrain_fraction + train_fraction < 1):
        raise ValueError(f"Illegal split fractions pretrain={pretrain_fraction}, train={train_fraction}: "
                         "need 0 <= pretrain < 1, 0 < train < 1 and pretrain + train < 1")
    n = len(case_ids)
    n_pre = int(round(n * pretrain_fraction))
    n_train = int(round(n * train_fraction))
    if n >= 3:
        n_train = max(1, n_train)
        n_pre = min(n_pre, n - n_train - 1)
    return {"pretrain": case_ids[:n_pre], "train": case_ids[n_pre:n_pre + n_train],
            "test": case_ids[n_pre + n_train:]}
