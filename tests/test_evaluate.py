"""Dice / HD95 on hand-built masks with known answers, statuses, aggregation, output files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lrcseg.evaluate.metrics import (
    SegmentationMetrics,
    case_metrics,
    hd95_cap_mm,
    markdown_table,
    write_metrics,
)

SHAPE = (40, 36, 30)          # non-cubic on purpose: axis mix-ups change the answers
SPACING = (0.8, 1.0, 3.0)     # anisotropic (mm)
ORGANS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
CAP = math.sqrt((40 * 0.8) ** 2 + 36.0 ** 2 + (30 * 3.0) ** 2)


def _cube(offset=(0, 0, 0), label=1, size=10, start=10) -> np.ndarray:
    vol = np.zeros(SHAPE, dtype=np.int16)
    x, y, z = (start + o for o in offset)
    vol[x:x + size, y:y + size, z:z + size] = label
    return vol


def test_cap_is_the_physical_diagonal():
    assert hd95_cap_mm(SHAPE, SPACING) == pytest.approx(CAP)
    assert hd95_cap_mm((10, 20, 5), (1.0, 0.5, 2.0)) == pytest.approx(math.sqrt(300))


@pytest.mark.parametrize(
    ("offset", "dice", "hd95"),
    [
        # shift 2 voxels along z (3 mm): overlap 10*10*8 -> Dice 0.8; the shifted faces are
        # 2 * 3 = 6 mm apart and 20% of the boundary voxels lie there -> HD95 = 6 mm
        ((0, 0, 2), 0.8, 6.0),
        # shift 3 voxels along x (0.8 mm): Dice 2*700/2000 = 0.7, HD95 = 3 * 0.8 = 2.4 mm
        ((3, 0, 0), 0.7, 2.4),
        ((0, 0, 0), 1.0, 0.0),
    ],
)
def test_offset_cubes_known_dice_and_hd95(offset, dice, hd95):
    ref = _cube()
    pred = _cube(offset)
    m = case_metrics(pred, ref, SPACING, ORGANS)
    assert m["liver"]["status"] == "evaluated"
    assert m["liver"]["dice"] == pytest.approx(dice, abs=1e-6)
    assert m["liver"]["hd95_mm"] == pytest.approx(hd95, abs=1e-5)


def test_disjoint_sheets_hd95_is_their_distance():
    """One-voxel-thick sheets 4 slices apart: every boundary distance is 4 * 3 mm."""
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    ref[5:30, 5:30, 10] = 2
    pred[5:30, 5:30, 14] = 2
    m = case_metrics(pred, ref, SPACING, {"spleen": 2})
    assert m["spleen"] == {"dice": 0.0, "hd95_mm": pytest.approx(12.0), "status": "evaluated"}


def test_absent_missed_and_false_positive():
    ref = _cube(label=1) + _cube(offset=(15, 15, 0), size=5, label=2)
    pred = _cube(label=1) + _cube(offset=(0, 0, 12), size=5, label=3)
    m = case_metrics(pred, ref, SPACING, ORGANS)
    assert set(m) == {"liver", "spleen", "kidney"}  # background dropped
    assert m["liver"]["dice"] == pytest.approx(1.0)
    assert m["spleen"] == {"dice": 0.0, "hd95_mm": pytest.approx(CAP), "status": "missed"}
    assert m["kidney"] == {"dice": 0.0, "hd95_mm": pytest.approx(CAP), "status": "false_positive"}
    none = case_metrics(np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8), SPACING, ORGANS)
    assert all(v == {"dice": None, "hd95_mm": None, "status": "absent_both"} for v in none.values())


def test_accumulator_result_shape_means_and_counts(tmp_path):
    acc = SegmentationMetrics(ORGANS)
    # case a: liver shifted (Dice 0.8, HD95 6), spleen missed, kidney absent in both
    acc.add("a", _cube((0, 0, 2)), _cube() + _cube((15, 15, 0), size=5, label=2), SPACING)
    # case b: liver perfect, spleen perfect, kidney false positive
    spleen = _cube((15, 15, 0), size=5, label=2)
    acc.add("b", _cube() + spleen + _cube((0, 0, 12), size=5, label=3), _cube() + spleen, SPACING)
    res = acc.result()
    assert set(res) == {"cases", "mean", "mean_dice", "organs", "counts"}
    assert res["organs"] == ["liver", "spleen", "kidney"]
    assert set(res["cases"]) == {"a", "b"}
    for case in res["cases"].values():
        assert set(case) == set(res["organs"])
        assert all(set(v) == {"dice", "hd95_mm"} for v in case.values())
    assert res["mean"]["liver"] == {"dice": pytest.approx(0.9), "hd95_mm": pytest.approx(3.0)}
    assert res["mean"]["spleen"] == {"dice": pytest.approx(0.5), "hd95_mm": pytest.approx(CAP / 2)}
    assert res["mean"]["kidney"] == {"dice": 0.0, "hd95_mm": pytest.approx(CAP)}
    assert res["mean_dice"] == pytest.approx((0.9 + 0.5 + 0.0) / 3)
    assert res["counts"]["kidney"] == {"absent_both": 1, "missed": 0, "false_positive": 1,
                                       "evaluated": 1}
    assert res["counts"]["spleen"] == {"absent_both": 0, "missed": 1, "false_positive": 0,
                                       "evaluated": 2}
    assert res["cases"]["a"]["kidney"] == {"dice": None, "hd95_mm": None}

    table = markdown_table(res)
    for organ in res["organs"]:
        assert f"| {organ} |" in table
    assert "| liver | 0.900 | 3.0 | 2 | 0 | 0 | 0 |" in table
    assert "0.467" in table  # mean Dice

    path = tmp_path / "out" / "metrics.json"
    write_metrics(res, path)
    loaded = json.loads(path.read_text())
    assert loaded["cases"]["a"]["kidney"] == {"dice": None, "hd95_mm": None}
    assert loaded["mean_dice"] == pytest.approx(res["mean_dice"])


def test_organ_never_present_gives_null_mean_and_nan_mean_dice_as_null(tmp_path):
    acc = SegmentationMetrics({"liver": 1})
    empty = np.zeros((4, 5, 6), np.uint8)
    acc.add("x", empty, empty, (1.0, 1.0, 1.0))
    res = acc.result()
    assert res["mean"]["liver"] == {"dice": None, "hd95_mm": None}
    assert math.isnan(res["mean_dice"])
    assert "n/a" in markdown_table(res)
    write_metrics(res, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and json.loads(text)["mean_dice"] is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), {"a": 1})
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1), {"a": 1})
    with pytest.raises(ValueError, match="foreground"):
        SegmentationMetrics({"background": 0})
    with pytest.raises(ValueError, match="unique"):
        SegmentationMetrics({"a": 1, "b": 1})
    acc = SegmentationMetrics({"a": 1})
    acc.add("c", np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 1, 1))
    with pytest.raises(ValueError, match="already"):
        acc.add("c", np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 1, 1))


def test_score_cases_relabels_the_reference_and_calls_back_in_order(tmp_path):
    from lrcseg.data.layouts import Case
    from lrcseg.data.readers import write_nifti
    from lrcseg.evaluate.run import score_cases

    affine = np.diag([*SPACING, 1.0])
    cases = []
    for case_id in ("b", "a"):
        image = tmp_path / f"{case_id}_0000.nii.gz"
        label = tmp_path / f"{case_id}.nii.gz"
        write_nifti(image, np.zeros(SHAPE, np.float32), affine)
        write_nifti(label, _cube() + _cube(label=2, start=25, size=4), affine, np.int16)
        cases.append(Case(case_id, image, label))
    seen = []

    def predict(case, image):
        assert image.array.shape == SHAPE
        return _cube()

    result = score_cases(cases, predict, {"background": 0, "organ": 1},
                         {"background": 0, "liver": 1, "spleen": 2}, {"liver": "organ"},
                         on_case=lambda case, image, ref, pred, scores: seen.append(
                             (case.id, sorted(np.unique(ref).tolist()), scores["organ"]["dice"])))
    assert seen == [("b", [0, 1], 1.0), ("a", [0, 1], 1.0)]  # spleen mapped to background
    assert result["mean"]["organ"]["dice"] == pytest.approx(1.0)
    as_read = score_cases(cases[:1], predict, {"background": 0, "liver": 1, "spleen": 2})
    assert as_read["cases"]["b"]["spleen"]["dice"] == 0.0  # reference ids scored as read
