"""LRC loss: sampling, validity, known orderings, invariances and a slow loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lrcseg.config import LRCConfig
from lrcseg.errors import ConfigError
from lrcseg.losses import lrc
from lrcseg.losses.lrc import (
    LRCLoss,
    ViewMaps,
    downsample_regions,
    intensity_bins,
    region_means,
    sample_regions,
    valid_regions,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loss(**fields) -> LRCLoss:
    """The loss of ``LRCConfig(**fields)``: the config's defaults for every other field."""
    return LRCLoss(LRCConfig(**fields))


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
    loss_fn = _loss(temperature=0.1)
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
    loss_fn = _loss(num_regions=8, pixels_per_region=4, min_pixels=2, variant=variant,
                    negatives=negatives)
    a, _ = loss_fn(feat1, feat2, r1, r2, generator=_gen(7))
    b, _ = loss_fn(feat1, feat2, perm[r1], perm[r2], generator=_gen(7))
    assert a.item() > 0.5
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("variant", ["pixel", "region"])
def test_finite_with_zero_or_one_valid_region(variant):
    loss_fn = _loss(variant=variant)
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
    _, stats = _loss(num_regions=16)(feat, feat, regions, regions, generator=_gen(10),
                                     maps1=ViewMaps(organs=organs))
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
    loss_fn = _loss(sampling="intensity")
    with pytest.raises(ValueError, match="maps1.image"):
        loss_fn(feat, feat, regions, regions, generator=_gen(13))
    with pytest.raises(ValueError, match="maps1.image"):
        loss_fn(feat, feat, regions, regions, generator=_gen(13), maps1=ViewMaps(organs=regions))
    loss, _ = loss_fn(feat, feat, regions, regions, generator=_gen(13), maps1=ViewMaps(image=image))
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="sampling"):
        _loss(sampling="bogus")


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
    loss_fn = _loss(temperature=0.2, num_regions=num_regions, pixels_per_region=3,
                    min_pixels=2, variant=variant, negatives=negatives, sampling="area")
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
    loss, _ = _loss()(feat, feat, regions, regions, generator=_gen(13))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for field, value in [("temperature", 0.0), ("variant", "dense"), ("negatives", "queue"),
                         ("num_regions", 1), ("pixels_per_region", 0), ("min_pixels", 0),
                         ("intensity_bins", 1)]:
        with pytest.raises(ConfigError, match=field):
            _loss(**{field: value})
    with pytest.raises(ValueError, match="regions1/regions2"):
        _loss()(feat, feat, regions[:1], regions[:1])


def test_the_config_is_the_one_source_of_defaults_and_checks():
    cfg = LRCConfig(num_regions=8, sampling="area")
    loss_fn = LRCLoss(cfg)
    assert LRCLoss(LRCConfig()).cfg == LRCConfig()
    assert loss_fn.cfg == cfg and loss_fn.cfg is not cfg  # a copy: later edits do not reach it
    cfg.num_regions = 1  # a dataclass does not check assignments: the copy is checked again
    with pytest.raises(ConfigError, match="num_regions"):
        LRCLoss(cfg)


# ---------------------------------------------------------------- the previous implementation
# The loss before issue 18, kept only here as the reference of the faster one: the head
# L2-normalised the whole map, pixels were drawn by two sorts (by random key, then stably by
# region id), and the sampled features were gathered from the normalised map.


def _two_sort_pixels(regions_lr, counts, region_ids, pixels_per_region, generator):
    B = regions_lr.shape[0]
    ids = regions_lr.reshape(B, -1)
    hw = ids.shape[1]
    shuffled = torch.argsort(torch.rand((B, hw), generator=generator), dim=1)
    by_region = torch.argsort(ids.gather(1, shuffled), dim=1, stable=True)
    grouped = shuffled.gather(1, by_region)
    starts = (torch.cumsum(counts, dim=1) - counts).gather(1, region_ids)
    sizes = counts.gather(1, region_ids).clamp(min=1)
    offsets = torch.arange(pixels_per_region)
    positions = (starts[..., None] + offsets % sizes[..., None]).clamp(max=hw - 1)
    return grouped.gather(1, positions.reshape(B, -1)).view(B, -1, pixels_per_region)


def _previous_sample(r1, r2, cfg, generator, num_ids=None, bins=None):
    counts1, counts2, valid = lrc._counts_and_validity(r1, r2, cfg.min_pixels, num_ids)
    B, num_ids = valid.shape
    weight = lrc._region_weights(cfg.sampling, counts1, counts2, valid, bins)
    keys = torch.rand((B, num_ids), generator=generator).double().pow(1.0 / weight)
    keys = torch.where(valid, keys, torch.full_like(keys, -1.0))
    region_ids = torch.topk(keys, min(cfg.num_regions, num_ids), dim=1).indices
    slot_valid = valid.gather(1, region_ids) & (valid.sum(dim=1, keepdim=True) >= 2)
    P = cfg.pixels_per_region
    pixels1 = _two_sort_pixels(r1, counts1, region_ids, P, generator)
    pixels2 = _two_sort_pixels(r2, counts2, region_ids, P, generator)
    return lrc.RegionSample(region_ids, slot_valid, pixels1, pixels2, counts1, counts2, valid)


def _previous_loss(cfg, raw1, raw2, regions1, regions2, generator, num_ids=None, image1=None):
    """The previous LRCLoss.forward (for LRCConfig ``cfg``) on the head's normalised maps:
    (loss, sample, r1)."""
    feat1, feat2 = F.normalize(raw1.float(), dim=1), F.normalize(raw2.float(), dim=1)
    r1 = downsample_regions(regions1, tuple(feat1.shape[-2:]))
    r2 = downsample_regions(regions2, tuple(feat1.shape[-2:]))
    bins = None
    if cfg.sampling == "intensity":
        ids = num_ids if num_ids is not None else int(max(r1.max(), r2.max())) + 1
        bins = intensity_bins(image1, regions1.long().clamp(max=ids - 1), ids, cfg.intensity_bins)
    sample = _previous_sample(r1, r2, cfg, generator, num_ids, bins)
    B, N = sample.region_ids.shape
    slot = torch.arange(B * N).view(B, N)
    if cfg.variant == "pixel":
        P = cfg.pixels_per_region
        z1 = lrc._gather_pixels(feat1, sample.pixels1)
        z2 = lrc._gather_pixels(feat2, sample.pixels2)
        labels, valid = slot.repeat_interleave(P, dim=1), sample.valid.repeat_interleave(P, dim=1)
    else:
        ids = sample.counts1.shape[1]
        index = sample.region_ids[..., None].expand(B, N, feat1.shape[1])
        z1 = F.normalize(region_means(feat1, r1, ids), dim=2).gather(1, index)
        z2 = F.normalize(region_means(feat2, r2, ids), dim=2).gather(1, index)
        labels, valid = slot, sample.valid
    loss = lrc._symmetric_infonce(z1, z2, labels, valid, cfg.temperature,
                                  cfg.negatives == "image")
    return loss, sample, r1


def _previous_organ_statistics(sample, organs1, r1, per_image):
    B, num_ids = sample.counts1.shape
    majority = lrc.region_majority(organs1, r1, num_ids).gather(1, sample.region_ids)
    num_organs = int(majority.max()) + 1
    valid = sample.valid
    nan = torch.tensor(math.nan)
    present = torch.zeros(B, num_organs, dtype=torch.bool)
    present.scatter_(1, torch.where(valid, majority, 0), valid)
    sampled = valid.sum()
    stats = {"sampled_background": ((majority == 0) & valid).sum() / sampled if sampled > 0 else nan,
             "sampled_organs": present[:, 1:].sum(dim=1).float().mean()}
    if not per_image:
        majority, valid = majority.reshape(1, -1), valid.reshape(1, -1)
    n = valid.shape[1]
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool)
    same = (majority[:, :, None] == majority[:, None, :]) & pair
    background = (majority[:, :, None] == 0) & same
    pairs = pair.sum()
    stats["neg_same_organ"] = (same & ~background).sum() / pairs if pairs > 0 else nan
    stats["neg_background"] = background.sum() / pairs if pairs > 0 else nan
    return {k: v.float() for k, v in stats.items()}


def _edge_case_batch(gen, side=32, coarse=16):
    """Four images: irregular regions of ids < 40 (many with fewer pixels than P), one with
    no valid region (all outside the body), one with a single region, irregular again."""
    regions = _random_regions(4, gen, side=side, coarse=coarse, num_ids=40)
    regions[1] = 0
    regions[2] = 5
    return regions


@pytest.mark.parametrize("variant, negatives, sampling", [
    ("pixel", "image", "area"), ("pixel", "batch", "uniform"), ("pixel", "image", "intensity"),
    ("region", "image", "area"), ("region", "batch", "intensity"),
])
@pytest.mark.parametrize("min_pixels, pixels_per_region", [(1, 8), (2, 3)])
def test_equals_previous_implementation_value_and_gradients(variant, negatives, sampling,
                                                            min_pixels, pixels_per_region):
    gen = _gen(20)
    regions1 = _edge_case_batch(gen)
    regions2 = torch.roll(regions1, shifts=(4, -8), dims=(1, 2))
    image1 = torch.rand(regions1.shape, generator=gen)
    cfg = LRCConfig(temperature=0.2, num_regions=6, pixels_per_region=pixels_per_region,
                    min_pixels=min_pixels, variant=variant, negatives=negatives, sampling=sampling)
    loss_fn = LRCLoss(cfg)
    maps1 = ViewMaps(image=image1)
    # two local levels (1/4 and 1/2 resolution), drawn one after the other from one generator
    # as in PretrainStep; raw (unnormalised) maps with a non-unit scale
    raws = [(3 * torch.randn(4, 5, s, s, generator=gen)).requires_grad_() for s in (8, 16) for _ in (0, 1)]
    expect_gen, got_gen, unit_gen = _gen(21), _gen(21), _gen(21)
    expected, got, got_unit = [], [], []
    for level in range(2):
        raw1, raw2 = raws[2 * level], raws[2 * level + 1]
        loss, sample, _ = _previous_loss(cfg, raw1, raw2, regions1, regions2, expect_gen,
                                         num_ids=41, image1=image1)
        assert sample.valid[1:3].sum() == 0  # no valid region / a single one: no samples
        if pixels_per_region == 8:  # regions with fewer pixels than P: cycled
            sizes = sample.counts1.gather(1, sample.region_ids)[sample.valid]
            assert (sizes < pixels_per_region).any()
        expected.append(loss)
        got.append(loss_fn(raw1, raw2, regions1, regions2, generator=got_gen, num_ids=41,
                           maps1=maps1)[0])
        unit1, unit2 = F.normalize(raw1, dim=1), F.normalize(raw2, dim=1)
        got_unit.append(loss_fn(unit1, unit2, regions1, regions2, generator=unit_gen, num_ids=41,
                                maps1=maps1)[0])
    for a, b, c in zip(expected, got, got_unit, strict=True):
        assert a.item() > 0.1
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(torch.stack(losses).mean(), raws) for losses in (expected, got, got_unit)]
    for g_expected, g_got, g_unit in zip(*grads, strict=True):
        assert g_expected.abs().max() > 0
        torch.testing.assert_close(g_got, g_expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_unit, g_expected, rtol=1e-5, atol=1e-7)


def test_one_sort_pixel_sampling_equals_two_sorts():
    # 56 x 56 maps (3,136 pixels): 24-bit random keys tie inside a region in about a third of
    # the images, so the tie order is exercised too
    gen = _gen(22)
    regions = _random_regions(64, gen, side=56, coarse=7, num_ids=40)
    counts = lrc.region_counts(regions, 40)
    region_ids = torch.topk(torch.rand(64, 40, generator=gen), 16, dim=1).indices
    for P in (1, 8, 200):  # 200: more than some regions' pixels (cycling)
        expected = _two_sort_pixels(regions, counts, region_ids, P, _gen(23))
        got = lrc._sample_pixels(regions, counts, region_ids, P, _gen(23))
        assert torch.equal(got, expected)


@pytest.mark.parametrize("per_image", [True, False])
def test_organ_statistics_equal_previous_implementation(per_image):
    gen = _gen(24)
    regions = _edge_case_batch(gen, side=64, coarse=16)
    organs = (regions * 7 % 5).long()  # labels 0..4, shared by several regions
    r1 = downsample_regions(regions, (16, 16))
    sample = sample_regions(r1, r1, 8, 4, 2, generator=_gen(25))
    got = lrc.organ_statistics(sample, organs, r1, per_image)
    expected = _previous_organ_statistics(sample, organs, r1, per_image)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7)
    nothing = sample_regions(r1[1:2], r1[1:2], 8, 4, 2, generator=_gen(26))  # no valid region
    empty = lrc.organ_statistics(nothing, organs[1:2], r1[1:2], per_image)
    assert math.isnan(empty["sampled_background"]) and math.isnan(empty["neg_same_organ"])
    assert empty["sampled_organs"].item() == 0


def test_unnormalised_head_gives_the_same_loss_and_weight_gradients():
    from lrcseg.models.heads import LocalProjectionHead

    gen = _gen(27)
    regions = _random_regions(2, gen, side=64, coarse=8)
    x1, x2 = torch.randn(2, 2, 6, 16, 16, generator=gen)
    losses, grads = [], []
    for normalize in (True, False):
        torch.manual_seed(0)
        head = LocalProjectionHead(6, 8, normalize=normalize)
        loss, _ = _loss(min_pixels=2)(head(x1), head(x2), regions, regions.roll(4, 1),
                                      generator=_gen(28))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(head.parameters())))
    assert not torch.allclose(head(x1).norm(dim=1), torch.ones(2, 16, 16))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched (each is one kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant, sampling", [("pixel", "area"), ("pixel", "intensity"),
                                               ("region", "uniform")])
def test_step_issues_the_same_kernels_for_any_batch_and_region_count(variant, sampling):
    """Forward + backward of a training step (num_ids known, no organ statistics) dispatches
    one fixed sequence of operators, whatever B and the number of regions, and never reads a
    device value on the host (``_local_scalar_dense`` is what int()/bool()/item() call)."""
    loss_fn = _loss(num_regions=8, pixels_per_region=4, min_pixels=2, variant=variant,
                    sampling=sampling)
    sequences = []
    for batch, num_ids in ((2, 5), (6, 30)):
        gen = _gen(batch)
        regions = _random_regions(batch, gen, side=64, coarse=16, num_ids=num_ids)
        image = torch.rand(regions.shape, generator=gen)
        raw1, raw2 = (torch.randn(batch, 8, 16, 16, generator=gen).requires_grad_() for _ in (0, 1))
        with _OpCounter() as counter:
            loss, _ = loss_fn(raw1, raw2, regions, regions.roll(3, 2), generator=_gen(29),
                              num_ids=num_ids, maps1=ViewMaps(image=image))
            loss.backward()
        assert "_local_scalar_dense" not in counter.ops
        sequences.append(counter.ops)
    assert sequences[0] == sequences[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned random-key copies)")
def test_cpu_generator_on_cuda_gives_the_cpu_sample_and_loss():
    gen = _gen(30)
    regions = _random_regions(3, gen, side=64, coarse=16, num_ids=20)
    raw1, raw2 = torch.randn(2, 3, 8, 16, 16, generator=gen)
    loss_fn = _loss(num_regions=8, pixels_per_region=4, min_pixels=2)
    expected, _ = loss_fn(raw1, raw2, regions, regions.roll(3, 1), generator=_gen(31), num_ids=20)
    cuda = [t.cuda() for t in (raw1, raw2, regions, regions.roll(3, 1))]
    got, _ = loss_fn(*cuda, generator=_gen(31), num_ids=20)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6)
