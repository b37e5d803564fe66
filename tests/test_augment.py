"""PairedViewAugment: geometry shared by image and regions, overlap guarantee, determinism.
IntensityAugment (fine-tuning): determinism, image only, each transform's range and
probability, and its config."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrcseg.augment import (
    INTENSITY_DRAWS,
    IntensityAugment,
    OrganContrastAugment,
    PairedViewAugment,
    augment_labelled,
    box_overlap,
    simulate_low_resolution,
)
from lrcseg.config import (
    AugmentConfig,
    FinetuneConfig,
    IntensityAugmentConfig,
    OrganContrastConfig,
    from_dict,
    to_dict,
)
from lrcseg.errors import ConfigError

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


# --------------------------------------------------------------------------- fine-tuning intensity

WINDOW = (-175.0, 250.0)
WIDTH = WINDOW[1] - WINDOW[0]
PROBS = ("noise_prob", "blur_prob", "brightness_prob", "contrast_prob", "lowres_prob",
         "gamma_inverted_prob", "gamma_prob")
OFF = dict.fromkeys(PROBS, 0.0)
ALL_ON = dict.fromkeys(PROBS, 1.0)


def _only(prob_key: str, p: float = 1.0, **ranges) -> IntensityAugmentConfig:
    return IntensityAugmentConfig(**{**OFF, prob_key: p}, **ranges)


def _ct_like(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(B, 1, S, S) windowed-CT-like images in [0, 1]: smooth blobs with air (0) and bone (1)."""
    gen = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(b, 1, size // 4, size // 4, generator=gen), size=(size, size),
                      mode="bilinear", align_corners=False)
    x[:, :, 0, :4] = 0.0
    x[:, :, -1, -4:] = 1.0
    return x


def test_intensity_is_a_pure_function_of_the_generator_and_draws_a_fixed_amount():
    images = _ct_like(6)
    aug = IntensityAugment(IntensityAugmentConfig(**ALL_ON), [WINDOW])
    a = aug(images, torch.Generator().manual_seed(4))
    b = aug(images, torch.Generator().manual_seed(4))
    c = aug(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and a.dtype == images.dtype
    # the same draws whatever the probabilities: the generator ends in the same state
    for cfg in (IntensityAugmentConfig(**OFF), IntensityAugmentConfig(**ALL_ON), IntensityAugmentConfig()):
        gen = torch.Generator().manual_seed(4)
        IntensityAugment(cfg, [WINDOW])(images, gen)
        ref = torch.Generator().manual_seed(4)
        torch.rand(6, INTENSITY_DRAWS, generator=ref, dtype=torch.float64)
        torch.randint(0, 2**62, (1,), generator=ref)
        assert torch.equal(gen.get_state(), ref.get_state())


def test_probability_zero_leaves_the_image_bit_identical():
    images = _ct_like(8)
    out = IntensityAugment(IntensityAugmentConfig(**OFF), [WINDOW])(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, images)


def test_labels_and_geometry_are_untouched_by_intensity_augmentation():
    """Fine-tuning's step: geometry, then intensity from the same generator (train/finetune.py)."""
    images = _ct_like(4, size=48)
    labels = torch.randint(0, 5, (4, 48, 48), generator=torch.Generator().manual_seed(1))
    plain = augment_labelled(images, labels, 32, 10.0, False, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    geo_images, geo_labels = augment_labelled(images, labels, 32, 10.0, False, gen)
    out = IntensityAugment(IntensityAugmentConfig(**ALL_ON), [WINDOW])(geo_images, gen)
    assert torch.equal(geo_labels, plain[1]) and torch.equal(geo_images, plain[0])
    assert not torch.equal(out, geo_images)


def test_each_transform_applies_with_its_probability():
    n, p = 2000, 0.3
    bound = 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard deviations
    images = _ct_like(n, size=8)
    ranges = dict(noise_std_hu=(5.0, 10.0), brightness_range=(0.75, 0.8), contrast_range=(0.75, 0.8),
                  lowres_scale=(0.5, 0.6), gamma_range=(1.3, 1.5))
    for key in PROBS:
        out = IntensityAugment(_only(key, p, **ranges), [WINDOW])(images, torch.Generator().manual_seed(2))
        changed = (out != images).flatten(1).any(dim=1).double().mean().item()
        assert abs(changed - p) < bound, (key, changed)


def test_noise_std_in_hu_and_shared_by_the_windows_of_a_slice():
    images = _ct_like(16, size=64).expand(-1, 2, -1, -1).contiguous()
    lung = (-1350.0, 150.0)
    aug = IntensityAugment(_only("noise_prob", noise_std_hu=(15.0, 25.0)), [WINDOW, lung])
    out = aug(images, torch.Generator().manual_seed(3))
    noise_hu = (out - images) * torch.tensor([WIDTH, lung[1] - lung[0]]).view(1, 2, 1, 1)
    torch.testing.assert_close(noise_hu[:, 0], noise_hu[:, 1], rtol=0, atol=1e-3)
    std = noise_hu[:, 0].flatten(1).std(dim=1)
    assert std.min() > 15.0 * 0.95 and std.max() < 25.0 * 1.05
    assert std.max() - std.min() > 2.0  # drawn per sample
    fixed = IntensityAugment(_only("noise_prob", noise_std_hu=(20.0, 20.0)), [WINDOW])
    std = ((fixed(images[:, :1], torch.Generator()) - images[:, :1]) * WIDTH).flatten(1).std(dim=1)
    torch.testing.assert_close(std, torch.full_like(std, 20.0), rtol=0.05, atol=0)


def test_brightness_scales_hu_about_its_centre():
    images = _ct_like(32)
    cfg = _only("brightness_prob", brightness_range=(0.8, 0.9), brightness_centre_hu=100.0)
    out = IntensityAugment(cfg, [WINDOW])(images, torch.Generator().manual_seed(0))
    centre = (100.0 - WINDOW[0]) / WIDTH
    far = (images - centre).abs() > 0.1
    m = (out - centre)[far] / (images - centre)[far]
    assert m.min() >= 0.8 - 1e-4 and m.max() <= 0.9 + 1e-4
    per_sample = ((out - centre) / (images - centre)).where(far, torch.nan).flatten(1)
    spread = per_sample.nan_to_num(0).amax(1) - per_sample.nan_to_num(2).amin(1)
    assert spread.max() < 1e-4  # one factor per sample
    centre_hu = 100.0 * torch.ones(1, 1, 1, 1)  # a pixel at the centre HU does not move
    at_centre = (centre_hu - WINDOW[0]) / WIDTH * torch.ones(2, 1, 8, 8)
    moved = IntensityAugment(cfg, [WINDOW])(at_centre, torch.Generator())
    torch.testing.assert_close(moved, at_centre)


def test_contrast_scales_about_the_mean_within_the_sample_range():
    images = _ct_like(32)
    out = IntensityAugment(_only("contrast_prob", contrast_range=(0.6, 0.7)), [WINDOW])(
        images, torch.Generator().manual_seed(0))
    mean = images.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out.mean(dim=(2, 3), keepdim=True), mean, rtol=0, atol=1e-5)
    m = (out - mean).flatten(1).norm(dim=1) / (images - mean).flatten(1).norm(dim=1)
    assert m.min() >= 0.6 - 1e-5 and m.max() <= 0.7 + 1e-5
    wider = IntensityAugment(_only("contrast_prob", contrast_range=(1.5, 1.5)), [WINDOW])(
        images, torch.Generator())
    assert (wider.amin(dim=(2, 3)) >= images.amin(dim=(2, 3))).all()
    assert (wider.amax(dim=(2, 3)) <= images.amax(dim=(2, 3))).all()  # nnU-Net's preserve_range


@pytest.mark.parametrize("inverted", [False, True])
def test_gamma_in_range_and_keeps_mean_and_std(inverted):
    images = _ct_like(16)
    images[:, :, 0, 4:8] = 0.5  # x = 0, 0.5 and 1 in every sample: the gamma can be read back
    key = "gamma_inverted_prob" if inverted else "gamma_prob"
    out = IntensityAugment(_only(key, gamma_range=(1.3, 1.4)), [WINDOW])(images, torch.Generator().manual_seed(1))
    zero, half, one = out[:, 0, 0, 0], out[:, 0, 0, 4], out[:, 0, -1, -1]
    ratio = (half - one) / (zero - one) if inverted else (half - zero) / (one - zero)
    gamma = torch.log(ratio) / math.log(0.5)
    assert gamma.min() >= 1.3 - 1e-3 and gamma.max() <= 1.4 + 1e-3
    torch.testing.assert_close(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.std(dim=(2, 3)), images.std(dim=(2, 3)), rtol=1e-4, atol=0)


def test_factors_fall_below_and_above_one_with_equal_odds():
    images = _ct_like(4000, size=4)
    cfg = _only("brightness_prob", brightness_range=(0.75, 1.25), brightness_centre_hu=WINDOW[0])
    out = IntensityAugment(cfg, [WINDOW])(images, torch.Generator().manual_seed(0))
    m = out[:, 0, -1, -1] / images[:, 0, -1, -1]  # bone pixel = 1; the centre is x = 0
    assert m.min() >= 0.75 - 1e-6 and m.max() <= 1.25 + 1e-6
    assert abs((m < 1).double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / 4000)


def test_blur_keeps_shape_and_mean_and_smooths_per_axis():
    images = torch.rand(4, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    out = IntensityAugment(_only("blur_prob", blur_sigma_px=(1.0, 1.0)), [WINDOW], context_slices=2)(
        images, torch.Generator())
    assert out.shape == images.shape
    assert abs(out.mean().item() - images.mean().item()) < 2e-3
    assert out.std().item() < 0.5 * images.std().item()
    rows = torch.zeros(1, 1, 32, 32)
    rows[:, :, 16] = 1.0  # a horizontal line: blurring along H spreads it, along W does not
    draws = [IntensityAugment(_only("blur_prob", blur_sigma_px=(0.5, 1.0)), [WINDOW])(
        rows, torch.Generator().manual_seed(s))[0, 0, 16, 16].item() for s in range(40)]
    assert max(draws) - min(draws) > 0.05  # the std along H varies from draw to draw


def test_low_resolution_matches_interpolate_per_sample_and_keeps_the_mean():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 2, 40, 56, generator=gen)
    scale = torch.tensor([0.5, 0.55, 0.66, 0.73, 0.9, 1.0], dtype=torch.float64)
    out = simulate_low_resolution(images, scale)
    for i in range(6):
        low = [round(40 * scale[i].item()), round(56 * scale[i].item())]
        ref = F.interpolate(F.interpolate(images[i:i + 1], low, mode="nearest-exact"), (40, 56),
                            mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=0, atol=1e-5)
    assert torch.equal(out[5], images[5])
    smooth = _ct_like(8, size=64)
    lowres = IntensityAugment(_only("lowres_prob", lowres_scale=(0.5, 0.5)), [WINDOW])(smooth, torch.Generator())
    assert lowres.shape == smooth.shape and not torch.equal(lowres, smooth)
    torch.testing.assert_close(lowres.mean(dim=(2, 3)), smooth.mean(dim=(2, 3)), rtol=0, atol=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_intensity_on_cuda_matches_cpu_and_is_deterministic():
    images = _ct_like(8)
    quiet = IntensityAugment(IntensityAugmentConfig(**{**ALL_ON, "noise_prob": 0.0}), [WINDOW])
    cpu = quiet(images, torch.Generator().manual_seed(1))
    gpu = quiet(images.cuda(), torch.Generator().manual_seed(1))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=5e-3)  # cuDNN may blur in TF32
    noisy = IntensityAugment(IntensityAugmentConfig(**ALL_ON), [WINDOW])
    assert torch.equal(noisy(images.cuda(), torch.Generator().manual_seed(1)),
                       noisy(images.cuda(), torch.Generator().manual_seed(1)))


def test_intensity_refuses_bad_input():
    with pytest.raises(ValueError, match="IntensityAugmentConfig"):
        IntensityAugment(AugmentConfig(), [WINDOW])
    with pytest.raises(ValueError, match="Illegal windows"):
        IntensityAugment(IntensityAugmentConfig(), [(250.0, -175.0)])
    aug = IntensityAugment(IntensityAugmentConfig(), [WINDOW], context_slices=3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(torch.zeros(2, 1, 16, 16), torch.Generator())


@pytest.mark.parametrize("bad, match", [
    (dict(noise_prob=1.5), "noise_prob 1.5: a probability"),
    (dict(gamma_inverted_prob=-0.1), "gamma_inverted_prob -0.1"),
    (dict(noise_std_hu=(-1.0, 5.0)), "noise_std_hu .*std >= 0 HU"),
    (dict(brightness_range=(1.25, 0.75)), "brightness_range .*low <= high"),
    (dict(contrast_range=(0.0, 1.0)), "contrast_range .*factors > 0"),
    (dict(lowres_scale=(0.5, 1.5)), r"lowres_scale .*\(0, 1\]"),
    (dict(gamma_range=(0.7,)), "gamma_range"),
    (dict(brightness_centre_hu=5000.0), "brightness_centre_hu 5000.0"),
])
def test_intensity_config_says_what_is_wrong(bad, match):
    with pytest.raises(ConfigError, match=match):
        IntensityAugmentConfig(**bad)


def test_intensity_config_defaults_round_trip_and_older_configs_load():
    cfg = FinetuneConfig()
    assert cfg.intensity.enabled and cfg.intensity.gamma_prob == 0.3
    saved = to_dict(cfg)
    assert saved["intensity"]["noise_std_hu"] == [0.0, 10.0]
    assert from_dict(FinetuneConfig, saved) == cfg
    off = from_dict(FinetuneConfig, {"intensity": {"enabled": False}})
    assert not off.intensity.enabled and off.intensity.contrast_range == (0.75, 1.25)
    older = {k: v for k, v in saved.items() if k != "intensity"}  # a config.yaml of an older run
    assert from_dict(FinetuneConfig, older).intensity == IntensityAugmentConfig()


def _organ_scene(b: int = 4, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Images at 100 HU (window -175..250) with two square organs (labels 1, 2) per sample."""
    window = (-175.0, 250.0)
    images = torch.full((b, 1, size, size), (100.0 - window[0]) / (window[1] - window[0]))
    images += 0.01 * torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(b, size, size, dtype=torch.long)
    labels[:, 8:20, 8:20] = 1
    labels[:, 28:40, 26:40] = 2
    return images.clamp(0, 1), labels


def test_organ_contrast_shifts_each_organ_by_its_own_bounded_offset_and_not_the_background():
    images, labels = _organ_scene()
    before = labels.clone()
    cfg = OrganContrastConfig(enabled=True, prob=1.0, shift_hu=80.0, edge_sigma_px=0.0)
    aug = OrganContrastAugment(cfg, [(-175.0, 250.0)], num_classes=3)
    out = aug(images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(labels, before)  # labels untouched
    hu = (out - images) * 425.0  # the shift in HU
    assert torch.equal(hu[:, 0][labels == 0], torch.zeros_like(hu[:, 0][labels == 0]))
    offsets = []
    for i in range(images.shape[0]):
        for c in (1, 2):
            inside = hu[i, 0][labels[i] == c]
            assert float(inside.max() - inside.min()) < 1e-3  # one offset per organ
            offsets.append(float(inside.mean()))
    offsets = np.array(offsets)
    assert np.all(np.abs(offsets) <= 80.0 + 1e-3)
    assert np.abs(offsets).max() > 20.0  # something moved
    assert len(np.unique(np.round(offsets, 2))) == len(offsets)  # organs drawn independently


def test_organ_contrast_is_deterministic_leaves_unpicked_samples_and_saturates_at_the_window():
    images, labels = _organ_scene(b=16)
    cfg = OrganContrastConfig(enabled=True, prob=0.5, shift_hu=300.0, edge_sigma_px=1.0)
    aug = OrganContrastAugment(cfg, [(-175.0, 250.0)], num_classes=3)
    a = aug(images, labels, torch.Generator().manual_seed(7))
    b = aug(images, labels, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    changed = [not torch.equal(a[i], images[i]) for i in range(16)]
    assert 3 <= sum(changed) <= 13  # about half the samples
    unchanged = [i for i, c in enumerate(changed) if not c]
    assert unchanged and all(torch.equal(a[i], images[i]) for i in unchanged)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0  # the window's own clipping
    assert bool((a == 1.0).any())  # +300 HU on a 100 HU organ leaves the 250 HU window
    # blurred edges: a pixel just outside an organ moves a little, one far away does not
    moved = [i for i, c in enumerate(changed) if c][0]
    assert float((a[moved, 0, 20, 14] - images[moved, 0, 20, 14]).abs()) > 0
    assert float((a[moved, 0, 0, 0] - images[moved, 0, 0, 0]).abs()) == 0


def test_organ_contrast_probability_zero_is_identity_and_the_draws_are_fixed():
    images, labels = _organ_scene()
    off = OrganContrastAugment(OrganContrastConfig(enabled=True, prob=0.0),
                               [(-175.0, 250.0)], num_classes=3)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(off(images, labels, g1), images)
    torch.rand(4, 3, generator=g2, dtype=torch.float64)  # the block one call draws
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_organ_contrast_refuses_bad_input():
    aug = OrganContrastAugment(OrganContrastConfig(enabled=True), [(-175.0, 250.0)], num_classes=3)
    images, labels = _organ_scene()
    with pytest.raises(ValueError, match="labels must be"):
        aug(images, labels[:, :10], torch.Generator())
    with pytest.raises(ValueError, match="num_classes"):
        OrganContrastAugment(OrganContrastConfig(), [(-175.0, 250.0)], num_classes=1)
    for bad in ({"prob": 1.5}, {"shift_hu": -1.0}, {"edge_sigma_px": 20}):
        with pytest.raises(ConfigError, match="organ_contrast"):
            OrganContrastConfig(**bad)
