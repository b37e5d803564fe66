"""Figures: radiological orientation, fixed colours, atomic PNG output."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from lrcseg import viz


def _blob_slice(x_size: int = 40, y_size: int = 30) -> np.ndarray:
    """(X, Y) slice with a bright blob at high x (patient right) and high y (anterior)."""
    img = np.zeros((x_size, y_size), dtype=np.float32)
    img[x_size - 10: x_size - 2, y_size - 9: y_size - 2] = 1.0
    return img


def test_radiological_puts_patient_right_left_and_anterior_up():
    img = _blob_slice()
    shown = viz.radiological(img)
    assert shown.shape == (30, 40)  # (Y, X)
    rows, cols = np.nonzero(shown)
    assert cols.max() < 20  # patient right -> viewer's left half
    assert rows.max() < 15  # anterior -> top half
    # element mapping: shown[r, c] = img[X-1-c, Y-1-r]
    assert shown[0, 0] == img[39, 29]
    assert shown[3, 5] == img[34, 26]
    with pytest.raises(ValueError, match="2D"):
        viz.radiological(np.zeros((2, 2, 2)))


def test_hu_to_grey_maps_the_window_to_unit_grey_levels():
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 900.0], dtype=np.float32)
    grey = viz.hu_to_grey(hu, (-175.0, 250.0))
    assert grey.dtype == np.float32
    np.testing.assert_array_equal(grey, np.clip((hu + 175.0) / 425.0, 0.0, 1.0))
    assert grey[0] == 0.0 and grey[2] == np.float32(0.5) and grey[-1] == 1.0
    with pytest.raises(ValueError, match="lo < hi"):
        viz.hu_to_grey(hu, (250.0, -175.0))


def test_representative_slice_is_the_one_with_most_foreground():
    hu = np.linspace(-200.0, 300.0, 6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    labels = np.zeros((6, 5, 4), dtype=np.int16)
    labels[:2, :2, 1] = 3       # 4 voxels
    labels[:3, :3, 2] = 1       # 9 voxels: the most
    labels[3:, 2:, 3] = 2       # 9 voxels too: the first one wins
    z, grey = viz.representative_slice(hu, labels, (-175.0, 250.0))
    assert z == 2 and grey.shape == (6, 5)
    np.testing.assert_array_equal(grey, viz.hu_to_grey(hu[:, :, 2], (-175.0, 250.0)))
    assert viz.representative_slice(hu, np.zeros_like(labels), (-175.0, 250.0))[0] == 0
    with pytest.raises(ValueError, match="one shape"):
        viz.representative_slice(hu, labels[:, :, :2], (-175.0, 250.0))


def test_label_colors_fixed_and_background_transparent():
    a = viz.label_colors(20)
    b = viz.label_colors(5)
    assert a.shape == (20, 4)
    np.testing.assert_array_equal(a[:5], b)  # same id -> same colour whatever n
    assert a[0, 3] == 0.0 and np.all(a[1:, 3] == 1.0)
    assert len({tuple(c) for c in a[1:, :3].round(3)}) == 19  # all distinct
    with pytest.raises(ValueError):
        viz.label_colors(0)


def _dark_columns(png: np.ndarray) -> np.ndarray:
    """Column indices of pixels that are not white background."""
    grey = png[..., :3].mean(axis=-1)
    return np.nonzero(grey < 0.98)[1]


def test_montage_png_is_radiological(tmp_path):
    img = _blob_slice()
    path = tmp_path / "fig" / "montage.png"
    viz.montage([img], None, None, path, ncols=1)
    png = mpimg.imread(path)
    # The image area is black except the blob; find it inside the drawn (non-white) extent.
    drawn = _dark_columns(png)
    left, right = drawn.min(), drawn.max()
    grey = png[..., :3].mean(axis=-1)
    bright_cols = np.nonzero((grey > 0.9) & (np.arange(png.shape[1]) >= left)
                             & (np.arange(png.shape[1]) <= right))[1]
    assert bright_cols.size > 0
    assert bright_cols.mean() < (left + right) / 2  # blob on the LEFT half
    assert not list(tmp_path.glob("fig/.*"))  # no temporary files left


def test_overlay_colours_the_right_pixels(tmp_path):
    img = np.full((20, 20), 0.5, dtype=np.float32)
    lab = np.zeros((20, 20), dtype=np.int16)
    lab[15:, :5] = 1  # high x, low y -> displayed bottom-left
    fig = viz.new_figure(2, 2)
    ax = fig.add_axes((0, 0, 1, 1))
    viz.overlay_labels(ax, img, lab, alpha=1.0, vmin=0.0, vmax=1.0)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    h, w = rgba.shape[:2]
    red = viz.label_colors(2)[1, :3]
    np.testing.assert_allclose(rgba[int(0.9 * h), int(0.1 * w)], red, atol=0.02)
    np.testing.assert_allclose(rgba[int(0.1 * h), int(0.9 * w)], [0.5, 0.5, 0.5], atol=0.02)
    viz.save_figure(fig, tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 0


def test_prediction_figure(tmp_path):
    img = _blob_slice(32, 24)
    ref = (img > 0).astype(np.int16)
    pred = np.zeros_like(ref)
    pred[5:12, 3:9] = 2
    path = tmp_path / "pred.png"
    viz.prediction_figure(img, ref, pred, path, title="case 1, z=3",
                          label_names={"background": 0, "liver": 1, "spleen": 2},
                          spacing_xy=(0.8, 2.0))
    png = mpimg.imread(path)
    assert png.ndim == 3 and png.shape[1] > png.shape[0]  # three panels side by side
    with pytest.raises(ValueError, match="differs"):
        viz.prediction_figure(img, ref[:-1], pred, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
