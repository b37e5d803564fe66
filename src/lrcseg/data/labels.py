"""Label names, label maps and the checks of label values.

A dataset's labels are ``{name: id}`` with background 0 (``Dataset.labels``, parsed by
:mod:`lrcseg.data.layouts`). A model's classes are the dataset's labels, or with a label map
(a JSON file ``{dataset name or id: model name}``) background plus the mapped names in sorted
order (:func:`model_labels`); :func:`apply_label_map` relabels a label volume from dataset ids
to model ids. :func:`check_label_values` is the one check that a label volume holds only
declared ids; :func:`labelled_volumes` is the one way a stage reads its labelled cases.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lrcseg.data.layouts import read_json
from lrcseg.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lrcseg.data.layouts import Case
    from lrcseg.data.slice_cache import CachedVolume, SliceCache


def check_label_values(label: np.ndarray, labels: dict[str, int], path: str | os.PathLike) -> None:
    """DataError naming ``path`` if ``label`` holds ids not declared in ``labels``."""
    present = np.unique(label)
    undeclared = sorted(set(int(v) for v in present) - set(labels.values()))
    if undeclared:
        raise DataError(path, f"label values {undeclared} are not declared in dataset.json "
                              f"(declared: {sorted(labels.values())})")


def labelled_volumes(cache: SliceCache, cases: Sequence[Case],
                     labels: dict[str, int]) -> list[CachedVolume]:
    """The cached volumes of labelled ``cases``, in order, each label volume checked by
    :func:`check_label_values` against the dataset's ``labels`` (DataError naming the label
    file of the first case holding an undeclared id). Fine-tuning, the probe and supervised
    pre-training read their labelled cases through this."""
    volumes = []
    for case in cases:
        volume = cache.get(case)
        check_label_values(np.asarray(volume.label), labels, case.label)
        volumes.append(volume)
    return volumes


def load_label_map(path: str | os.PathLike) -> dict[str, str]:
    """Parse a ``--label-map`` JSON file: ``{dataset name or id: model name}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "label map file not found")
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DataError(path, "a label map must be a JSON object {dataset name or id: model name}")
    return {str(k): v for k, v in data.items()}


def label_lookup(dataset_labels: dict[str, int], model_labels: dict[str, int],
                 mapping: dict[str, str] | None = None) -> dict[int, int]:
    """Dataset id -> model id.

    A dataset label goes to ``mapping[name]`` or ``mapping[str(id)]`` if given, else to the
    model label of the same name, else to background 0. Raises ConfigError for mapping keys
    that are not dataset labels or targets that are not model labels.
    """
    mapping = dict(mapping or {})
    by_key = {**{n: i for n, i in dataset_labels.items()},
              **{str(i): i for i in dataset_labels.values()}}
    for key, target in mapping.items():
        if key not in by_key:
            raise ConfigError(f"label map: {key!r} is not a dataset label "
                              f"(known: {sorted(dataset_labels)})")
        if target not in model_labels:
            raise ConfigError(f"label map: {target!r} is not a model label "
                              f"(known: {sorted(model_labels)})")
    lut = {}
    for name, did in dataset_labels.items():
        target = mapping.get(name, mapping.get(str(did), name))
        lut[did] = model_labels.get(target, 0)
    lut[0] = 0
    return lut


def apply_label_map(label_array: np.ndarray, dataset_labels: dict[str, int],
                    model_labels: dict[str, int], mapping: dict[str, str] | None = None) -> np.ndarray:
    """Relabel ``label_array`` (any shape, dataset ids) to model ids via :func:`label_lookup`.

    Returns an int16 array of the same shape. Values not declared in ``dataset_labels`` raise
    ValueError.
    """
    lut = label_lookup(dataset_labels, model_labels, mapping)
    present = set(int(v) for v in np.unique(label_array))
    undeclared = sorted(present - set(lut))
    if undeclared:
        raise ValueError(f"label values {undeclared} are not dataset labels")
    table = np.zeros(max(lut) + 1, dtype=np.int16)
    for did, mid in lut.items():
        table[did] = mid
    return table[np.asarray(label_array, dtype=np.int64)]


def model_labels(dataset_labels: dict[str, int], label_map: str | None
                 ) -> tuple[dict[str, int], np.ndarray | None]:
    """The model's label names -> ids, and the dataset -> model id table (None = identity).

    Without a label map the model predicts the dataset's labels. With one (a JSON file
    ``{dataset name or id: model name}``) the model's classes are background plus the mapped
    names in sorted order; dataset labels that are not mapped become background.
    """
    if not label_map:
        return dict(sorted(dataset_labels.items(), key=lambda kv: kv[1])), None
    mapping = load_label_map(label_map)
    names = sorted(set(mapping.values()) - {"background"})
    labels = {"background": 0, **{name: i + 1 for i, name in enumerate(names)}}
    lut = label_lookup(dataset_labels, labels, mapping)
    table = np.zeros(max(lut) + 1, dtype=np.int64)
    for dataset_id, model_id in lut.items():
        table[dataset_id] = model_id
    return labels, table
