"""Augmentation, batched on CPU or GPU: pre-training's paired views and fine-tuning's crops.

Pre-training (``PairedViewAugment``): each view gets its own geometric transform (random
resized crop, optional horizontal flip, small rotation) composed into one 2x3 affine per sample
and applied with ``affine_grid`` / ``grid_sample``: bilinear for the image, nearest for the
region map, so region ids keep corresponding across the two views by construction. Intensity
jitter (gamma, contrast, brightness, blur, noise) touches the image only.
Fine-tuning: ``augment_labelled`` (zoom, rotation, translation through the same affine
builder), then ``OrganContrastAugment`` (a simulated contrast phase: each labelled organ's HU
shifted by its own offset), then ``IntensityAugment`` (nnU-Net's default CT intensity
transforms); both touch the image only.
All randomness comes from the ``torch.Generator`` passed in, so the output is a pure function
of its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lrcseg.config import AugmentConfig, IntensityAugmentConfig, OrganContrastConfig

#: candidate second crops drawn per sample before the fallback (vectorised over the batch)
CROP_TRIES = 10
#: fallback steps: the second crop's centre moves to c1 + t * (c2 - c1), largest t that works
_FALLBACK_STEPS = (0.75, 0.5, 0.25, 0.0)


def box_overlap(box1: Tensor, box2: Tensor) -> Tensor:
    """Intersection area over the smaller box's area.

    box*: (..., 4) float tensors (cx, cy, w, h) in fractions of the canvas (centre and size).
    Returns (...) in [0, 1].
    """
    lo = torch.maximum(box1[..., :2] - box1[..., 2:] / 2, box2[..., :2] - box2[..., 2:] / 2)
    hi = torch.minimum(box1[..., :2] + box1[..., 2:] / 2, box2[..., :2] + box2[..., 2:] / 2)
    inter = (hi - lo).clamp(min=0).prod(-1)
    smaller = torch.minimum(box1[..., 2:].prod(-1), box2[..., 2:].prod(-1))
    return inter / smaller


class PairedViewAugment:
    """Two augmented views of a batch of slices and of their region maps.

    cfg: AugmentConfig. Crop size: with ``cfg.zoom`` (the default) a crop of side
    image_size / z pixels at the slice's native spacing, z log-uniform in zoom (fine-tuning's
    scale range); with zoom None, a crop area ~ U(crop_scale) of the input canvas. Aspect
    ratio (width / height in pixels) log-uniform in crop_ratio, each side clipped to the canvas; the second
    crop is drawn so the two crops overlap by >= min_overlap of the smaller one (rejection
    sampling, CROP_TRIES candidates, then a fallback that moves the candidate's centre towards
    the first crop, and as a last resort copies the first crop). Rotation ~ U(+-rotation_deg)
    about the crop centre, flip with probability 1/2 if hflip. Out-of-canvas pixels get image
    0 and region 0 (ignored).
    Intensity, per sample, in this order: x <- x**g with g log-uniform in gamma;
    x <- (x - mean(x)) * c + mean(x), c ~ U(1 +- contrast); x <- x + U(+-brightness);
    Gaussian blur of std ~ U(blur_sigma) with probability blur_prob; x <- x + n * s with
    n ~ N(0, 1) per pixel and s ~ U(0, noise_std) per sample. A zero amplitude skips the step.

    Call with images (B, C, H, W) float, regions (B, H, W) integer, generator a CPU
    torch.Generator; returns view1 (B, C, S, S), regions1 (B, S, S) long, view2, regions2 with
    S = cfg.image_size, on the images' device.
    """

    def __init__(self, cfg: AugmentConfig):
        if not isinstance(cfg, AugmentConfig):
            raise ValueError(f"PairedViewAugment needs an AugmentConfig, got {type(cfg).__name__}")
        self.cfg = cfg

    def __call__(self, images: Tensor, regions: Tensor,
                 generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float (B, C, H, W) tensor, got {tuple(images.shape)} "
                             f"{images.dtype}")
        b, _, h, w = images.shape
        if regions.shape != (b, h, w):
            raise ValueError(f"regions shape {tuple(regions.shape)} must be (B, H, W) = {(b, h, w)}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        box1, box2 = self.sample_crop_pair(b, h, w, generator)
        outputs = []
        for box in (box1, box2):
            theta = self.affine(box, h, w, generator).to(images.device)
            view, view_regions = self._warp(images, regions, theta)
            outputs += [jitter_intensity(view, self.cfg, generator), view_regions]
        return outputs[0], outputs[1], outputs[2], outputs[3]

    # ------------------------------------------------------------------ geometry
    def sample_crops(self, n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """n random resized crop boxes (n, 4) = (cx, cy, w, h) in fractions of the canvas."""
        lo_r, hi_r = math.log(self.cfg.crop_ratio[0]), math.log(self.cfg.crop_ratio[1])
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        if self.cfg.zoom is not None:
            lo_z, hi_z = math.log(self.cfg.zoom[0]), math.log(self.cfg.zoom[1])
            side = self.cfg.image_size / torch.exp(lo_z + (hi_z - lo_z) * u[:, 0])
            area = side * side
        else:
            lo_s, hi_s = self.cfg.crop_scale
            area = (lo_s + (hi_s - lo_s) * u[:, 0]) * height * width
        ratio = torch.exp(lo_r + (hi_r - lo_r) * u[:, 1])
        bw = (torch.sqrt(area * ratio) / width).clamp(max=1.0)
        bh = (torch.sqrt(area / ratio) / height).clamp(max=1.0)
        cx = bw / 2 + u[:, 2] * (1 - bw)
        cy = bh / 2 + u[:, 3] * (1 - bh)
        return torch.stack([cx, cy, bw, bh], dim=1)

    def sample_crop_pair(self, batch: int, height: int, width: int,
                         generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Crop boxes (B, 4) for both views; box_overlap(box1, box2) >= cfg.min_overlap."""
        need = self.cfg.min_overlap
        box1 = self.sample_crops(batch, height, width, generator)
        cand = self.sample_crops(CROP_TRIES * batch, height, width, generator).view(CROP_TRIES, batch, 4)
        # Fallback candidates: the first try's centre pulled towards the first crop's centre.
        first = cand[0]
        half = first[:, 2:] / 2
        pulled = []
        for t in _FALLBACK_STEPS:
            centre = box1[:, :2] + t * (first[:, :2] - box1[:, :2])
            centre = torch.minimum(torch.maximum(centre, half), 1 - half)
            pulled.append(torch.cat([centre, first[:, 2:]], dim=1))
        cand = torch.cat([cand, torch.stack(pulled), box1[None]], dim=0)  # last: a copy of box1
        ok = box_overlap(box1[None], cand) >= need
        ok[-1] = True
        pick = torch.argmax(ok.to(torch.int8), dim=0)  # first candidate that satisfies
        box2 = cand[pick, torch.arange(batch)]
        return box1, box2

    def affine(self, boxes: Tensor, height: int, width: int, generator: torch.Generator) -> Tensor:
        """(B, 2, 3) float32 ``affine_grid`` matrices: output [-1, 1]^2 -> input normalised coords.

        Half-sizes a = w*W/2, b = h*H/2 pixels, flip s = +-1, rotation phi, centre (cx, cy):
        ``affine_theta`` with (s*a, b) and translation (2*cx - 1, 2*cy - 1), so the rotation is
        a true rotation in pixel space even on a non-square canvas.
        """
        n = boxes.shape[0]
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        phi = math.radians(self.cfg.rotation_deg) * (2 * u[:, 0] - 1)
        flip = torch.where((u[:, 1] < 0.5) & self.cfg.hflip, -1.0, 1.0).to(torch.float64)
        half_w = boxes[:, 2] * width / 2 * flip
        half_h = boxes[:, 3] * height / 2
        theta = affine_theta(torch.cos(phi), torch.sin(phi), half_w, half_h,
                             2 * boxes[:, 0] - 1, 2 * boxes[:, 1] - 1, width, height)
        return theta.to(torch.float32)

    def _warp(self, images: Tensor, regions: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return warp(images, regions, theta, self.cfg.image_size)

    def labels_in_views(self, organs: Tensor, replay: torch.Generator) -> tuple[Tensor, Tensor]:
        """Organ labels (B, H, W) carried through the same geometry as the views.

        ``replay`` must be a fresh copy of the generator the views were drawn from: the
        augmentation is replayed on a dummy image, so the label maps get exactly the views'
        geometric transforms (nearest neighbour). Pixels outside the canvas, and unlabelled
        slices (-1), come back as 0 (background; for LRC they lie in region 0, never sampled).
        Returns labels1, labels2 (B, S, S) long.
        """
        dummy = torch.zeros(organs.shape[0], 1, *organs.shape[1:], device=organs.device)
        _, labels1, _, labels2 = self(dummy, organs.clamp(min=0), replay)
        return labels1, labels2


def affine_theta(cos: Tensor, sin: Tensor, half_w: Tensor, half_h: Tensor, shift_x: Tensor,
                 shift_y: Tensor, width: float, height: float) -> Tensor:
    """The one affine builder of pre-training views and fine-tuning crops: (B, 2, 3) matrices
    for ``affine_grid`` (output [-1, 1]^2 -> input normalised coordinates).

    theta = [[2/W cos hw, -2/W sin hh, tx], [2/H sin hw, 2/H cos hh, ty]], i.e. the output
    square scaled by (hw, hh) (half-sizes in the units of W, H; a negative hw flips left-right),
    rotated by phi (cos, sin), mapped to normalised input coordinates and translated by
    (tx, ty). All arguments (B,) tensors of one dtype except W, H (the input's extent in the
    same units as hw, hh: pixels, or 2 for half-sizes already in normalised units).
    """
    return torch.stack([
        torch.stack([2 / width * cos * half_w, -2 / width * sin * half_h, shift_x], dim=1),
        torch.stack([2 / height * sin * half_w, 2 / height * cos * half_h, shift_y], dim=1),
    ], dim=1)


def warp(images: Tensor, maps: Tensor, theta: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Resample images (B, C, H, W) bilinearly and integer maps (B, H, W) (regions, labels) by
    nearest neighbour on a size x size output grid of ``theta`` (B, 2, 3) float32; outside the
    input: 0. Returns (B, C, size, size) in the images' dtype and (B, size, size) long."""
    b, c = images.shape[:2]
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    view = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    # float32 holds integer ids exactly up to 2**24
    ids = F.grid_sample(maps[:, None].to(torch.float32), grid, mode="nearest",
                        padding_mode="zeros", align_corners=False)
    return view, ids[:, 0].round().long()


def augment_labelled(images: Tensor, labels: Tensor, size: int, rotation_deg: float, hflip: bool,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Fine-tuning's augmentation: random scale (0.8-1.25 zoom), rotation, translation and
    optional left-right flip, then a size x size window (``affine_theta``, ``warp``).

    images (B, C, S, S) float, labels (B, S, S) integer -> (B, C, size, size), (B, size, size)
    long. Parameters are drawn from ``generator`` (a pure function of the step).
    """
    b, _, s, _ = images.shape
    zoom = torch.exp(torch.empty(b).uniform_(math.log(0.8), math.log(1.25), generator=generator))
    angle = torch.empty(b).uniform_(-rotation_deg, rotation_deg, generator=generator) * math.pi / 180
    extent = size / s / zoom  # output window side as a fraction of the canvas
    shift = torch.empty(b, 2).uniform_(-0.5, 0.5, generator=generator) * (1 - extent).clamp(min=0)[:, None] * 2
    flip = (torch.rand(b, generator=generator) < 0.5) if hflip else torch.zeros(b, dtype=torch.bool)
    sign = torch.where(flip, -1.0, 1.0)
    theta = affine_theta(torch.cos(angle), torch.sin(angle), extent * sign, extent,
                         shift[:, 0], shift[:, 1], 2.0, 2.0)
    return warp(images, labels, theta.to(images.device), size)


#: uniform draws per sample of one IntensityAugment call (fixed, whatever the probabilities)
INTENSITY_DRAWS = 19


class IntensityAugment:
    """Fine-tuning's intensity augmentation: nnU-Net's default CT transforms, on the image only.

    Each transform acts on a sample with its probability (``cfg.*_prob``), in nnU-Net's order
    (x: the windowed image, values in [0, 1] before augmentation; w, lo: a channel's window
    width and low end in HU):

    1. Gaussian noise: x <- x + n s / w, n ~ N(0, 1) per pixel, s ~ U(noise_std_hu) HU. One HU
       noise field per slice, shared by that slice's windows.
    2. Gaussian blur: separable, std ~ U(blur_sigma_px) pixels drawn per axis.
    3. Brightness: x <- c + m (x - c), c = (brightness_centre_hu - lo) / w: the HU are scaled by
       m about brightness_centre_hu.
    4. Contrast: x <- clamp(mu + m (x - mu), min, max) with the mean mu, min and max of the
       sample's channel.
    5. Simulated low resolution: nearest-exact downsampling to round(side * s) pixels per side,
       s ~ U(lowres_scale), then bilinear upsampling back (``simulate_low_resolution``).
    6. Inverted gamma (``gamma_inverted_prob``), then 7. gamma (``gamma_prob``): with the
       channel's min a and range r, x <- a + r ((x - a) / r)**g (inverted: the same on -x),
       then the channel's mean and std restored.

    m, g: below or above 1 with equal odds when their range holds 1, uniform on each side
    (``factor_around_one``). One draw per sample, shared by its channels: the windows and
    context slices are views of one scan (nnU-Net draws per channel, for separate modalities).
    Values are not clipped afterwards (docs/METHOD.md, fine-tuning). Every call draws a
    (B, INTENSITY_DRAWS) block of uniforms and one noise seed from ``generator`` whatever the
    probabilities, so a changed probability leaves the other transforms' draws as they were.

    cfg: IntensityAugmentConfig; windows: the HU windows (low, high) of the input
    (``PreprocessConfig.windows``); context_slices: k. Channels are slice-major (channel c is
    window c % len(windows) of a slice), as ``data.preprocess.stack_context`` stacks them.
    Call with images (B, C, H, W) float, C = len(windows) * k, and a CPU torch.Generator;
    returns (B, C, H, W) in the images' dtype and device. A sample no transform picked is
    returned bit for bit.
    """

    def __init__(self, cfg: IntensityAugmentConfig, windows: list[tuple[float, float]],
                 context_slices: int = 1):
        if not isinstance(cfg, IntensityAugmentConfig):
            raise ValueError(f"IntensityAugment needs an IntensityAugmentConfig, got "
                             f"{type(cfg).__name__}")
        self.width = window_widths(windows)  # (W_n,): the noise is one HU field per slice
        self.cfg = cfg
        self.context_slices = context_slices
        if context_slices < 1:
            raise ValueError(f"Illegal context_slices {context_slices}: need >= 1")
        low = torch.tensor([float(w[0]) for w in windows], dtype=torch.float64)
        self.centre = ((cfg.brightness_centre_hu - low) / self.width).repeat(context_slices)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        channels = len(self.width) * self.context_slices
        if images.ndim != 4 or not images.is_floating_point() or images.shape[1] != channels:
            raise ValueError(f"images must be a float (B, {channels}, H, W) tensor, got "
                             f"{tuple(images.shape)} {images.dtype}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        cfg = self.cfg
        b = images.shape[0]
        draws = iter(torch.rand(b, INTENSITY_DRAWS, generator=generator, dtype=torch.float64).unbind(1))
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        x = images.to(torch.float32)

        apply, std_hu = next(draws) < cfg.noise_prob, _uniform(next(draws), cfg.noise_std_hu)
        x = _where(apply, x, lambda: x + self._noise(x, std_hu, noise_seed))
        apply = next(draws) < cfg.blur_prob
        sigma = torch.stack([_uniform(next(draws), cfg.blur_sigma_px) for _ in range(2)], dim=1)
        x = _where(apply, x, lambda: gaussian_blur(x, sigma, apply, cfg.blur_sigma_px[1]))
        apply = next(draws) < cfg.brightness_prob
        m = _per_sample(factor_around_one(next(draws), next(draws), cfg.brightness_range), x)
        centre = self.centre.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = _where(apply, x, lambda: centre + m * (x - centre))
        apply = next(draws) < cfg.contrast_prob
        m = _per_sample(factor_around_one(next(draws), next(draws), cfg.contrast_range), x)
        x = _where(apply, x, lambda: _contrast(x, m))
        apply, scale = next(draws) < cfg.lowres_prob, _uniform(next(draws), cfg.lowres_scale)
        x = _where(apply, x, lambda: simulate_low_resolution(x, scale))
        apply = next(draws) < cfg.gamma_inverted_prob
        g = _per_sample(factor_around_one(next(draws), next(draws), cfg.gamma_range), x)
        x = _where(apply, x, lambda: _gamma(x, g, inverted=True))
        apply = next(draws) < cfg.gamma_prob
        g = _per_sample(factor_around_one(next(draws), next(draws), cfg.gamma_range), x)
        x = _where(apply, x, lambda: _gamma(x, g, inverted=False))
        return x.to(images.dtype)

    def _noise(self, x: Tensor, std_hu: Tensor, seed: int) -> Tensor:
        """(B, C, H, W) noise: one HU field per sample and slice, in each window's units."""
        b, _, h, w = x.shape
        windows = len(self.width)
        device_gen = torch.Generator(device=x.device).manual_seed(seed)
        field = torch.randn((b, self.context_slices, 1, h, w), generator=device_gen,
                            device=x.device, dtype=torch.float32)
        per_window = (std_hu[:, None] / self.width[None]).to(device=x.device, dtype=torch.float32)
        return (field * per_window.view(b, 1, windows, 1, 1)).reshape(x.shape)


def factor_around_one(side: Tensor, u: Tensor, bounds: tuple[float, float]) -> Tensor:
    """Factors (B,) in ``bounds`` = (low, high): if low < 1 < high, U(low, 1) or U(1, high) with
    equal odds (nnU-Net's draw of contrast, brightness and gamma factors); else U(low, high).

    side, u: (B,) uniforms in [0, 1) (the first picks the side, the second the value).
    """
    low, high = bounds
    below = side < (0.5 if low < 1 < high else float(high <= 1))
    return torch.where(below, low + (min(high, 1.0) - low) * u, max(low, 1.0) + (high - max(low, 1.0)) * u)


def simulate_low_resolution(x: Tensor, scale: Tensor) -> Tensor:
    """Per-sample nearest-exact downsampling of x (B, C, H, W) to round(H s) x round(W s)
    pixels, then bilinear upsampling back to H x W (``align_corners=False``): what
    ``F.interpolate`` gives sample by sample, as one gather per axis for the whole batch.

    scale: (B,) CPU tensor in (0, 1]. Returns (B, C, H, W).
    """
    for dim in (3, 2):
        size = x.shape[dim]
        first, second, weight = (t.to(x.device) for t in _low_resolution_taps(size, scale))
        view = [x.shape[0], 1, 1, 1]
        view[dim] = size
        gather = [t.view(view).expand_as(x) for t in (first, second)]
        weight = weight.to(x.dtype).view(view)
        x = x.gather(dim, gather[0]) * (1 - weight) + x.gather(dim, gather[1]) * weight
    return x


def _low_resolution_taps(size: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For an axis of ``size`` pixels downsampled to n = round(size s) and upsampled back: the
    two source pixels (B, size) long and the weight (B, size) of the second, per output pixel."""
    n = torch.round(size * scale.to(torch.float64)).clamp(min=1)[:, None]
    out = torch.arange(size, dtype=torch.float64)[None]
    low_res = ((out + 0.5) * n / size - 0.5).clamp(min=0)  # bilinear: position on the n-grid
    left = low_res.floor()
    right = torch.minimum(left + 1, n - 1)

    ratio = (size / n).to(torch.float32)

    def source(i: Tensor) -> Tensor:  # nearest-exact: the input pixel a low-res pixel copies
        # in float32, as F.interpolate computes it on CPU, so that ties fall the same way
        return ((i.to(torch.float32) + 0.5) * ratio).floor().clamp(max=size - 1).long()

    return source(left), source(right), low_res - left


def _contrast(x: Tensor, m: Tensor) -> Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return torch.minimum(torch.maximum(mean + m * (x - mean), low), high)


def _gamma(x: Tensor, g: Tensor, inverted: bool) -> Tensor:
    y = -x if inverted else x
    low, high = y.amin(dim=(2, 3), keepdim=True), y.amax(dim=(2, 3), keepdim=True)
    span = high - low
    mean, std = y.mean(dim=(2, 3), keepdim=True), y.std(dim=(2, 3), keepdim=True)
    y = low + span * ((y - low) / span.clamp(min=1e-7)).clamp(min=0) ** g
    y = mean + (y - y.mean(dim=(2, 3), keepdim=True)) * (std / y.std(dim=(2, 3), keepdim=True).clamp(min=1e-7))
    return -y if inverted else y


def _uniform(u: Tensor, bounds: tuple[float, float]) -> Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _per_sample(values: Tensor, x: Tensor) -> Tensor:
    """(B,) CPU values -> (B, 1, 1, 1) on x's device and dtype."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _where(apply: Tensor, x: Tensor, transform) -> Tensor:
    """transform() for the samples with ``apply`` (B,) CPU bool True, x for the others; the
    transform is not computed when no sample needs it."""
    if not bool(apply.any()):
        return x
    return torch.where(apply.to(x.device).view(-1, 1, 1, 1), transform(), x)


def jitter_intensity(view: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Pre-training's intensity jitter of a batch of views (B, C, *spatial), 2 or 3 spatial axes.

    Per sample, in this order: x <- x**g with g log-uniform in cfg.gamma; x <- (x - mean(x))
    c + mean(x), c ~ U(1 +- contrast); x <- x + U(+-brightness); Gaussian blur of std ~
    U(blur_sigma) voxels (the same along every axis) with probability blur_prob; x <- x + n s
    with n ~ N(0, 1) per voxel and s ~ U(0, noise_std) per sample. A zero amplitude skips the
    step. Draws a (B, 6) block of uniforms and a noise seed from ``generator`` (a CPU one).
    Returns the views' shape, dtype and device; on (B, C, H, W) exactly what
    ``PairedViewAugment`` gives.
    """
    b, spatial = view.shape[0], view.ndim - 2
    u = torch.rand(b, 6, generator=generator, dtype=torch.float64)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    device = view.device

    def per_sample(values: Tensor) -> Tensor:
        return values.to(device=device, dtype=torch.float32).view(b, *[1] * (view.ndim - 1))

    x = view.to(torch.float32)
    lo_g, hi_g = cfg.gamma
    if lo_g != 1.0 or hi_g != 1.0:
        g = torch.exp(math.log(lo_g) + (math.log(hi_g) - math.log(lo_g)) * u[:, 0])
        x = x.clamp(0, 1) ** per_sample(g)
    if cfg.contrast > 0:
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        x = (x - mean) * per_sample(1 + cfg.contrast * (2 * u[:, 1] - 1)) + mean
    if cfg.brightness > 0:
        x = x + per_sample(cfg.brightness * (2 * u[:, 2] - 1))
    if cfg.blur_prob > 0:
        sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, 3]
        x = gaussian_blur(x, sigma[:, None].expand(-1, spatial), u[:, 4] < cfg.blur_prob,
                          max(cfg.blur_sigma))
    if cfg.noise_std > 0:
        device_gen = torch.Generator(device=device).manual_seed(noise_seed)
        noise = torch.randn(x.shape, generator=device_gen, device=device, dtype=torch.float32)
        x = x + noise * per_sample(cfg.noise_std * u[:, 5])
    return x.to(view.dtype)


def gaussian_blur(x: Tensor, sigma: Tensor, apply: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur with a per-sample std per axis; samples with ``apply`` False
    unchanged.

    x: (B, C, H, W) or (B, C, D, H, W) float32; sigma: (B, k) CPU tensor, the std along each
    spatial axis in order (voxels); apply: (B,) CPU bool. One grouped conv per axis, last axis
    first, with kernels of radius ceil(3 * max_sigma) (at most the shortest side - 1), reflect
    padding.
    """
    b, c, *sizes = x.shape
    k = len(sizes)
    if k not in (2, 3) or sigma.shape != (b, k):
        raise ValueError(f"gaussian_blur needs x (B, C, H, W) or (B, C, D, H, W) and sigma (B, k), "
                         f"got {tuple(x.shape)} and {tuple(sigma.shape)}")
    radius = max(1, min(int(math.ceil(3 * max_sigma)), *(s - 1 for s in sizes)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    delta = (t == 0).to(torch.float64).expand(b, -1)
    conv = F.conv2d if k == 2 else F.conv3d

    def kernels(std: Tensor, axis: int) -> Tensor:  # (B,) -> (B*C, 1, ...K at axis...)
        kernel = torch.exp(-(t[None] ** 2) / (2 * std.clamp(min=1e-3)[:, None] ** 2))
        kernel = torch.where(apply[:, None], kernel / kernel.sum(dim=1, keepdim=True), delta)
        shape = [b * c, 1] + [1] * k
        shape[2 + axis] = 2 * radius + 1
        return kernel.repeat_interleave(c, dim=0).to(device=x.device, dtype=x.dtype).view(shape)

    flat = x.reshape(1, b * c, *sizes)
    for axis in reversed(range(k)):
        pad = [0] * (2 * k)
        pad[2 * (k - 1 - axis)] = pad[2 * (k - 1 - axis) + 1] = radius  # F.pad: last axis first
        flat = conv(F.pad(flat, pad, mode="reflect"), kernels(sigma[:, axis], axis), groups=b * c)
    return flat.reshape(x.shape)


class OrganContrastAugment:
    """A simulated contrast phase: each labelled organ of a sample shifted by its own HU offset.

    With probability ``cfg.prob`` a sample gets offsets o_c ~ U(-shift_hu, +shift_hu) HU, one
    per organ class c = 1..num_classes - 1 (class 0, the background, keeps o_0 = 0); the offset
    map o(label) is blurred with a Gaussian of std ``cfg.edge_sigma_px`` (the shift fades
    across an organ's boundary as partial volume does), and each channel becomes
    ``clamp(x + o / w, 0, 1)`` where the map is not zero (w: that channel's window width in HU;
    the clamp is the window's own clipping, so an organ shifted out of the window saturates as
    it would in a scan). The labels of the centre slice shift every context slice of a sample.
    A label outside [0, num_classes) (an ignore value) gets no shift.

    Every call draws a (B, num_classes) block of uniforms from ``generator`` whatever the
    probability. Call with images (B, C, H, W) float in window units, labels (B, H, W) integer
    and a CPU torch.Generator; returns (B, C, H, W) in the images' dtype and device, a sample
    not picked returned bit for bit.
    """

    def __init__(self, cfg: OrganContrastConfig, windows: list[tuple[float, float]],
                 num_classes: int, context_slices: int = 1):
        if not isinstance(cfg, OrganContrastConfig):
            raise ValueError(f"OrganContrastAugment needs an OrganContrastConfig, got "
                             f"{type(cfg).__name__}")
        if num_classes < 2:
            raise ValueError(f"Illegal num_classes {num_classes}: need >= 2 (background + organs)")
        self.cfg = cfg
        self.num_classes = num_classes
        self.width = window_widths(windows, context_slices).to(torch.float32)  # (C,)

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        channels = len(self.width)
        if images.ndim != 4 or not images.is_floating_point() or images.shape[1] != channels:
            raise ValueError(f"images must be a float (B, {channels}, H, W) tensor, got "
                             f"{tuple(images.shape)} {images.dtype}")
        if labels.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"labels must be (B, H, W) = {(images.shape[0], *images.shape[2:])}, "
                             f"got {tuple(labels.shape)}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        b = images.shape[0]
        u = torch.rand(b, self.num_classes, generator=generator, dtype=torch.float64)
        apply = u[:, 0] < self.cfg.prob
        if not bool(apply.any()) or self.cfg.shift_hu == 0:
            return images
        offsets = ((2 * u - 1) * self.cfg.shift_hu).to(torch.float32)
        offsets[:, 0] = 0.0  # u[:, 0] chose the sample; the background is not shifted
        offsets = offsets.to(labels.device)
        valid = (labels >= 0) & (labels < self.num_classes)
        index = torch.where(valid, labels, torch.zeros_like(labels)).long()
        shift = torch.gather(offsets, 1, index.flatten(1)).view(labels.shape)  # (B, H, W) HU
        shift = torch.where(valid, shift, torch.zeros_like(shift))[:, None].to(images.device)
        sigma = self.cfg.edge_sigma_px
        if sigma > 0:
            shift = gaussian_blur(shift, torch.full((b, 2), float(sigma), dtype=torch.float64),
                                  apply, sigma)
        x = images.to(torch.float32)
        width = self.width.to(x.device).view(1, -1, 1, 1)
        shifted = torch.where(shift != 0, (x + shift / width).clamp(0.0, 1.0), x)
        return _where(apply, x, lambda: shifted).to(images.dtype)


def window_widths(windows: list[tuple[float, float]], context_slices: int = 1) -> Tensor:
    """(C,) float64 window widths in HU of each input channel (slice-major: channel c is window
    c % len(windows) of a slice); ValueError for an empty or inverted window list or
    context_slices < 1."""
    if not windows or any(len(w) != 2 or not w[0] < w[1] for w in windows):
        raise ValueError(f"Illegal windows {windows}: a non-empty list of (low, high) HU, "
                         "low < high")
    if context_slices < 1:
        raise ValueError(f"Illegal context_slices {context_slices}: need >= 1")
    return torch.tensor([float(w[1] - w[0]) for w in windows],
                        dtype=torch.float64).repeat(context_slices)
