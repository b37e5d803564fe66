"""Figures a researcher can read alone: organ legend, orientation markers, mm scale bar, slice
position; the case's Dice on evaluation overlays; HD95 median and capped count in reports."""

from __future__ import annotations

import numpy as np

from lrcseg.experiment.report import HD95_CONVENTION
from lrcseg.experiment.statistics import hd95_summary
from lrcseg.viz import montage, prediction_figure

NAMES = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3}


def _slice():
    image = np.linspace(0, 1, 80 * 60).reshape(80, 60)
    labels = np.zeros((80, 60), np.int64)
    labels[10:30, 10:30], labels[40:60, 20:40] = 1, 3
    return image, labels


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_montage_has_an_organ_legend_markers_scale_and_position(tmp_path):
    image, labels = _slice()
    fig = montage([image, image], [labels, labels], ["a", "b"], tmp_path / "m.png", ncols=2,
                  label_names=NAMES, spacing_xy=(2.0, 2.0), z_mm=[-12.5, 30.0])
    assert (tmp_path / "m.png").is_file()
    assert len(fig.legends) == 1
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["liver", "spleen", "kidney_left"]  # every named organ, background left out
    first = fig.axes[0]
    assert {"R", "L", "A", "P"} <= set(_texts(first))
    # 80 px x 2 mm = 160 mm wide: the bar is the largest round length <= 1/5 of it, 20 mm
    assert "20 mm" in _texts(first) and "z = -12.5 mm" in _texts(first)
    assert "z = 30.0 mm" in _texts(fig.axes[1])
    bar = [line for line in first.lines if len(line.get_xdata()) == 2][0]
    assert np.ptp(bar.get_xdata()) == 20 / 2.0  # 20 mm at 2 mm per column


def test_radiological_markers_put_the_patients_right_on_the_left(tmp_path):
    image, labels = _slice()
    fig = prediction_figure(image, labels, labels, tmp_path / "p.png", label_names=NAMES,
                            spacing_xy=(1.0, 1.0), z_mm=4.0)
    ax = fig.axes[0]
    where = {t.get_text(): t.get_position() for t in ax.texts}
    assert where["R"][0] < 0.5 < where["L"][0] and where["A"][1] > 0.5 > where["P"][1]
    assert len(fig.legends) == 1


def test_hd95_summary_reports_median_and_capped_values():
    cases = {f"c{i}": {"liver": {"dice": d, "hd95_mm": h}} for i, (d, h) in
             enumerate([(0.9, 3.0), (0.8, 5.0), (0.0, 538.0), (0.85, 4.0)])}
    result = {"organs": ["liver"], "cases": cases,
              "counts": {"liver": {"missed": 1, "false_positive": 0, "absent_both": 0,
                                   "evaluated": 4}}}
    h = hd95_summary(result)["liver"]
    assert h == {"mean": 137.5, "median": 4.5, "capped": 1, "n": 4}
    assert "95th" in HD95_CONVENTION and "MONAI" in HD95_CONVENTION and "medpy" in HD95_CONVENTION
