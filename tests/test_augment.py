"""PairedViewAugment: geometry shared by image and regions, overlap guarantee, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lrcseg.augment import PairedViewAugment, box_overlap
from lrcseg.config import AugmentConfig

NO_INTENSITY = dict(brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), noise_std=0.0, blur_prob=0.0)


def _block_regions(b: int, h: int, w: int, cell: int) -> torch.Tensor:
    """(B, H, W) ids 1..: square cells of side ``cell``, numbering shifted per sample."""
    rows = torch.arange(h)[:, None] // cell
    cols = torch.arange(w)[None, :] // cell
    base = rows * ((w + cell - 1) // cell) + cols + 1
    return torch.stack([base + i for i in range(b)])


def test_one_transform_maps_image_and_regions_consistently():
    cfg = AugmentConfig(image_size=64, rotation_deg=15.0, **NO_INTENSITY)
    regions = _block_regions(4, 96, 80, cell=16)
    images = regions[:, None].float() / 100.0  # intensity = region id / 100
    v1, r1, v2, r2 = PairedViewAugment(cfg)(images, regions, torch.Generator().manual_seed(3))
    assert v1.shape == (4, 1, 64, 64) and r1.shape == (4, 64, 64) and r1.dtype == torch.long
    for view, reg in ((v1, r1), (v2, r2)):
        from_image = torch.round(view[:, 0] * 100).long()
        agree = (from_image == reg).float().mean().item()
        assert agree > 0.9, agree  # only pixels on region borders may disagree (bilinear vs nearest)
        assert set(reg.unique().tolist()) <= set(regions.unique().tolist()) | {0}


def test_views_overlap_as_promised_measured_on_footprints():
    cfg = AugmentConfig(image_size=64, rotation_deg=0.0, min_overlap=0.5, zoom=None, crop_scale=(0.2, 1.0),
                        **NO_INTENSITY)
    b, h, w = 16, 32, 32
    ids = torch.arange(1, h * w + 1).view(1, h, w).expand(b, h, w).contiguous()
    _, r1, _, r2 = PairedViewAugment(cfg)(torch.zeros(b, 1, h, w), ids, torch.Generator().manual_seed(0))
    for i in range(b):
        f1 = set(r1[i].unique().tolist()) - {0}
        f2 = set(r2[i].unique().tolist()) - {0}
        overlap = len(f1 & f2) / min(len(f1), len(f2))
        assert overlap >= 0.5 - 0.08, (i, overlap)  # pixel-grid footprints of the crop boxes


def test_crop_pairs_overlap_even_when_rejection_fails():
    cfg = AugmentConfig(min_overlap=0.9, zoom=None, crop_scale=(0.05, 0.2))
    box1, box2 = PairedViewAugment(cfg).sample_crop_pair(2000, 200, 300, torch.Generator().manual_seed(1))
    ov = box_overlap(box1, box2)
    assert ov.min().item() >= 0.9 - 1e-9
    assert (box2[:, :2] - box2[:, 2:] / 2).min() >= -1e-9 and (box2[:, :2] + box2[:, 2:] / 2).max() <= 1 + 1e-9
    assert (box1 != box2).any(dim=1).float().mean() > 0.5  # not simply copies of the first crop


def test_box_overlap_known_values():
    a = torch.tensor([0.5, 0.5, 0.4, 0.4], dtype=torch.float64)
    b = torch.tensor([0.7, 0.5, 0.4, 0.2], dtype=torch.float64)  # overlap 0.2 x 0.2 over 0.08
    assert box_overlap(a, b).item() == pytest.approx(0.04 / 0.08)
    assert box_overlap(a, torch.tensor([0.95, 0.5, 0.1, 0.1], dtype=torch.float64)).item() == 0.0


def test_same_seed_same_output_and_intensity_only_touches_images():
    cfg = AugmentConfig(image_size=32)
    gen = torch.Generator().manual_seed(11)
    images = torch.rand(3, 2, 48, 40, generator=gen)
    regions = _block_regions(3, 48, 40, cell=8)
    aug = PairedViewAugment(cfg)
    out_a = aug(images, regions, torch.Generator().manual_seed(5))
    out_b = aug(images, regions, torch.Generator().manual_seed(5))
    out_c = aug(images, regions, torch.Generator().manual_seed(6))
    for x, y in zip(out_a, out_b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(out_a[0], out_c[0])
    plain = PairedViewAugment(dataclasses.replace(cfg, **NO_INTENSITY))(
        images, regions, torch.Generator().manual_seed(5))
    assert torch.equal(plain[1], out_a[1]) and torch.equal(plain[3], out_a[3])
    assert (plain[0] - out_a[0]).abs().max() > 0.01


def test_identity_transform_reproduces_input():
    cfg = AugmentConfig(image_size=32, zoom=None, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False,
                        rotation_deg=0.0, **NO_INTENSITY)
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    regions = _block_regions(2, 32, 32, cell=4)
    v1, r1, v2, r2 = PairedViewAugment(cfg)(images, regions, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v1, images, atol=1e-5, rtol=0)
    assert torch.equal(r1, regions) and torch.equal(r2, regions)


def test_blur_keeps_mean_and_smooths():
    cfg = AugmentConfig(image_size=64, zoom=None, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False,
                        rotation_deg=0.0, brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), noise_std=0.0,
                        blur_prob=1.0, blur_sigma=(1.5, 1.5))
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    v1, *_ = PairedViewAugment(cfg)(images, torch.ones(2, 64, 64, dtype=torch.long), torch.Generator())
    assert abs(v1.mean().item() - images.mean().item()) < 2e-3
    assert v1.std().item() < 0.5 * images.std().item()  # white noise loses most variance


def test_rejects_bad_input():
    aug = PairedViewAugment(AugmentConfig(image_size=32))
    with pytest.raises(ValueError, match="regions shape"):
        aug(torch.zeros(2, 1, 16, 16), torch.zeros(2, 16, 15, dtype=torch.long), torch.Generator())
    with pytest.raises(ValueError, match="AugmentConfig"):
        PairedViewAugment({"image_size": 32})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_geometry():
    cfg = AugmentConfig(image_size=64, noise_std=0.0)
    regions = _block_regions(4, 96, 96, cell=12)
    images = regions[:, None].float() / 100.0
    cpu = PairedViewAugment(cfg)(images, regions, torch.Generator().manual_seed(2))
    gpu = PairedViewAugment(cfg)(images.cuda(), regions.cuda(), torch.Generator().manual_seed(2))
    assert gpu[0].is_cuda
    agree = (cpu[1] == gpu[1].cpu()).float().mean().item()
    assert agree > 0.99
    np.testing.assert_allclose(cpu[0].numpy(), gpu[0].cpu().numpy(), atol=1e-3)


def test_zoom_crops_are_image_size_over_zoom_pixels_and_ct_sound_defaults():
    cfg = AugmentConfig(image_size=64, zoom=(0.8, 1.25), crop_ratio=(1.0, 1.0))
    boxes = PairedViewAugment(cfg).sample_crops(4000, 200, 160, torch.Generator().manual_seed(0))
    side_px = boxes[:, 2] * 160  # width fraction x canvas width (square crops)
    torch.testing.assert_close(boxes[:, 3] * 200, side_px)
    assert side_px.min() >= 64 / 1.25 - 1e-6 and side_px.max() <= 64 / 0.8 + 1e-6
    # log-uniform zoom: the median crop is the image size itself (native spacing)
    assert side_px.median().item() == pytest.approx(64, rel=0.02)
    defaults = AugmentConfig()
    window = 250.0 - (-175.0)
    assert not defaults.hflip and defaults.gamma == (1.0, 1.0)
    assert defaults.brightness * window <= 10 and defaults.noise_std * window <= 10
