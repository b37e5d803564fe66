"""Evaluate a fine-tuned model on a dataset split: predictions, metrics, figures.

Kept apart from ``metrics.py`` (pure metrics) and ``predict.py`` (one volume through the
network) because it reads the dataset and orchestrates both. :func:`score_cases` is the one
loop that scores a predictor on a split's cases: ``lrcseg evaluate``, ``lrcseg probe`` and the
nnU-Net back-end's label files all go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lrcseg.data.labels import apply_label_map, load_label_map
from lrcseg.data.layouts import Case, load_dataset
from lrcseg.data.readers import Volume, read_image, read_label
from lrcseg.data.splits import split_cases
from lrcseg.errors import ConfigError
from lrcseg.evaluate.metrics import SegmentationMetrics
from lrcseg.evaluate.predict import predict_labels
from lrcseg.models.load import load_finetuned


def check_label_names(model_labels: dict[str, int], dataset_labels: dict[str, int] | None,
                      label_map: dict[str, str] | None, where: Path) -> None:
    """Refuse a dataset whose label names differ from the model's unless a label map is given."""
    if dataset_labels is None:
        raise ConfigError(f"{where}: the dataset declares no label names (dataset.json 'labels')")
    if label_map is None and set(dataset_labels) != set(model_labels):
        only_data = sorted(set(dataset_labels) - set(model_labels))
        only_model = sorted(set(model_labels) - set(dataset_labels))
        raise ConfigError(f"{where}: label names differ from the model's (only in the dataset: "
                          f"{only_data}; only in the model: {only_model}); pass --label-map")


#: a predictor: (case, its image read into RAS+) -> (X, Y, Z) model label ids on the image's grid
Predictor = Callable[[Case, Volume], np.ndarray]
#: called after each case with (case, image, reference ids, prediction, its case_metrics)
CaseHook = Callable[[Case, Volume, np.ndarray, np.ndarray, dict[str, dict]], None]


def score_cases(cases: Iterable[Case], predict: Predictor, labels: dict[str, int],
                dataset_labels: dict[str, int] | None = None,
                label_map: dict[str, str] | None = None, progress: bool = False,
                desc: str = "evaluate", on_case: CaseHook | None = None) -> dict[str, Any]:
    """Per-case, per-organ Dice/HD95 of ``predict`` on labelled ``cases``, in their order.

    Each case's image and reference are read on the original grid (``read_image``,
    ``read_label``); the reference is relabelled from ``dataset_labels`` to the model's
    ``labels`` (name -> id, background 0) with ``label_map`` (:func:`apply_label_map`), or
    scored as read when ``dataset_labels`` is None. Returns
    :meth:`SegmentationMetrics.result` over the organs of ``labels``.
    """
    metrics = SegmentationMetrics({n: i for n, i in labels.items() if i != 0})
    for case in tqdm(cases, desc=desc, disable=not progress):
        image = read_image(case.image)
        ref = read_label(case.label, image).array
        if dataset_labels is not None:
            ref = apply_label_map(ref, dataset_labels, labels, label_map)
        pred = predict(case, image)
        scores = metrics.add(case.id, pred, ref, image.spacing)
        if on_case is not None:
            on_case(case, image, ref, pred, scores)
    return metrics.result()


def evaluate_model(model_path: str | Path, dataset_path: str | Path, split: str = "test",
                   device: str | torch.device = "cpu", label_map_path: str | None = None,
                   figures_dir: Path | None = None, progress: bool = True,
                   batch_size: int = 8) -> dict[str, Any]:
    """Per-case, per-organ Dice/HD95 of the model at ``model_path`` on ``split``.

    A damaged model file, NaN or inf weights, or NaN or inf logits on any case raise DataError
    naming the model file (``load_finetuned``): such a model is refused, never scored as Dice 0.
    """
    model, meta = load_finetuned(model_path, device)
    dataset = load_dataset(dataset_path)
    label_map = load_label_map(label_map_path) if label_map_path else None
    check_label_names(meta["labels"], dataset.labels, label_map, Path(dataset_path))
    num_classes = max(meta["labels"].values()) + 1

    def predict(case: Case, image: Volume) -> np.ndarray:
        return predict_labels(model, image, meta["preprocess"], device=device,
                              batch_size=batch_size, num_classes=num_classes)

    def figure(case: Case, image: Volume, ref: np.ndarray, pred: np.ndarray,
               scores: dict[str, dict]) -> None:
        write_case_figure(figures_dir / f"{case.id}.png", image, ref, pred, meta["labels"],
                          case.id, meta["preprocess"].window_hu, case_dice(scores))

    return score_cases(split_cases(dataset, split), predict, meta["labels"], dataset.labels,
                       label_map, progress, on_case=None if figures_dir is None else figure)


def case_dice(scores: dict[str, dict]) -> float | None:
    """A case's mean Dice over the organs scored in it (those present in the reference or
    the prediction), as in its row of metrics.json; None when no organ is in either."""
    values = [s["dice"] for s in scores.values() if s["dice"] is not None]
    return float(np.mean(values)) if values else None


def write_case_figure(path: Path, image, ref: np.ndarray, pred: np.ndarray,
                      labels: dict[str, int], title: str, window_hu: tuple[float, float],
                      dice: float | None = None) -> None:
    """Overlay figure of the axial slice with the most reference foreground, shown in the
    model's HU window; the title gives the case's mean Dice and the slice position."""
    from lrcseg.viz import prediction_figure, representative_slice

    z, slice_hu = representative_slice(image.array, ref, window_hu)
    z_mm = float((image.affine @ [0.0, 0.0, float(z), 1.0])[2])
    score = "" if dice is None else f", case mean Dice {dice:.3f}"
    prediction_figure(slice_hu, ref[:, :, z], pred[:, :, z], path,
                      title=f"{title} z={z} ({z_mm:.1f} mm){score}", label_names=labels,
                      spacing_xy=image.spacing[:2], z_mm=z_mm)
