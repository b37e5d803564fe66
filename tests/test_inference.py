"""Whole-slice inference: original grid, argmax after mapping back, affine kept on output."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dicom_fixtures import write_dicom_series
from torch import nn

from lrcseg.config import PreprocessConfig
from lrcseg.data.preprocess import preprocess_volume
from lrcseg.data.readers import Volume, read_image, read_label
from lrcseg.evaluate.predict import pad_amounts, predict_labels, predict_volume, write_prediction

GAIN = 10.0


class ThresholdNet(nn.Module):
    """Known function of the input: logit_0 = 0, logit_1 = GAIN * (mean over channels - 0.5),
    so p_1 = sigmoid(GAIN * (mean - 0.5)). A 1x1 conv: no spatial mixing. Refuses inputs whose
    sides are not multiples of 32 (they must have been padded, never cropped)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1] = GAIN / in_channels
            self.conv.bias[1] = -GAIN * 0.5
        self.seen_shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0, x.shape
        assert not self.training
        self.seen_shapes.append(tuple(x.shape))
        return self.conv(x)


def _volume(array: np.ndarray, spacing=(0.75, 1.2, 3.0), origin=(-10.0, 20.0, 5.0)) -> Volume:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return Volume(array.astype(np.float32), affine, path=Path("mem"))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def test_pad_amounts():
    assert pad_amounts(15) == (8, 9)
    assert pad_amounts(64) == (0, 0)
    assert pad_amounts(33) == (15, 16)


def test_probs_on_original_grid_with_known_values():
    """Uniform slices with HU per slice; 2.5D context k=3 averages neighbouring windows."""
    hu = np.array([-175.0, 0.0, 37.5, 100.0, 250.0], dtype=np.float32)
    vol = _volume(np.broadcast_to(hu, (30, 22, 5)).copy())
    cfg = PreprocessConfig(spacing_mm=1.5, context_slices=3)
    model = ThresholdNet(cfg.in_channels).train()  # predict_volume must switch to eval
    probs = predict_volume(model, vol, cfg, "cpu", batch_size=2, num_classes=2)
    assert probs.shape == (2, 30, 22, 5) and probs.dtype == np.float32
    # network grid (15, 18) padded to (32, 32); batches of 2, 2, 1 slices
    assert [s[0] for s in model.seen_shapes] == [2, 2, 1]
    assert all(s[1:] == (3, 32, 32) for s in model.seen_shapes)
    w = (hu + 175.0) / 425.0
    w_ctx = np.array([w[np.clip([z - 1, z, z + 1], 0, 4)].mean() for z in range(5)])
    expected = _sigmoid(GAIN * (w_ctx - 0.5))
    np.testing.assert_allclose(probs[1], np.broadcast_to(expected, (30, 22, 5)), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    labels = predict_labels(model, vol, cfg, "cpu", batch_size=4)
    np.testing.assert_array_equal(labels, (expected > 0.5).astype(np.uint8)[None, None].repeat(
        30, 0).repeat(22, 1))
    with pytest.raises(ValueError, match="classes"):
        predict_volume(model, vol, cfg, "cpu", num_classes=3)


def _disc_volume() -> Volume:
    """A bright ellipse (HU 200) on soft tissue (HU -100), off-centre, 3 slices."""
    x, y = np.meshgrid(np.arange(37), np.arange(26), indexing="ij")
    inside = ((x - 22.3) / 9.7) ** 2 + ((y - 11.6) / 6.2) ** 2 <= 1.0
    arr = np.where(inside, 200.0, -100.0)[..., None].repeat(3, axis=-1)
    return _volume(arr, spacing=(0.6, 1.1, 2.5))


def test_argmax_is_taken_after_mapping_probabilities_back():
    vol = _disc_volume()
    cfg = PreprocessConfig(spacing_mm=1.7)
    model = ThresholdNet(1)
    probs = predict_volume(model, vol, cfg, "cpu")
    labels = predict_labels(model, vol, cfg, "cpu")
    assert probs.shape == (2, 37, 26, 3) and labels.shape == (37, 26, 3)
    np.testing.assert_array_equal(labels, probs.argmax(axis=0))

    # Independent reference: the network on the unpadded resampled grid (a 1x1 conv does not
    # care about padding), softmax, bilinear back to (X, Y), then argmax.
    pre = preprocess_volume(vol, cfg)
    net_grid = torch.softmax(model.conv(torch.from_numpy(pre.image)), dim=1)  # (Z, 2, H, W)
    assert net_grid.shape[2:] == (13, 17)  # round(37*0.6/1.7), round(26*1.1/1.7)
    back = F.interpolate(net_grid, size=(37, 26), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(probs, back.permute(1, 2, 3, 0).detach().numpy(), atol=1e-5)

    # The wrong order (argmax on the network grid, nearest upsampling) gives other labels here.
    wrong = F.interpolate(net_grid.argmax(1, keepdim=True).float(), size=(37, 26),
                          mode="nearest")[:, 0].permute(1, 2, 0).numpy()
    assert np.count_nonzero(wrong != labels) > 0
    # ...and ours recovers the original ellipse better (voxels disagreeing with the truth).
    truth = (vol.array > 0).astype(np.uint8)
    assert np.count_nonzero(labels != truth) < np.count_nonzero(wrong != truth)


def test_written_nifti_keeps_input_affine(tmp_path):
    vol_arr = _disc_volume().array
    # A non-canonical file (x flipped, LAS-like) with an oblique-free affine and an offset.
    affine = np.array([[-0.6, 0, 0, 40.0], [0, 1.1, 0, -12.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol_arr[::-1].copy(), affine), src)
    vol = read_image(src)
    cfg = PreprocessConfig(spacing_mm=1.7)
    labels = predict_labels(ThresholdNet(1), vol, cfg, "cpu")
    out = tmp_path / "pred" / "ct.nii.gz"
    write_prediction(labels, vol, out)
    img = nib.load(out)
    # the mask is on the input file's own grid: its voxel order, shape and affine
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert img.shape == nib.load(src).shape
    assert img.get_data_dtype() == np.uint8
    lab = read_label(out, reference=vol)  # canonicalised, it lies on the image's grid
    np.testing.assert_array_equal(lab.array, labels)
    # The mask lies on the bright ellipse in world space: compare in the raw file's voxel order.
    raw_ct = np.asarray(nib.load(src).dataobj)
    raw_mask = np.asarray(img.dataobj)
    assert np.mean((raw_ct > 0) == raw_mask.astype(bool)) > 0.95

    with pytest.raises(ValueError, match="shape"):
        write_prediction(labels[:-1], vol, tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="nii"):
        write_prediction(labels, vol, tmp_path / "bad.png")
    assert not (tmp_path / "bad.nii.gz").exists() and not (tmp_path / "bad.png").exists()


def test_dicom_prediction_keeps_series_geometry(tmp_path):
    rows, cols, nz = 28, 34, 4
    stored = np.full((nz, rows, cols), 1024 - 100, dtype=np.uint16)  # HU -100
    r0, c0, k0 = 6, 25, 2  # a bright block near (row 6, column 25) of slice 2
    stored[k0, r0:r0 + 4, c0:c0 + 5] = 1024 + 200
    folder = tmp_path / "series"
    write_dicom_series(folder, stored, origin=(-20.0, -30.0, 100.0),
                       pixel_spacing=(0.8, 0.7), step=2.5)
    vol = read_image(folder)
    labels = predict_labels(ThresholdNet(1), vol, PreprocessConfig(spacing_mm=1.4), "cpu")
    out = tmp_path / "series.nii.gz"
    write_prediction(labels, vol, out)
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    mask = np.asarray(img.dataobj)
    assert mask.sum() > 0
    # Centre of the predicted block in RAS mm equals the block centre from the DICOM geometry:
    # LPS = origin + c * 0.7 * row_cos + r * 0.8 * col_cos + k * 2.5 * normal, RAS = (-L, -P, S).
    idx = np.argwhere(mask == 1).mean(axis=0)
    ras = img.affine @ np.array([*idx, 1.0])
    lps = np.array([-20.0 + (c0 + 2) * 0.7, -30.0 + (r0 + 1.5) * 0.8, 100.0 + k0 * 2.5])
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=0.8)
