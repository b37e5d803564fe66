"""LRC loss: sampling, validity, known orderings, invariances and a slow loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrcseg.losses.lrc import (
    LRCLoss,
    downsample_regions,
    intensity_bins,
    region_means,
    sample_regions,
    valid_regions,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block_regions(batch: int, side: int = 64, cells: int = 4) -> torch.Tensor:
    """(B, side, side) map of cells x cells square regions with ids 1..cells**2."""
    cell = side // cells
    ids = torch.arange(1, cells * cells + 1).view(cells, cells)
    grid = ids.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return grid.expand(batch, side, side).clone()


def _random_regions(batch: int, gen: torch.Generator, side: int = 32, coarse: int = 8,
                    num_ids: int = 7) -> torch.Tensor:
    """Irregular region maps: random coarse ids (0 = ignore included) upsampled to side."""
    coarse_ids = torch.randint(0, num_ids, (batch, coarse, coarse), generator=gen)
    f = side // coarse
    return coarse_ids.repeat_interleave(f, 1).repeat_interleave(f, 2)


def _region_features(regions_lr: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(B, dim, h, w): one random unit vector per region id, constant within the region."""
    table = F.normalize(torch.randn(int(regions_lr.max()) + 1, dim, generator=gen), dim=1)
    return table[regions_lr].permute(0, 3, 1, 2).contiguous()


def test_downsample_takes_cell_centres():
    regions = torch.randint(0, 50, (2, 64, 48), generator=_gen(0))
    out = downsample_regions(regions, (16, 12))
    assert out.dtype == torch.long
    assert torch.equal(out, regions[:, 2::4, 2::4])


def test_valid_regions_known_counts():
    # view 1: id 1 has 6 px, id 2 has 3 px, id 3 has 7 px; view 2: id 1 has 4, id 2 has 12.
    r1 = torch.tensor([[1] * 6 + [2] * 3 + [3] * 7]).view(1, 4, 4)
    r2 = torch.tensor([[1] * 4 + [2] * 12]).view(1, 4, 4)
    valid = valid_regions(r1, r2, min_pixels=4)
    assert valid.tolist() == [[False, True, False, False]]
    assert valid_regions(r1, r2, min_pixels=3).tolist() == [[False, True, True, False]]
    zero = torch.zeros(1, 4, 4, dtype=torch.long)
    assert valid_regions(zero, zero, 1).tolist() == [[False]]  # id 0 never valid


def test_sampling_is_area_proportional_and_inside_regions():
    # One image repeated 4000 times: regions of 32, 16, 8 pixels at 8x8 (id 0 = 8 px, ignored).
    r = torch.zeros(8, 8, dtype=torch.long)
    r.view(-1)[:32] = 1
    r.view(-1)[32:48] = 2
    r.view(-1)[48:56] = 3
    batch = r.expand(4000, 8, 8)
    sample = sample_regions(batch, batch, num_regions=1, pixels_per_region=8, min_pixels=4,
                            generator=_gen(1))
    assert sample.valid.all()
    freq = torch.bincount(sample.region_ids[:, 0], minlength=4).double() / 4000
    assert freq[0] == 0
    np.testing.assert_allclose(freq[1:].numpy(), [32 / 56, 16 / 56, 8 / 56], atol=0.03)

    sample = sample_regions(batch[:50], batch[:50], num_regions=16, pixels_per_region=8,
                            min_pixels=4, generator=_gen(2))
    assert sample.region_ids.shape == (50, 4)
    assert sample.valid.sum(1).tolist() == [3] * 50
    flat = batch[:50].reshape(50, -1)
    for pixels in (sample.pixels1, sample.pixels2):
        got = flat.gather(1, pixels.reshape(50, -1)).view(50, 4, 8)
        expect = sample.region_ids[..., None].expand_as(got)
        assert torch.equal(got[sample.valid], expect[sample.valid])
        # 8 pixels from regions of >= 8 pixels: all distinct
        for b in range(3):
            for n in range(4):
                if sample.valid[b, n]:
                    assert len(set(pixels[b, n].tolist())) == 8


def test_loss_lower_when_views_correspond():
    regions = _block_regions(2)
    r_lr = downsample_regions(regions, (16, 16))
    feat = _region_features(r_lr, 32, _gen(3))
    shuffled_ids = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(16, generator=_gen(4)) + 1])
    loss_fn = LRCLoss(temperature=0.1)
    matched, stats = loss_fn(feat, feat, regions, regions, generator=_gen(5))
    shuffled, _ = loss_fn(feat, feat, regions, shuffled_ids[regions], generator=_gen(5))
    # matched: every positive has logit 10, so the multi-positive loss is about log(P)
    assert matched.item() == pytest.approx(math.log(8), abs=0.3)
    assert shuffled.item() > matched.item() + 5
    assert stats["valid_regions"].item() == 16
    assert stats["sampled_regions"].item() == 16
    assert "neg_same_organ" not in stats  # no organs given


@pytest.mark.parametrize("variant", ["pixel", "region"])
@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_invariant_to_consistent_id_permutation(variant, negatives):
    gen = _gen(6)
    r1 = _random_regions(3, gen)
    r2 = torch.roll(r1, shifts=(4, -4), dims=(1, 2))
    feat1 = F.normalize(torch.randn(3, 8, 8, 8, generator=gen), dim=1)
    feat2 = F.normalize(torch.randn(3, 8, 8, 8, generator=gen), dim=1)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(6, generator=gen) + 1])
    # N >= number of ids, so every valid region is sampled whatever its id
    loss_fn = LRCLoss(num_regions=8, pixels_per_region=4, min_pixels=2, variant=variant,
                      negatives=negatives)
    a, _ = loss_fn(feat1, feat2, r1, r2, generator=_gen(7))
    b, _ = loss_fn(feat1, feat2, perm[r1], perm[r2], generator=_gen(7))
    assert a.item() > 0.5
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("variant", ["pixel", "region"])
def test_finite_with_zero_or_one_valid_region(variant):
    loss_fn = LRCLoss(variant=variant)
    for regions in (torch.zeros(2, 32, 32, dtype=torch.long), torch.ones(2, 32, 32, dtype=torch.long)):
        feat1 = F.normalize(torch.randn(2, 8, 8, 8), dim=1).requires_grad_()
        feat2 = F.normalize(torch.randn(2, 8, 8, 8), dim=1).requires_grad_()
        loss, stats = loss_fn(feat1, feat2, regions, regions, generator=_gen(8))
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(feat1.grad).all() and torch.isfinite(feat2.grad).all()
        assert stats["sampled_regions"].item() == 0


def test_image_with_one_valid_region_contributes_nothing():
    regions = _block_regions(2, side=32)
    regions[1] = 3  # second image: a single region
    sample = sample_regions(downsample_regions(regions, (8, 8)), downsample_regions(regions, (8, 8)),
                            16, 8, 4, generator=_gen(9))
    assert sample.valid[0].sum() == 16  # 16 regions of 2x2 px at 8x8, all valid and sampled
    assert not sample.valid[1].any()


def test_organ_statistics_separate_background_from_labelled_organs():
    regions = _block_regions(1, side=64, cells=4)  # ids 1..16, 16x16 px cells
    # ids 1..8 background (label 0), 9..12 organ 1, 13..16 organ 2
    organs = torch.where(regions > 12, 2, torch.where(regions > 8, 1, 0)).long()
    feat = F.normalize(torch.randn(1, 8, 16, 16), dim=1)
    _, stats = LRCLoss(num_regions=16)(feat, feat, regions, regions, generator=_gen(10), organs1=organs)
    # 16 regions: 16*15 ordered negative pairs; 8*7 background-background, 2 * 4*3 same organ
    assert stats["neg_background"].item() == pytest.approx(56 / 240)
    assert stats["neg_same_organ"].item() == pytest.approx(24 / 240)
    assert stats["sampled_background"].item() == pytest.approx(0.5)
    assert stats["sampled_organs"].item() == 2


def _two_intensity_image(side=64, cells=4):
    """12 dark regions (ids 1..12, intensity 0.1) and 4 bright ones (13..16, 0.8)."""
    regions = _block_regions(1, side=side, cells=cells)
    image = torch.where(regions > 12, 0.8, 0.1).float()
    return regions, image


@pytest.mark.parametrize("sampling, bright_share", [("uniform", 4 / 16), ("intensity", 0.5)])
def test_sampling_modes_draw_regions_as_documented(sampling, bright_share):
    regions, image = _two_intensity_image()
    r_lr = downsample_regions(regions, (16, 16))
    bins = intensity_bins(image, regions, 17, 8)
    assert bins[0, 13:].eq(6).all() and bins[0, 1:13].eq(0).all()
    gen = _gen(11)
    bright = 0
    trials = 2000
    for _ in range(trials):  # one region per draw: its probability is the normalised weight
        sample = sample_regions(r_lr, r_lr, 2, 1, 1, generator=gen, sampling=sampling, bins=bins)
        bright += int(sample.region_ids[0, 0] > 12)
    assert bright / trials == pytest.approx(bright_share, abs=0.04)


def test_area_sampling_prefers_large_regions():
    regions = torch.ones(1, 64, 64, dtype=torch.long)
    regions[:, :16, :16] = 2  # region 2 is 1/16 of the image, region 1 the rest
    r_lr = downsample_regions(regions, (16, 16))
    gen = _gen(12)
    first_is_large = sum(int(sample_regions(r_lr, r_lr, 2, 1, 1, generator=gen).region_ids[0, 0] == 1)
                         for _ in range(1000))
    assert first_is_large / 1000 == pytest.approx(240 / 256, abs=0.03)


def test_intensity_sampling_needs_the_image():
    regions, image = _two_intensity_image()
    feat = F.normalize(torch.randn(1, 8, 16, 16), dim=1)
    loss_fn = LRCLoss(sampling="intensity")
    with pytest.raises(ValueError, match="image1"):
        loss_fn(feat, feat, regions, regions, generator=_gen(13))
    loss, _ = loss_fn(feat, feat, regions, regions, generator=_gen(13), image1=image)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="sampling"):
        LRCLoss(sampling="bogus")


def _reference_loss(feat1, feat2, r1_lr, r2_lr, sample, temperature, variant, negatives):
    """Plain loops, float64: anchors of one view against the sampled items of the other."""
    f = [feat1.double().numpy(), feat2.double().numpy()]
    regions = [r1_lr.numpy(), r2_lr.numpy()]
    pixels = [sample.pixels1.numpy(), sample.pixels2.numpy()]
    B, N = sample.region_ids.shape
    w = f[0].shape[3]
    items = [[], []]  # per view: list of (image, slot, unit vector)
    for v in range(2):
        for b in range(B):
            for n in range(N):
                if not sample.valid[b, n]:
                    continue
                rid = int(sample.region_ids[b, n])
                if variant == "pixel":
                    for p in pixels[v][b, n]:
                        items[v].append((b, n, f[v][b, :, p // w, p % w]))
                else:
                    mean = f[v][b][:, regions[v][b] == rid].mean(axis=1)
                    items[v].append((b, n, mean / np.linalg.norm(mean)))
    total = 0.0
    for v in range(2):
        losses = []
        for b, n, z in items[v]:
            others = [(b2, n2, z2) for b2, n2, z2 in items[1 - v] if negatives == "batch" or b2 == b]
            denom = sum(math.exp(float(z @ z2) / temperature) for _, _, z2 in others)
            logp = [float(z @ z2) / temperature - math.log(denom)
                    for b2, n2, z2 in others if (b2, n2) == (b, n)]
            losses.append(-sum(logp) / len(logp))
        total += sum(losses) / len(losses)
    return total / 2


@pytest.mark.parametrize("num_regions", [4, 8])  # 8: more slots than valid regions (padding)
@pytest.mark.parametrize("variant", ["pixel", "region"])
@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_equals_slow_reference(variant, negatives, num_regions):
    gen = _gen(11)
    r1 = _random_regions(2, gen)
    r2 = torch.roll(r1, shifts=(4, 8), dims=(1, 2))
    feat1 = F.normalize(torch.randn(2, 6, 8, 8, generator=gen), dim=1)
    feat2 = F.normalize(torch.randn(2, 6, 8, 8, generator=gen), dim=1)
    loss_fn = LRCLoss(temperature=0.2, num_regions=num_regions, pixels_per_region=3,
                      min_pixels=2, variant=variant, negatives=negatives)
    loss, _ = loss_fn(feat1, feat2, r1, r2, generator=_gen(12))
    r1_lr, r2_lr = downsample_regions(r1, (8, 8)), downsample_regions(r2, (8, 8))
    sample = sample_regions(r1_lr, r2_lr, num_regions, 3, 2, generator=_gen(12))
    assert sample.valid.sum(1).min() >= 3  # both images take part
    assert num_regions == 4 or not sample.valid.all()
    expected = _reference_loss(feat1, feat2, r1_lr, r2_lr, sample, 0.2, variant, negatives)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_region_means_by_index_add():
    regions = torch.tensor([[[1, 1], [2, 0]]])
    feat = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # (1, 1, 2, 2)
    means = region_means(feat, regions, 3)
    assert means.view(-1).tolist() == [7.0, 2.0, 5.0]


def test_bf16_features_and_validation():
    regions = _block_regions(2, side=32)
    feat = F.normalize(torch.randn(2, 8, 8, 8), dim=1).bfloat16()
    loss, _ = LRCLoss()(feat, feat, regions, regions, generator=_gen(13))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="temperature"):
        LRCLoss(temperature=0.0)
    with pytest.raises(ValueError, match="variant"):
        LRCLoss(variant="dense")
    with pytest.raises(ValueError, match="negatives"):
        LRCLoss(negatives="queue")
    with pytest.raises(ValueError, match="regions1/regions2"):
        LRCLoss()(feat, feat, regions[:1], regions[:1])
