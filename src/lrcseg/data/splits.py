"""Case selection: which cases of a dataset each stage may use.

One rule runs through all of it: held-out cases (imagesTs / datalist "test", and the
"test"/"val" lists of ``splits.json``) are never trained on, neither in pre-training nor in
fine-tuning.

    pre-training pool    splits "pretrain" if present, else every training case   pretraining_cases
    supervised source    labelled training cases ("train" split if present)        supervised_cases
    fine-tuning          K of the labelled training candidates, seeded             choose_labelled
    an experiment's draws  pairwise different labelled sets, by stratum if asked   distinct_labelled_sets
    evaluation           the labelled cases of a named split                       split_cases
    phantom datasets     pretrain / train / test cut in case order                 make_splits
    per-case strata      contrast phase recorded by the phantom generator          case_phases
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lrcseg.data.layouts import Case, Dataset, load_dataset
from lrcseg.errors import ConfigError

#: how many split seeds ``distinct_labelled_sets`` tries for one draw before giving up
MAX_SEEDS_PER_DRAW = 1_000_000


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
    return {"labeled": _seeded_set(candidates, k, split_seed), "candidates": candidates,
            "test": test}


def _seeded_set(candidates: list[str], k: int, split_seed: int) -> list[str]:
    """The K cases ``split_seed`` draws from ``candidates`` (sorted): the first K of a seeded
    permutation."""
    order = np.random.default_rng(split_seed).permutation(len(candidates))
    return sorted(candidates[i] for i in order[:k])


class LabelledSet(NamedTuple):
    """One draw's labelled cases (sorted) and the split seed that draws them:
    ``choose_labelled(dataset, K, split_seed)["labeled"] == cases``."""

    split_seed: int
    cases: list[str]


def distinct_labelled_sets(candidates: list[str], k: int, n_draws: int, seed: int = 0,
                           strata: dict[str, str] | None = None) -> list[LabelledSet]:
    """``n_draws`` pairwise different sets of ``k`` cases, each drawn by a split seed.

    Draw n takes the first split seed from ``seed`` on (``seed``, ``seed`` + 1, ...) that draws,
    as ``choose_labelled`` does (``candidates`` sorted as it lists them), a set no earlier draw
    has. Draw n is therefore the same whatever ``n_draws`` > n: a matrix that gains draws
    keeps the sets of the ones it had; and where the seeded draws 0, 1, ... are already
    different, they are these draws.

    strata: case id -> stratum (e.g. the contrast phase, ``case_phases``) for every
    candidate. Then draw n takes the first new set whose strata keep the labelled cases of
    draws 0..n closest to each stratum's share of the candidates: the counts c_s of cases of
    stratum s over those draws minimise sum_s |c_s - (n + 1) k share_s|. At K = 1 with 4
    portal-venous and 2 unenhanced candidates, 6 draws hold each candidate once, 4 of them
    portal-venous, in the order PV, UN, PV, PV, UN, PV.
    Raises ConfigError if the candidates have fewer than ``n_draws`` sets of ``k`` cases, a
    candidate has no stratum, or ``k`` exceeds the candidates.
    """
    candidates = sorted(candidates)
    n = len(candidates)
    if not 1 <= k <= n:
        raise ConfigError(f"Illegal K {k}: between 1 and the {n} labelled candidates")
    if math.comb(n, k) < n_draws:
        raise ConfigError(f"{n_draws} draws need as many different sets of K = {k} labelled "
                          f"cases, but {n} candidates give only {math.comb(n, k)}; use fewer "
                          "draws or draw_mode seeded")
    stratum = _strata(candidates, strata)
    sizes = Counter(stratum.values())
    names = sorted(sizes)
    compositions = [c for c in itertools.product(*(range(min(k, sizes[s]) + 1) for s in names))
                    if sum(c) == k]
    used: set[tuple[str, ...]] = set()
    have = dict.fromkeys(names, 0)
    sets = []
    for draw in range(n_draws):
        wanted = _closest_compositions(compositions, names, used, stratum, sizes, have,
                                       target=(draw + 1) * k / n)
        for split_seed in range(seed, seed + MAX_SEEDS_PER_DRAW):
            cases = _seeded_set(candidates, k, split_seed)
            composition = tuple(sum(stratum[c] == s for c in cases) for s in names)
            if tuple(cases) not in used and composition in wanted:
                break
        else:
            raise ConfigError(f"draw {draw}: no new set of K = {k} labelled cases in the "
                              f"{MAX_SEEDS_PER_DRAW} split seeds from {seed}")
        used.add(tuple(cases))
        for s, count in zip(names, composition, strict=True):
            have[s] += count
        sets.append(LabelledSet(split_seed, cases))
    return sets


def _strata(candidates: list[str], strata: dict[str, str] | None) -> dict[str, str]:
    """Every candidate's stratum (one shared stratum without ``strata``)."""
    if strata is None:
        return dict.fromkeys(candidates, "")
    missing = [c for c in candidates if c not in strata]
    if missing:
        raise ConfigError(f"no stratum (contrast phase) for labelled candidate(s) "
                          f"{', '.join(missing)}")
    return {c: str(strata[c]) for c in candidates}


def _closest_compositions(compositions: list[tuple[int, ...]], names: list[str],
                          used: set[tuple[str, ...]], stratum: dict[str, str],
                          sizes: Counter, have: dict[str, int], target: float
                          ) -> set[tuple[int, ...]]:
    """The compositions (cases per stratum, in ``names`` order) with an unused set left that
    bring the counts so far (``have``) closest to ``target`` x each stratum's size."""
    def left(c: tuple[int, ...]) -> int:
        count = math.prod(math.comb(sizes[s], n) for s, n in zip(names, c, strict=True))
        taken = sum(tuple(sum(stratum[x] == s for x in cases) for s in names) == c
                    for cases in used)
        return count - taken

    def distance(c: tuple[int, ...]) -> float:
        return sum(abs(have[s] + n - target * sizes[s]) for s, n in zip(names, c, strict=True))

    open_ = [c for c in compositions if left(c) > 0]
    best = min(distance(c) for c in open_)
    return {c for c in open_ if math.isclose(distance(c), best, abs_tol=1e-9)}


def case_phases(dataset: str | Path) -> dict[str, str]:
    """Case id -> contrast phase, as the phantom generator records it in dataset.json
    (``"phantoms": {"phases": {...}}``); empty for a dataset that records none or cannot be
    read (``dataset``: the dataset folder or its dataset.json)."""
    path = Path(dataset)
    path = path if path.name == "dataset.json" else path / "dataset.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    phases = (record.get("phantoms") or {}).get("phases") if isinstance(record, dict) else None
    return {str(k): str(v) for k, v in phases.items()} if isinstance(phases, dict) else {}


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
