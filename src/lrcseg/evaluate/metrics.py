"""Per-case, per-organ Dice and HD95 (mm) with MONAI metrics, aggregation and tables.

Metrics are computed on each case's ORIGINAL voxel grid with its voxel spacing
``(sx, sy, sz)`` in mm, never on the resampled network grid.

For one organ with binary masks ``P`` (prediction) and ``R`` (reference):

- ``Dice = 2 |P & R| / (|P| + |R|)`` (``monai.metrics.compute_dice``).
- ``HD95`` = the larger of the two directed 95th-percentile surface distances in mm between
  the boundary voxels of ``P`` and ``R`` (``monai.metrics.compute_hausdorff_distance`` with
  ``percentile=95`` and the spacing).

Organ status per case:

======================  =================  ============  =====================================
status                  P empty / R empty  dice          hd95_mm
======================  =================  ============  =====================================
``"evaluated"``         no / no            MONAI         MONAI
``"missed"``            yes / no           0             cap
``"false_positive"``    no / yes           0             cap
``"absent_both"``       yes / yes          None          None (excluded from means)
======================  =================  ============  =====================================

**HD95 cap.** A distance to an empty mask is undefined, so missed organs and pure false
positives get ``hd95_mm = cap`` with ``cap = sqrt((X sx)^2 + (Y sy)^2 + (Z sz)^2)``, the
diagonal of the volume's physical extent in mm. No two voxels of the volume are further apart,
so the cap is never better than any real HD95 on that case: a miss is always penalised at least
as much as the worst possible detection. (It varies with the field of view; a fixed constant
such as 373 mm would not, but would reward misses on very large volumes.)

Means: per organ over the cases where that organ is not ``absent_both`` (the ``"evaluated"``
count includes missed organs and false positives, which enter the mean with Dice 0 and the cap);
``mean_dice`` is the mean of the per-organ mean Dice over organs evaluated at least once.

A Dice of 0 is a real miss, never a broken model: label maps hold whole numbers (NaN, inf and
fractions are refused), and a model whose weights or logits are NaN or inf is refused when it is
loaded or run (``lrcseg.models.load``), before anything reaches these functions.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from lrcseg.io_utils import atomic_write_json

STATUSES = ("evaluated", "missed", "false_positive", "absent_both")


def hd95_cap_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the volume's physical extent, ``sqrt(sum_i (n_i s_i)^2)`` in mm."""
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing,
                                                                           strict=True))))


def _check_organs(organs: Mapping[str, int]) -> dict[str, int]:
    """Drop background (id 0); ids must be unique positive integers."""
    out = {str(k): int(v) for k, v in organs.items() if int(v) != 0}
    if not out:
        raise ValueError(f"organs {dict(organs)} has no foreground label (id > 0)")
    if any(v < 0 for v in out.values()):
        raise ValueError(f"organ ids must be >= 0, got {out}")
    if len(set(out.values())) != len(out):
        raise ValueError(f"organ ids must be unique, got {out}")
    return out


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``a | b`` grown by one voxel (clamped): boundaries and distances inside
    it are exactly those of the whole volume, at a fraction of the cost."""
    coords = np.nonzero(a | b)
    return tuple(slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n))
                 for c, n in zip(coords, a.shape, strict=True))


def _dice_hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """MONAI Dice and HD95 (mm) of two non-empty boolean masks ``(X, Y, Z)``."""
    box = _union_box(pred, ref)
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None].float()
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None].float()
    dice = compute_dice(p, r, include_background=True)
    with warnings.catch_warnings():  # MONAI's own internal deprecation notice, not ours
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                        spacing=[float(s) for s in spacing])
    return float(dice[0, 0]), float(hd[0, 0])


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 organs: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Dice, HD95 (mm) and status of every organ of one case.

    pred, ref: integer label maps ``(X, Y, Z)`` on the same (original) grid; a float map must
    hold whole numbers (ValueError otherwise: NaN would match no organ and score as Dice 0).
    spacing: voxel size ``(sx, sy, sz)`` in mm. organs: ``{name: id}`` (id 0 is ignored).
    Returns ``{organ: {"dice": float | None, "hd95_mm": float | None, "status": str}}`` with
    status one of :data:`STATUSES` (see the module docstring for the rules and the cap).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or any(not s > 0 for s in spacing):
        raise ValueError(f"Illegal spacing {spacing} for a {pred.ndim}D volume: need "
                         f"{pred.ndim} values > 0")
    for name, labels in (("prediction", pred), ("reference", ref)):
        if labels.dtype.kind == "f" and not (np.isfinite(labels).all()
                                             and np.array_equal(labels, np.round(labels))):
            raise ValueError(f"{name} must hold integer label ids, not NaN, inf or fractions "
                             "(take the argmax of probabilities or logits first)")
    organs = _check_organs(organs)
    cap = hd95_cap_mm(pred.shape, spacing)
    out: dict[str, dict[str, Any]] = {}
    for name, label in organs.items():
        p, r = pred == label, ref == label
        has_p, has_r = bool(p.any()), bool(r.any())
        if has_p and has_r:
            dice, hd = _dice_hd95(p, r, spacing)
            out[name] = {"dice": dice, "hd95_mm": hd, "status": "evaluated"}
        elif has_r:
            out[name] = {"dice": 0.0, "hd95_mm": cap, "status": "missed"}
        elif has_p:
            out[name] = {"dice": 0.0, "hd95_mm": cap, "status": "false_positive"}
        else:
            out[name] = {"dice": None, "hd95_mm": None, "status": "absent_both"}
    return out


class SegmentationMetrics:
    """Accumulate :func:`case_metrics` over cases and reduce to the ``metrics.json`` shape.

    organs: ``{name: id}`` (background, id 0, is dropped). Usage::

        m = SegmentationMetrics({"liver": 1, "spleen": 2})
        m.add("case_001", pred, ref, spacing)   # (X, Y, Z) integer maps on the original grid
        result = m.result()
    """

    def __init__(self, organs: Mapping[str, int]):
        self.organs = _check_organs(organs)
        self._cases: dict[str, dict[str, dict[str, Any]]] = {}

    def add(self, case_id: str, pred: np.ndarray, ref: np.ndarray,
            spacing: Sequence[float]) -> dict[str, dict[str, Any]]:
        """Score one case; returns its :func:`case_metrics` dict. Case ids must be unique."""
        if case_id in self._cases:
            raise ValueError(f"case {case_id!r} was already added")
        metrics = case_metrics(pred, ref, spacing, self.organs)
        self._cases[case_id] = metrics
        return metrics

    def __len__(self) -> int:
        return len(self._cases)

    def result(self) -> dict[str, Any]:
        """``{"cases": {id: {organ: {"dice", "hd95_mm"}}}, "mean": {organ: {"dice", "hd95_mm"}},
        "mean_dice": float, "organs": [names], "counts": {organ: {"absent_both", "missed",
        "false_positive", "evaluated"}}}``.

        ``mean`` averages over cases where the organ is not absent from both (None if it never
        is); ``counts["evaluated"]`` is that number of cases (it includes missed and false
        positives); ``mean_dice`` is the mean over organs with a mean (NaN if none).
        """
        names = list(self.organs)
        cases = {cid: {o: {"dice": m[o]["dice"], "hd95_mm": m[o]["hd95_mm"]} for o in names}
                 for cid, m in self._cases.items()}
        mean: dict[str, dict[str, float | None]] = {}
        counts: dict[str, dict[str, int]] = {}
        for o in names:
            statuses = [m[o]["status"] for m in self._cases.values()]
            scored = [m[o] for m in self._cases.values() if m[o]["status"] != "absent_both"]
            counts[o] = {
                "absent_both": statuses.count("absent_both"),
                "missed": statuses.count("missed"),
                "false_positive": statuses.count("false_positive"),
                "evaluated": len(scored),
            }
            mean[o] = {
                "dice": float(np.mean([s["dice"] for s in scored])) if scored else None,
                "hd95_mm": float(np.mean([s["hd95_mm"] for s in scored])) if scored else None,
            }
        organ_means = [mean[o]["dice"] for o in names if mean[o]["dice"] is not None]
        mean_dice = float(np.mean(organ_means)) if organ_means else float("nan")
        return {"cases": cases, "mean": mean, "mean_dice": mean_dice, "organs": names,
                "counts": counts}


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of :meth:`SegmentationMetrics.result`: one row per organ (mean Dice,
    mean HD95, counts), then a row with ``mean_dice``."""
    lines = ["| organ | Dice | HD95 (mm) | evaluated | missed | false pos. | absent both |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    counts = result.get("counts", {})
    for organ in result["organs"]:
        m = result["mean"][organ]
        c = counts.get(organ, {})
        lines.append(f"| {organ} | {_fmt(m['dice'], 3)} | {_fmt(m['hd95_mm'], 1)} | "
                     f"{c.get('evaluated', '')} | {c.get('missed', '')} | "
                     f"{c.get('false_positive', '')} | {c.get('absent_both', '')} |")
    lines.append(f"| **mean** | {_fmt(result['mean_dice'], 3)} |  |  |  |  |  |")
    return "\n".join(lines) + "\n"


def _finite_or_none(obj: Any) -> Any:
    """Replace NaN/inf floats by None, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_metrics(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``result`` as JSON atomically; NaN and infinities become ``null``."""
    atomic_write_json(path, _finite_or_none(dict(result)))
