"""Localized Region Contrast (LRC): the contrastive sampling loss over superpixel regions.

Yan et al., "Localized Region Contrast for Enhancing Self-supervised Learning in Medical Image
Segmentation", MICCAI 2023 (arXiv:2304.03406). The paper gives no formula or code; this is our
reconstruction, LRC_METHOD.md section 6.

Pipeline for a batch of two views (all steps batched, no Python loop over images or regions;
given ``num_ids`` and without organ statistics, no host-device sync: a step issues the same
kernels whatever the batch size and the number of regions). Slices and volume patches go
through the same code: features (B, D, h, w) with region maps (B, H, W), or (B, D, d, h, w)
with supervoxel maps (B, Z, H, W) (a "pixel" below is then a voxel); everything after the
downsampling works on flattened maps.

1. ``downsample_regions``: region maps (B, H, W) -> (B, h, w) at the feature resolution by
   nearest neighbour, taking the pixel at the centre of each (H/h x W/w) cell (in 3D, of
   each Z/d x H/h x W/w cell).
2. ``valid_regions``: region r of image b is valid if it has >= p_min pixels in *both* views
   (id 0 = outside the body is never valid).
3. ``sample_regions``: per image, N valid regions without replacement with probability
   proportional to a weight: their area (pixels in view 1 + view 2, ``sampling="area"``), 1
   (``"uniform"``), or 1 / (valid regions of the image in the same bin of mean window
   intensity) (``"intensity"``: every intensity bin is drawn equally often, so the many
   fat and muscle regions do not crowd out the few organ-bright ones), then P pixels per
   sampled region and view, uniformly among the region's pixels (without replacement when the region has
   >= P pixels, otherwise cycling through all of them). Images with < 2 valid regions
   contribute nothing.
4. The loss (``variant``):

   - "pixel" (default): every sampled pixel i of view 1 is an anchor, with embedding
     z_i = normalize(f_i) (only the sampled pixels' features f are normalised);
     its contrast set A(i) is the sampled pixels of view 2 in the same image
     (``negatives="image"``) or in the whole batch (``"batch"``); its positives Pos(i) are
     those of the same region. Multi-positive InfoNCE (SupCon, Khosla et al. 2020)::

         l_i = -1/|Pos(i)| sum_{p in Pos(i)} log( exp(z_i.z'_p / t) / sum_{a in A(i)} exp(z_i.z'_a / t) )

   - "region" (DetCon-like, Henaff et al. 2021): z_r = normalize(mean of normalize(f_u) over
     *all* pixels u of region r at feature resolution); anchors are the sampled regions of
     view 1, A(i) the sampled regions of view 2 (image or batch), one positive each.

   The loss is symmetric, L = (mean_i l_i(view 1 -> 2) + mean_i l_i(view 2 -> 1)) / 2, with
   the mean over the valid anchors of the batch. Without any valid anchor it is an exact 0
   that still depends on the features (finite gradients, never NaN).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # the loss is built from a config; at run time it needs no lrcseg module
    from lrcseg.config import LRCConfig

# Logit for pairs outside the contrast set: exp() underflows to 0, yet stays finite (no NaN
# gradients for rows that have no valid entry at all).
_EXCLUDED_LOGIT = -1e9


@dataclass
class RegionSample:
    """The random part of the LRC loss, so a reference implementation can reuse it.

    region_ids: (B, N) long, sampled region ids per image (N = min(num_regions, R + 1)).
    valid: (B, N) bool, which slots hold a real sample (a valid region of an image with at
        least 2 valid regions); other slots are padding and are ignored.
    pixels1, pixels2: (B, N, P) long, flat pixel indices (row * w + col; 3D: (slice * h +
        row) * w + col) at the feature resolution of each view, P per sampled region.
    counts1, counts2: (B, R + 1) long, pixels per region id in each view (feature resolution).
    valid_regions: (B, R + 1) bool, ``valid_regions(...)`` of the two views.
    """

    region_ids: Tensor
    valid: Tensor
    pixels1: Tensor
    pixels2: Tensor
    counts1: Tensor
    counts2: Tensor
    valid_regions: Tensor


def downsample_regions(regions: Tensor, size: tuple[int, ...]) -> Tensor:
    """Nearest-neighbour downsampling of region maps (B, H, W) -> (B, h, w), or of supervoxel
    maps (B, Z, H, W) -> (B, d, h, w) with a 3-entry ``size``, long.

    Output pixel (i, j) takes the input pixel at floor((i + 0.5) H / h), floor((j + 0.5) W / w)
    (the same along Z in 3D): the centre of its cell (for H = 4h, row 4i + 2), which is where
    a stride-4 feature is centred, rather than the cell's top-left corner as
    ``F.interpolate(mode="nearest")`` does.
    """
    if len(size) not in (2, 3) or regions.ndim != len(size) + 1:
        raise ValueError(f"regions must be (B, H, W) or (B, Z, H, W) with one output size per "
                         f"spatial axis, got shape {tuple(regions.shape)} and size {tuple(size)}")
    for axis, n in enumerate(size, start=1):
        N = regions.shape[axis]
        index = ((torch.arange(n, device=regions.device) + 0.5) * (N / n)).long().clamp_(max=N - 1)
        regions = regions.index_select(axis, index)
    return regions.long()


def region_counts(regions_lr: Tensor, num_ids: int) -> Tensor:
    """Pixels per region id: (B, h, w) (3D: (B, d, h, w)) long ids in [0, num_ids) ->
    (B, num_ids) long."""
    B = regions_lr.shape[0]
    offsets = torch.arange(B, device=regions_lr.device)[:, None] * num_ids
    flat = (regions_lr.reshape(B, -1) + offsets).reshape(-1)
    return torch.bincount(flat, minlength=B * num_ids).view(B, num_ids)


def _counts_and_validity(regions1_lr: Tensor, regions2_lr: Tensor, min_pixels: int,
                         num_ids: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Counts (B, R + 1) of both views and the validity mask (B, R + 1).

    num_ids: R + 1, an upper bound of the ids + 1 known in advance (no host-device sync);
    None = the largest id in the maps + 1 (one sync).
    """
    if num_ids is None:
        num_ids = int(max(regions1_lr.max(), regions2_lr.max())) + 1
    counts1 = region_counts(regions1_lr, num_ids)
    counts2 = region_counts(regions2_lr, num_ids)
    valid = (counts1 >= min_pixels) & (counts2 >= min_pixels)
    valid[:, 0] = False
    return counts1, counts2, valid


def valid_regions(regions1_lr: Tensor, regions2_lr: Tensor, min_pixels: int) -> Tensor:
    """(B, R + 1) bool: region r is valid if it has >= min_pixels pixels in both views.

    regions*_lr: (B, h, w) (3D: (B, d, h, w)) integer region maps at feature resolution (ids
    0..R, 0 = ignore); R is the largest id in either view. Id 0 is never valid.
    """
    return _counts_and_validity(regions1_lr, regions2_lr, min_pixels)[2]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) drawn on the generator's device, returned on ``device``.

    A CPU generator may drive a GPU run: its numbers are then copied from pinned memory
    without blocking (a copy from pageable memory would wait for the GPU queue to drain, a
    host-device sync per call); the caching host allocator keeps the pinned buffer alive
    until the copy is done.
    """
    gen_device = generator.device if generator is not None else device
    values = torch.rand(shape, generator=generator, device=gen_device)
    if values.device == device:
        return values
    if values.device.type == "cpu" and device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _sample_pixels(
    regions_lr: Tensor, counts: Tensor, region_ids: Tensor, pixels_per_region: int,
    generator: torch.Generator | None,
) -> Tensor:
    """P uniformly drawn pixels per sampled region: (B, N) ids -> (B, N, P) flat indices.

    Every pixel gets a random key u in [0, 1); one stable sort by id + u (float64, exact for
    the 24-bit u of ``torch.rand`` and ids < 2**29) groups each region's pixels into one
    contiguous run in random order (by u, ties by position), starting at the exclusive
    cumulative count; the first P of the run are taken (cyclically if the run is shorter).
    This is the order of "sort by u, then stably by id" in one sort instead of two.
    """
    B = regions_lr.shape[0]
    ids = regions_lr.reshape(B, -1)
    hw = ids.shape[1]
    keys = ids.double() + _rand((B, hw), generator, ids.device).double()
    grouped = torch.argsort(keys, dim=1, stable=True)
    starts = (torch.cumsum(counts, dim=1) - counts).gather(1, region_ids)
    sizes = counts.gather(1, region_ids).clamp(min=1)
    offsets = torch.arange(pixels_per_region, device=ids.device)
    positions = (starts[..., None] + offsets % sizes[..., None]).clamp(max=hw - 1)
    return grouped.gather(1, positions.reshape(B, -1)).view(B, -1, pixels_per_region)


SAMPLING = ("area", "uniform", "intensity")


def intensity_bins(image: Tensor, regions: Tensor, num_ids: int, bins: int) -> Tensor:
    """Bin of each region's mean intensity: image (B, H, W) in [0, 1], regions (B, H, W) long
    ids < num_ids (3D: both (B, Z, H, W)) -> (B, num_ids) long bins in [0, bins) (absent
    regions get bin 0)."""
    means = region_means(image[:, None].float(), regions, num_ids)[..., 0]
    return (means.clamp(0, 1) * bins).long().clamp_(max=bins - 1)


def _region_weights(sampling: str, counts1: Tensor, counts2: Tensor, valid: Tensor,
                    bins: Tensor | None, num_bins: int | None = None) -> Tensor:
    """(B, R + 1) float64 sampling weights of the valid regions (see ``sample_regions``).

    num_bins: an upper bound of the bins + 1 (no host-device sync); None = largest bin + 1.
    """
    if sampling == "area":
        return (counts1 + counts2).double().clamp(min=1)
    if sampling == "uniform":
        return torch.ones_like(counts1, dtype=torch.float64)
    if bins is None:
        raise ValueError("sampling 'intensity' needs the regions' intensity bins")
    if num_bins is None:
        num_bins = int(bins.max()) + 1 if bins.numel() else 1
    B = bins.shape[0]
    flat = (bins + torch.arange(B, device=bins.device)[:, None] * num_bins).reshape(-1)
    per_bin = torch.bincount(flat, weights=valid.reshape(-1).double(), minlength=B * num_bins)
    return 1.0 / per_bin[flat].view_as(counts1).clamp(min=1)


def sample_regions(
    regions1_lr: Tensor, regions2_lr: Tensor, num_regions: int, pixels_per_region: int,
    min_pixels: int, generator: torch.Generator | None = None, num_ids: int | None = None,
    sampling: str = "area", bins: Tensor | None = None, num_bins: int | None = None,
) -> RegionSample:
    """Weighted region sampling and uniform pixel sampling (steps 2-3 above).

    regions*_lr: (B, h, w) (3D: (B, d, h, w)) long region maps of the two views at feature
    resolution.
    Regions are drawn without replacement with probability proportional to their weight w_r
    (``sampling``: area a_r = count_view1(r) + count_view2(r), 1, or 1 / (valid regions in
    r's intensity bin), with ``bins`` (B, R + 1) long from ``intensity_bins``), by
    Efraimidis-Spirakis keys u^(1/w_r) (top-N of the keys = sequential weighted sampling
    without replacement; invalid regions get key -1 and are never chosen before a valid one).
    All randomness comes from ``generator``: region keys (B, R + 1), then pixel keys of view 1
    (B, h*w), then of view 2. num_ids: see ``_counts_and_validity``; num_bins: an upper bound
    of ``bins`` + 1 (e.g. the ``intensity_bins`` count), which spares a host-device sync.
    """
    if regions1_lr.shape[0] != regions2_lr.shape[0]:
        raise ValueError("the two views' region maps have different batch sizes")
    if sampling not in SAMPLING:
        raise ValueError(f"Illegal sampling {sampling!r}: one of {', '.join(SAMPLING)}")
    counts1, counts2, valid = _counts_and_validity(regions1_lr, regions2_lr, min_pixels, num_ids)
    B, num_ids = valid.shape
    weight = _region_weights(sampling, counts1, counts2, valid, bins, num_bins)
    keys = _rand((B, num_ids), generator, valid.device).double().pow(1.0 / weight)
    keys = torch.where(valid, keys, torch.full_like(keys, -1.0))
    n = min(num_regions, num_ids)
    region_ids = torch.topk(keys, n, dim=1).indices
    enough = valid.sum(dim=1, keepdim=True) >= 2
    slot_valid = valid.gather(1, region_ids) & enough
    pixels1 = _sample_pixels(regions1_lr, counts1, region_ids, pixels_per_region, generator)
    pixels2 = _sample_pixels(regions2_lr, counts2, region_ids, pixels_per_region, generator)
    return RegionSample(region_ids, slot_valid, pixels1, pixels2, counts1, counts2, valid)


def region_means(feat: Tensor, regions_lr: Tensor, num_ids: int) -> Tensor:
    """Segment means by ``index_add_``: feat (B, D, h, w), ids (B, h, w) (3D: (B, D, d, h, w),
    (B, d, h, w)) -> (B, num_ids, D).

    Regions absent from an image get a zero vector.
    """
    B, D = feat.shape[:2]
    flat = feat.reshape(B, D, -1).transpose(1, 2).reshape(-1, D)
    index = (regions_lr.reshape(B, -1) + torch.arange(B, device=feat.device)[:, None] * num_ids).reshape(-1)
    sums = flat.new_zeros(B * num_ids, D).index_add_(0, index, flat)
    counts = torch.bincount(index, minlength=B * num_ids).clamp(min=1).to(flat.dtype)
    return (sums / counts[:, None]).view(B, num_ids, D)


def _gather_pixels(feat: Tensor, pixels: Tensor) -> Tensor:
    """feat (B, D, h, w) (3D: (B, D, d, h, w)), pixels (B, N, P) flat -> (B, N * P, D)."""
    B, D = feat.shape[:2]
    index = pixels.reshape(B, 1, -1).expand(B, D, -1)
    return feat.reshape(B, D, -1).gather(2, index).transpose(1, 2)


def _symmetric_infonce(z1: Tensor, z2: Tensor, labels: Tensor, valid: Tensor, temperature: float,
                       per_image: bool) -> Tensor:
    """Multi-positive InfoNCE over both views with one batched matmul.

    z1, z2: (B, M, D) embeddings of the M sampled items of each view; labels: (B, M) long,
    items with equal labels are positives of each other; valid: (B, M) bool.
    per_image: contrast within each image (block-diagonal), else across the whole batch.
    Returns the mean over valid anchors of both directions (a 0 with gradient if none).
    """
    if not per_image:
        z1, z2 = z1.reshape(1, -1, z1.shape[-1]), z2.reshape(1, -1, z2.shape[-1])
        labels, valid = labels.reshape(1, -1), valid.reshape(1, -1)
    logits = torch.bmm(z1, z2.transpose(1, 2)) / temperature  # (G, M, M): view-1 rows
    positive = (labels[:, :, None] == labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    contrast = valid[:, None, :].expand_as(positive)
    total = logits.new_zeros(())
    for view_logits, view_positive, view_contrast in (
        (logits, positive, contrast),
        (logits.transpose(1, 2), positive.transpose(1, 2), contrast),
    ):
        masked = view_logits.masked_fill(~view_contrast, _EXCLUDED_LOGIT)
        log_prob = masked - torch.logsumexp(masked, dim=2, keepdim=True)
        pos = view_positive.to(log_prob.dtype)
        per_anchor = -(log_prob * pos).sum(2) / pos.sum(2).clamp(min=1)
        weight = valid.to(per_anchor.dtype)
        total = total + (per_anchor * weight).sum() / weight.sum().clamp(min=1)
    return total / 2


def region_majority(organs: Tensor, regions_lr: Tensor, num_ids: int) -> Tensor:
    """Majority label of every region id at feature resolution: organs (B, H, W) long labels
    >= 0 (brought to (h, w) like the regions), regions_lr (B, h, w) ids < num_ids ->
    (B, num_ids) long (0 for absent ids). 3D: organs (B, Z, H, W), regions_lr (B, d, h, w)."""
    B = regions_lr.shape[0]
    organs_lr = downsample_regions(organs, tuple(regions_lr.shape[1:]))
    num_organs = int(organs_lr.max()) + 1
    image_offset = torch.arange(B, device=organs_lr.device).view(B, *[1] * (regions_lr.ndim - 1))
    cell = (regions_lr + image_offset * num_ids) * num_organs
    votes = torch.bincount((cell + organs_lr).reshape(-1), minlength=B * num_ids * num_organs)
    return votes.view(B, num_ids, num_organs).argmax(dim=2)


def organ_statistics(sample: RegionSample, organs1: Tensor, regions1_lr: Tensor,
                     per_image: bool) -> dict[str, Tensor]:
    """What the loss sees, by each sampled region's majority label in view 1.

    organs1: (B, H, W) long labels (0 = unlabelled tissue: fat, muscle, bowel, bone...).
    Returns float scalars: "neg_same_organ", the share of negative region pairs whose
    regions share the same *labelled* organ (label > 0: pairs pushed apart that fine-tuning
    must group); "neg_background", the share where both are label 0; "sampled_background",
    the share of sampled regions that are label 0; "sampled_organs", the mean number of
    distinct labelled organs among an image's sampled regions. NaN without pairs/samples
    (0 / 0, so no host-device sync here; ``region_majority`` syncs once).
    """
    num_ids = sample.counts1.shape[1]
    majority = region_majority(organs1, regions1_lr, num_ids).gather(1, sample.region_ids)
    valid = sample.valid
    # distinct labels > 0 per image: in ascending order, each new value is a step up from 0
    labelled = torch.where(valid, majority, 0).sort(dim=1).values
    steps_up = torch.diff(labelled, dim=1, prepend=torch.zeros_like(labelled[:, :1])) != 0
    stats = {
        "sampled_background": ((majority == 0) & valid).sum() / valid.sum(),
        "sampled_organs": steps_up.sum(dim=1).float().mean(),
    }
    if not per_image:
        majority, valid = majority.reshape(1, -1), valid.reshape(1, -1)
    n = valid.shape[1]
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=valid.device)
    same = (majority[:, :, None] == majority[:, None, :]) & pair
    background = (majority[:, :, None] == 0) & same
    pairs = pair.sum()
    stats["neg_same_organ"] = (same & ~background).sum() / pairs
    stats["neg_background"] = background.sum() / pairs
    return {k: v.float() for k, v in stats.items()}


@dataclass(frozen=True)
class ViewMaps:
    """Per-pixel maps of view 1 that only some calls need, beside its region map: each an
    optional (B, H, W) (3D: (B, Z, H, W)) tensor at input resolution, pixel-aligned with
    ``regions1``.

    image: float, view 1's intensity in [0, 1] (the first window of the slice the regions
        belong to). Needed by sampling "intensity": each region's mean in view 1 picks its bin.
    organs: long organ labels >= 0 (0 = unlabelled tissue; phantoms) for the statistics of
        ``organ_statistics``, by each sampled region's majority label. Computing them syncs
        the host with the device: pass them on logging steps only.
    """

    image: Tensor | None = None
    organs: Tensor | None = None


class LRCLoss(nn.Module):
    """The LRC contrastive sampling loss (pixel or region variant), see the module docstring.

    Args:
        cfg: an ``lrcseg.config.LRCConfig``, the one place of the loss's defaults and checks
            (N = num_regions, P = pixels_per_region, p_min = min_pixels, variant, negatives,
            sampling, intensity_bins, temperature t; its enabled and weight are the training
            loop's). The loss keeps a validated copy as ``cfg``.

    forward(feat1, feat2, regions1, regions2, generator=None, num_ids=None, maps1=None):
        feat1, feat2: (B, D, h, w) local features of the two views (3D: (B, D, d, h, w), one
            decoder level of a volume patch), raw or L2-normalised per pixel: the loss L2-normalises every vector it uses (pixel variant: only the
            B x N x P sampled pixels, after gathering; region variant: every pixel before
            the segment means), so unit-norm inputs give the same loss up to float rounding
            and a head that leaves its map unnormalised spares a pass over the whole map.
        regions1, regions2: (B, H, W) integer region maps at input resolution (0 = ignore),
            ids corresponding across views (3D: (B, Z, H, W) supervoxel maps); brought to the
            features' resolution by ``downsample_regions``.
        generator: torch.Generator for the sampling (None = global RNG).
        num_ids: an upper bound of the region ids + 1 (e.g. from the region cache), which
            spares a host-device sync per call; None = the maps' largest id + 1.
        maps1: ``ViewMaps`` of view 1: its image (sampling "intensity" needs it) and organ
            labels (statistics only); None = neither.
    Returns (loss, stats): a float32 scalar and detached scalars
        {"valid_regions": mean valid regions per image, "sampled_regions": mean sampled
        regions per image} and, with organs, ``organ_statistics``'s "neg_same_organ",
        "neg_background", "sampled_background", "sampled_organs".
    """

    def __init__(self, cfg: LRCConfig):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)  # a copy, validated again by LRCConfig

    def forward(self, feat1: Tensor, feat2: Tensor, regions1: Tensor, regions2: Tensor,
                generator: torch.Generator | None = None, num_ids: int | None = None,
                maps1: ViewMaps | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if feat1.ndim not in (4, 5) or feat1.shape != feat2.shape:
            raise ValueError(f"feat1/feat2 must be equal (B, D, h, w) or (B, D, d, h, w), got "
                             f"{tuple(feat1.shape)}, {tuple(feat2.shape)}")
        maps = "(B, H, W)" if feat1.ndim == 4 else "(B, Z, H, W)"
        if (regions1.ndim != feat1.ndim - 1 or regions1.shape[0] != feat1.shape[0]
                or regions1.shape != regions2.shape):
            raise ValueError(
                f"regions1/regions2 must be {maps} with B = {feat1.shape[0]} for features "
                f"{tuple(feat1.shape)}, got {tuple(regions1.shape)}, {tuple(regions2.shape)}"
            )
        cfg, maps1 = self.cfg, maps1 or ViewMaps()
        feat1, feat2 = feat1.float(), feat2.float()
        size = tuple(feat1.shape[2:])
        r1 = downsample_regions(regions1, size)
        r2 = downsample_regions(regions2, size)
        bins = None
        if cfg.sampling == "intensity":
            if maps1.image is None or maps1.image.shape != regions1.shape:
                raise ValueError(f"sampling 'intensity' needs maps1.image {maps} like regions1")
            ids = num_ids if num_ids is not None else int(max(r1.max(), r2.max())) + 1
            bins = intensity_bins(maps1.image, regions1.long().clamp(max=ids - 1), ids, cfg.intensity_bins)
        sample = sample_regions(r1, r2, cfg.num_regions, cfg.pixels_per_region, cfg.min_pixels,
                                generator, num_ids, cfg.sampling, bins, cfg.intensity_bins)
        loss = self.loss_from_sample(feat1, feat2, r1, r2, sample)
        B = feat1.shape[0]
        stats = {
            "valid_regions": sample.valid_regions.sum().float() / B,
            "sampled_regions": sample.valid.sum().float() / B,
        }
        if maps1.organs is not None:
            stats.update(organ_statistics(sample, maps1.organs, r1, cfg.negatives == "image"))
        return loss, stats

    def loss_from_sample(self, feat1: Tensor, feat2: Tensor, regions1_lr: Tensor, regions2_lr: Tensor,
                         sample: RegionSample) -> Tensor:
        """The loss for a given ``RegionSample`` (features (B, D, h, w), raw or unit-norm per
        pixel, regions (B, h, w); 3D: (B, D, d, h, w), (B, d, h, w)); features are
        L2-normalised here, see ``forward``."""
        B, N = sample.region_ids.shape
        slot = torch.arange(B * N, device=feat1.device).view(B, N)
        if self.cfg.variant == "pixel":
            P = self.cfg.pixels_per_region
            z1 = F.normalize(_gather_pixels(feat1, sample.pixels1), dim=2)
            z2 = F.normalize(_gather_pixels(feat2, sample.pixels2), dim=2)
            labels = slot.repeat_interleave(P, dim=1)
            valid = sample.valid.repeat_interleave(P, dim=1)
        else:
            num_ids = sample.counts1.shape[1]
            index = sample.region_ids[..., None].expand(B, N, feat1.shape[1])
            means1 = region_means(F.normalize(feat1, dim=1), regions1_lr, num_ids)
            means2 = region_means(F.normalize(feat2, dim=1), regions2_lr, num_ids)
            z1 = F.normalize(means1, dim=2).gather(1, index)
            z2 = F.normalize(means2, dim=2).gather(1, index)
            labels, valid = slot, sample.valid
        # Always a function of the gathered features: without valid anchors it is an exact 0
        # whose backward gives zero (not missing) gradients.
        return _symmetric_infonce(z1, z2, labels, valid, self.cfg.temperature,
                                  self.cfg.negatives == "image")
