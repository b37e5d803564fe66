"""Typed configuration for every run kind, saved as YAML in each run folder.

Defaults follow ``docs/METHOD.md`` (our reconstruction of the LRC paper). Each dataclass
validates itself in ``__post_init__`` and raises ``ConfigError`` naming the bad field.
``to_dict``/``from_dict`` round-trip nested dataclasses through plain YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lrcseg.errors import ConfigError
from lrcseg.io_utils import atomic_write_text
from lrcseg.methods.byol_options import BYOLConfig
from lrcseg.methods.moco_options import MocoConfig
from lrcseg.methods.registry import method_names, options_class
from lrcseg.methods.simclr_options import SimCLRConfig


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Field metadata of a file or folder path: ``absolute_paths`` resolves it against the working
# directory, so a run folder's config.yaml means the same from any directory (``--resume``).
PATH = {"path": True}
# the linear probe's feature levels and named sets, for validation without torch (the probe's
# own tables in ``lrcseg.evaluate.probe``; tests/test_experiment_record.py checks they agree)
PROBE_LEVELS = ("enc4", "enc8", "enc16", "enc32", "dec4", "dec2", "dec1")
PROBE_LEVEL_SETS = ("all", "encoder", "decoder")
NOT_PATHS = ("", "scratch")  # values of path fields that name no file
# Field metadata of a dict of sections: ``to_dict`` writes each entry as a key of the enclosing
# mapping, ``from_dict`` gives the field every key that names no other field.
SECTIONS = {"sections": True}


@dataclass
class PreprocessConfig:
    """How a CT volume becomes network input slices.

    window_hu: the HU window mapped to [0, 1] (clipped); the same window is used for
        pre-training and fine-tuning and recorded in every checkpoint and export.
    extra_windows_hu: further windows stacked as extra channels (empty = one channel).
    spacing_mm: target in-plane spacing; slices are resampled to it (z is untouched).
    context_slices: k adjacent slices as channels (2.5D); odd, 1 = plain 2D.
    slice_spacing_mm: None (the default) keeps the scan's slices; a value resamples along z to
        it (linear for the image, nearest for labels; 3D pre-training with an nnU-Net 3d_fullres
        plans sets it to the plans' z spacing).
    body_threshold_hu: pixels below this (air) are outside the body; the body mask is the
        largest connected component above it, holes filled (couch and air excluded).
    """

    window_hu: tuple[float, float] = (-175.0, 250.0)
    extra_windows_hu: list[tuple[float, float]] = field(default_factory=list)
    spacing_mm: float = 1.5
    context_slices: int = 1
    body_threshold_hu: float = -500.0
    slice_spacing_mm: float | None = None

    def __post_init__(self) -> None:
        self.window_hu = tuple(float(v) for v in self.window_hu)
        self.extra_windows_hu = [tuple(float(v) for v in w) for w in self.extra_windows_hu]
        for w in [self.window_hu, *self.extra_windows_hu]:
            _check(len(w) == 2 and w[0] < w[1], f"Illegal HU window {w}: need (low, high), low < high")
        _check(self.spacing_mm > 0, f"Illegal spacing_mm {self.spacing_mm}: must be > 0")
        _check(self.slice_spacing_mm is None or self.slice_spacing_mm > 0,
               f"Illegal slice_spacing_mm {self.slice_spacing_mm}: > 0 mm, or null (the scan's own)")
        _check(
            self.context_slices >= 1 and self.context_slices % 2 == 1,
            f"Illegal context_slices {self.context_slices}: must be odd and >= 1",
        )

    @property
    def windows(self) -> list[tuple[float, float]]:
        return [self.window_hu, *self.extra_windows_hu]

    @property
    def in_channels(self) -> int:
        """Network input channels: windows x context slices."""
        return len(self.windows) * self.context_slices

    def key(self) -> str:
        """Stable short hash of the settings: names the slice cache."""
        d = to_dict(self)
        if d["slice_spacing_mm"] is None:
            d.pop("slice_spacing_mm")  # the scan's slices: the caches of earlier lrcseg stay valid
        return stable_hash(d)


@dataclass
class SuperpixelConfig:
    """Local regions for LRC, computed once on the un-augmented preprocessed slice.

    method: "felzenszwalb" (the paper) or "grid" (ablation: regular cells, same count regime).
    scale, sigma: skimage-style Felzenszwalb parameters on the [0, 1] window (skimage divides
        scale by 255 for float images; our implementation follows the same convention).
    min_size_mm2: minimum region area in mm^2, converted to pixels at the slice spacing.
    implementation: "fast" (our numba version) or "skimage" (reference).
    grid_cell_mm: cell side for method="grid".
    windows_hu: HU windows (low, high) stacked as channels of the Felzenszwalb input (an edge
        weighs the Euclidean distance of the windowed values); empty = the preprocessing window
        alone (``preprocess.window_hu``, soft tissue by default). For chest CT, soft tissue
        plus a lung window ([[-175, 250], [-1350, 150]]) splits the lungs, which the soft-tissue
        window shows as one flat region (docs/METHOD.md).
    """

    method: str = "felzenszwalb"
    scale: float = 100.0
    sigma: float = 0.8
    min_size_mm2: float = 110.0
    implementation: str = "fast"
    grid_cell_mm: float = 30.0
    windows_hu: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.windows_hu = [tuple(float(v) for v in w) for w in self.windows_hu]
        for w in self.windows_hu:
            _check(len(w) == 2 and w[0] < w[1], f"Illegal superpixel HU window {w}: need (low, high), low < high")
        _check(self.method in ("felzenszwalb", "grid"), f"Illegal superpixel method {self.method!r}")
        _check(self.implementation in ("fast", "skimage"), f"Illegal implementation {self.implementation!r}")
        _check(self.scale > 0, f"Illegal scale {self.scale}: must be > 0")
        _check(self.sigma >= 0, f"Illegal sigma {self.sigma}: must be >= 0")
        _check(self.min_size_mm2 >= 0, f"Illegal min_size_mm2 {self.min_size_mm2}: must be >= 0")
        _check(self.grid_cell_mm > 0, f"Illegal grid_cell_mm {self.grid_cell_mm}: must be > 0")

    def key(self) -> str:
        d = to_dict(self)
        d.pop("implementation")  # both implementations give the same regions
        if not d["windows_hu"]:
            d.pop("windows_hu")  # the single-window default keeps the caches of earlier lrcseg
        return stable_hash(d)


@dataclass
class AugmentConfig:
    """Two-view augmentation for pre-training (geometric part shared with the region map).

    image_size: output side of each view (pixels).
    zoom: view scale relative to the slice's native (preprocessed) spacing, log-uniform in
        this range: a crop of about image_size / zoom pixels is resized to image_size, the
        same 0.8-1.25 zoom fine-tuning uses, so pre-training sees organs at the size
        fine-tuning does. None = the older canvas-relative crop (``crop_scale``).
    crop_scale: with zoom None, random resized crop area as a fraction of the slice canvas.
    crop_ratio: aspect ratio range of the crop.
    min_overlap: both crops overlap by at least this share of the smaller crop.
    hflip: allow left-right flips (off by default: CT labels have laterality, and a flipped
        view puts the liver on the patient's left, a layout fine-tuning never sees).
    rotation_deg: maximum absolute rotation.
    brightness, contrast: additive / multiplicative jitter amplitudes on [0, 1] images. The
        defaults stay below +-10 HU on the -175..250 window (brightness 0.02 = 8.5 HU): larger
        jitter is of the size of the organ contrasts themselves (liver 110, spleen 115 HU).
    gamma: gamma range ((1, 1) = off: gamma bends HU non-linearly, organ contrasts with it).
    noise_std: Gaussian noise std (the largest per-sample std; 0.02 = 8.5 HU);
    blur_prob / blur_sigma: Gaussian blur.
    patch_size: 3D only (``model.spatial_dims: 3``): each view's (d, h, w) in voxels of the
        preprocessed grid (z, then in-plane), cut from a box of ``box_scale`` times that size
        (``lrcseg.augment3d.PairedVolumeAugment``); image_size is the 2D views' and unused.
        An nnU-Net plans configuration sets it to its patch size. None in 2D.
    tilt_deg: 3D only: the largest tilt of a view out of the axial plane, about each
        in-plane axis (ours, small: the anatomy stays axial).
    box_scale: 3D only: the box the two views are cut from, as a multiple of patch_size per
        axis (>= zoom's upper end, so a view zoomed out still fits; boxes tile each volume at
        half a box, ``lrcseg.data.boxes``).
    """

    image_size: int = 224
    zoom: tuple[float, float] | None = (0.8, 1.25)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    min_overlap: float = 0.3
    hflip: bool = False
    rotation_deg: float = 10.0
    brightness: float = 0.02
    contrast: float = 0.05
    gamma: tuple[float, float] = (1.0, 1.0)
    noise_std: float = 0.02
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    patch_size: tuple[int, int, int] | None = None
    tilt_deg: float = 5.0
    box_scale: float = 1.5

    def __post_init__(self) -> None:
        self.zoom = None if self.zoom is None else tuple(float(z) for z in self.zoom)
        if self.patch_size is not None:
            _check(isinstance(self.patch_size, (list, tuple)) and len(self.patch_size) == 3
                   and all(isinstance(v, int) and not isinstance(v, bool) and v >= 8
                           for v in self.patch_size),
                   f"Illegal augment.patch_size {self.patch_size!r}: three integers >= 8 "
                   "(d, h, w voxels), or null in 2D")
            self.patch_size = tuple(self.patch_size)
        _check(0 <= self.tilt_deg <= 45, f"Illegal augment.tilt_deg {self.tilt_deg}: 0..45 degrees")
        _check(1 <= self.box_scale <= 4, f"Illegal augment.box_scale {self.box_scale}: 1..4")
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)
        self.gamma = tuple(self.gamma)
        self.blur_sigma = tuple(self.blur_sigma)
        _check(self.image_size >= 32 and self.image_size % 32 == 0,
               f"Illegal image_size {self.image_size}: must be a multiple of 32, >= 32")
        _check(self.zoom is None or (len(self.zoom) == 2 and 0 < self.zoom[0] <= self.zoom[1]),
               f"Illegal zoom {self.zoom}: (low, high) with 0 < low <= high, or null")
        _check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, f"Illegal crop_scale {self.crop_scale}")
        _check(0 < self.crop_ratio[0] <= self.crop_ratio[1], f"Illegal crop_ratio {self.crop_ratio}")
        _check(0 <= self.min_overlap < 1, f"Illegal min_overlap {self.min_overlap}: need 0 <= x < 1")
        _check(self.rotation_deg >= 0, f"Illegal rotation_deg {self.rotation_deg}")
        _check(len(self.gamma) == 2 and 0 < self.gamma[0] <= self.gamma[1], f"Illegal gamma {self.gamma}")


@dataclass
class IntensityAugmentConfig:
    """Fine-tuning's intensity augmentation: nnU-Net's default CT transforms, on the image only
    (``lrcseg.augment.IntensityAugment``; docs/METHOD.md, fine-tuning, compares each with
    nnU-Net's default and with pre-training's jitter).

    enabled: False = geometric augmentation only, as fine-tuning was before this option (a run
        folder whose config has no ``intensity`` section resumes with it off).
    *_prob: the probability that a sample gets that transform (each drawn independently).
    noise_std_hu: Gaussian noise std in HU, uniform in this range per sample; divided by each
        channel's window width.
    blur_sigma_px: Gaussian blur std in pixels of the preprocessed grid, uniform in this range,
        drawn per axis.
    brightness_range, brightness_centre_hu: multiplicative brightness, x -> c + m (x - c) with
        c = brightness_centre_hu in window units: HU are scaled about this centre (nnU-Net
        multiplies z-scored CT, which scales HU about the dataset's foreground mean).
    contrast_range: x -> mean + m (x - mean) about the sample's mean, clamped to its [min, max].
    lowres_scale: simulated low resolution: nearest downsampling by a factor s uniform in this
        range (both axes), bilinear upsampling back.
    gamma_range, gamma_prob, gamma_inverted_prob: gamma on the sample's [min, max], its mean and
        std kept; the inverted variant applies it to the negated image.
    Factors m and gamma lie below or above 1 with equal odds when the range holds 1, uniform
    on each side (nnU-Net's draw); otherwise uniform in the range.
    """

    enabled: bool = True
    noise_prob: float = 0.1
    noise_std_hu: tuple[float, float] = (0.0, 10.0)
    blur_prob: float = 0.1
    blur_sigma_px: tuple[float, float] = (0.5, 1.0)
    brightness_prob: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    brightness_centre_hu: float = 100.0
    contrast_prob: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    lowres_prob: float = 0.125
    lowres_scale: tuple[float, float] = (0.5, 1.0)
    gamma_prob: float = 0.3
    gamma_inverted_prob: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self) -> None:
        for name in ("noise_prob", "blur_prob", "brightness_prob", "contrast_prob", "lowres_prob",
                     "gamma_prob", "gamma_inverted_prob"):
            p = getattr(self, name)
            _check(isinstance(p, (int, float)) and 0 <= p <= 1,
                   f"Illegal intensity.{name} {p!r}: a probability in [0, 1]")
        self.noise_std_hu = self._range("noise_std_hu", lambda lo, hi: lo >= 0, "std >= 0 HU")
        self.blur_sigma_px = self._range("blur_sigma_px", lambda lo, hi: lo >= 0, "std >= 0 px")
        for name in ("brightness_range", "contrast_range", "gamma_range"):
            setattr(self, name, self._range(name, lambda lo, hi: lo > 0, "factors > 0"))
        self.lowres_scale = self._range("lowres_scale", lambda lo, hi: 0 < lo and hi <= 1,
                                        "scales in (0, 1]")
        _check(-1024 <= self.brightness_centre_hu <= 3071,
               f"Illegal intensity.brightness_centre_hu {self.brightness_centre_hu}: a CT value "
               "in HU (-1024..3071)")

    def _range(self, name: str, valid, rule: str) -> tuple[float, float]:
        bounds = getattr(self, name)
        _check(isinstance(bounds, (list, tuple)) and len(bounds) == 2
               and all(isinstance(v, (int, float)) for v in bounds) and bounds[0] <= bounds[1],
               f"Illegal intensity.{name} {bounds!r}: need (low, high) with low <= high")
        bounds = (float(bounds[0]), float(bounds[1]))
        _check(valid(*bounds), f"Illegal intensity.{name} {bounds}: {rule}")
        return bounds


@dataclass
class OrganContrastConfig:
    """Fine-tuning's simulated contrast phase: each labelled organ's HU shifted by its own
    random offset (``lrcseg.augment.OrganContrastAugment``; docs/METHOD.md, fine-tuning).

    Contrast enhancement changes organs by different amounts (liver +50, kidneys +120, aorta
    +110 to +160 HU between the unenhanced and the portal-venous phase, ../shared/PHANTOMS.md),
    which a global brightness, contrast or gamma change cannot imitate: it reverses the order
    of organs' HU. Per-label intensity randomisation is SynthSeg's idea (Billot et al. 2023),
    here as a bounded shift on top of the real image's texture.

    enabled: False (the default: on the held-out checks it helped across contrast phase and
        cost within one phase, bench/NOTES.md) = no organ shift; a run folder whose config has
        no ``organ_contrast`` section resumes with it off.
    prob: the probability that a sample gets the shift.
    shift_hu: each organ (label > 0) of a chosen sample gets its own offset, uniform in
        [-shift_hu, +shift_hu] HU; the background (label 0) keeps its values.
    edge_sigma_px: the offset map is blurred with a Gaussian of this std (pixels of the
        preprocessed grid), so the shift fades over an organ's boundary as partial volume does
        instead of drawing the label's edge into the image (0 = hard edges).
    """

    enabled: bool = False
    prob: float = 0.5
    shift_hu: float = 100.0
    edge_sigma_px: float = 1.0

    def __post_init__(self) -> None:
        _check(isinstance(self.prob, (int, float)) and 0 <= self.prob <= 1,
               f"Illegal organ_contrast.prob {self.prob!r}: a probability in [0, 1]")
        _check(isinstance(self.shift_hu, (int, float)) and 0 <= self.shift_hu <= 1000,
               f"Illegal organ_contrast.shift_hu {self.shift_hu!r}: HU in [0, 1000]")
        _check(isinstance(self.edge_sigma_px, (int, float)) and 0 <= self.edge_sigma_px <= 8,
               f"Illegal organ_contrast.edge_sigma_px {self.edge_sigma_px!r}: pixels in [0, 8]")


@dataclass
class NnUNetNetworkConfig:
    """An nnU-Net plans file's 2D or 3D network, recorded whole so a checkpoint rebuilds it alone.

    Filled by ``lrcseg.nnunet.plans.network_from_plans`` from ``nnUNetPlans.json`` (and the
    ``dataset.json`` beside it); a user never writes these fields by hand.
    plans / configuration: the plans file it came from and its configuration ("2d" or
        "3d_fullres").
    network_class_name, arch_kwargs, kw_requires_import: the plans' "architecture" entry,
        passed to nnU-Net's ``get_network_from_plans`` as nnU-Net itself does.
    num_classes: segmentation outputs (the dataset's labels; nnU-Net's loader skips them).
    clip_hu, mean, std: nnU-Net's CTNormalization from the dataset fingerprint (foreground
        0.5 / 99.5 percentiles, mean, std): the network sees (clip(HU) - mean) / std.
    spacing_mm, patch_size: the configuration's spacing and patch in nnU-Net's axis order,
        (H, W) for a 2D network, (D, H, W) for a 3D one; ``spatial_dims`` = their length.
    """

    plans: str
    configuration: str
    plans_name: str
    dataset_name: str
    network_class_name: str
    arch_kwargs: dict[str, Any]
    kw_requires_import: list[str]
    num_classes: int
    clip_hu: tuple[float, float]
    mean: float
    std: float
    spacing_mm: tuple[float, ...]
    patch_size: tuple[int, ...]

    def __post_init__(self) -> None:
        self.clip_hu = tuple(float(v) for v in self.clip_hu)
        self.spacing_mm = tuple(float(v) for v in self.spacing_mm)
        self.patch_size = tuple(int(v) for v in self.patch_size)
        _check(len(self.clip_hu) == 2 and self.clip_hu[0] < self.clip_hu[1],
               f"Illegal nnU-Net clip_hu {self.clip_hu}: need (low, high), low < high")
        _check(self.std > 0, f"Illegal nnU-Net std {self.std}: must be > 0")
        _check(self.num_classes >= 1, f"Illegal nnU-Net num_classes {self.num_classes}")
        _check(len(self.patch_size) in (2, 3), f"nnU-Net configuration {self.configuration!r} has "
               f"patch size {list(self.patch_size)}: need a 2D or 3D patch")
        _check(len(self.spacing_mm) == len(self.patch_size), f"nnU-Net configuration "
               f"{self.configuration!r}: spacing {list(self.spacing_mm)} and patch size "
               f"{list(self.patch_size)} differ in length")

    @property
    def spatial_dims(self) -> int:
        """2 for a 2D network (the 2d configuration), 3 for a 3D one (3d_fullres)."""
        return len(self.patch_size)


@dataclass
class ModelConfig:
    """U-Net (MONAI FlexibleUNet) with a ResNet encoder, plus pre-training heads.

    spatial_dims: 2 (slices, (B, C, H, W)) or 3 (volume patches, (B, C, D, H, W)): the one
        place the number of dimensions is decided; the U-Net, the projection heads and the
        global methods' heads are built for it (the LRC loss follows the features it is
        given). A config without the key (run folders written before it existed) is 2D.
    local_levels: decoder blocks whose outputs feed a local head each (LRC is computed at each
        and averaged); decoder block i has stride 16 / 2**i, so 2 = 1/4, 3 = 1/2 and
        4 = full resolution (64, 32 and 16 channels with the default decoder). The decoder runs
        up to the finest level listed; (2, 3, 4) trains the whole decoder.
    proj_dim: output width of both projection heads.
    nnunet: instead of the FlexibleUNet (backbone and decoder_channels then unused), the
        network of an nnU-Net plans file (``lrcseg pretrain --nnunet-plans``); local level l
        is then the decoder stage 4 - l stages above full resolution (stride 2**(4-l) with
        nnU-Net's usual 2 x 2 poolings). Its patch has ``spatial_dims`` axes.
    """

    backbone: str = "resnet50"
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    local_levels: tuple[int, ...] = (3,)
    proj_dim: int = 128
    nnunet: NnUNetNetworkConfig | None = None
    spatial_dims: int = 2

    def __post_init__(self) -> None:
        _check(self.spatial_dims in (2, 3) and not isinstance(self.spatial_dims, bool),
               f"Illegal model.spatial_dims {self.spatial_dims!r}: 2 (slices) or 3 (volumes)")
        self.spatial_dims = int(self.spatial_dims)
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
        self.local_levels = tuple(int(v) for v in self.local_levels)
        _check(self.backbone in ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101"),
               f"Illegal backbone {self.backbone!r}: one of resnet10/18/34/50/101")
        _check(len(self.decoder_channels) == 5, "decoder_channels needs 5 entries (1/16 ... 1/1)")
        _check(len(self.local_levels) >= 1 and len(set(self.local_levels)) == len(self.local_levels)
               and all(0 <= v < 5 for v in self.local_levels),
               f"Illegal local_levels {self.local_levels}: distinct decoder levels in 0..4")
        _check(self.proj_dim > 0, f"Illegal proj_dim {self.proj_dim}")
        if self.nnunet is not None:
            _check(len(self.nnunet.patch_size) == self.spatial_dims,
                   f"model.spatial_dims {self.spatial_dims} does not fit the nnU-Net "
                   f"configuration {self.nnunet.configuration!r} (patch size "
                   f"{list(self.nnunet.patch_size)}): set spatial_dims to its number of axes")

    @property
    def local_strides(self) -> tuple[int, ...]:
        return tuple(16 // 2**v for v in self.local_levels)


@dataclass
class LRCConfig:
    """The localized region contrastive sampling loss (docs/METHOD.md section 6): the one set
    of defaults and checks of ``lrcseg.losses.lrc.LRCLoss``, which is built from it.

    enabled: False = no LRC term (the global method alone).
    variant: "pixel" (the sampled pixels are the anchors) or "region" (segment means).
    num_regions: N, regions sampled per image (without replacement, see ``sampling``).
    pixels_per_region: P, pixels sampled per region and view (pixel variant).
    min_pixels: p_min, pixels a region needs in both views at feature resolution to be valid.
    sampling: how the N regions per image are drawn among the valid ones: "area"
        (proportional to area, the large background tissue dominates), "uniform", or
        "intensity" (label-free balance: uniform over bins of the regions' mean window
        intensity, then uniform within a bin, so fat, muscle and organ-bright regions are
        drawn equally often).
    intensity_bins: bins over [0, 1] for sampling "intensity".
    temperature: t (tau_local).
    negatives: "image" (the other regions of the same image) or "batch" (of all images).
    weight: lambda in L = L_global + lambda L_LRC (the training loop's, not the loss's).
    """

    enabled: bool = True
    variant: str = "pixel"
    num_regions: int = 48
    pixels_per_region: int = 8
    min_pixels: int = 4
    sampling: str = "uniform"
    intensity_bins: int = 8
    temperature: float = 0.1
    negatives: str = "image"
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check(self.variant in ("pixel", "region"),
               f"Illegal LRC variant {self.variant!r}: 'pixel' or 'region'")
        _check(self.negatives in ("image", "batch"),
               f"Illegal LRC negatives {self.negatives!r}: 'image' or 'batch'")
        _check(self.sampling in ("area", "uniform", "intensity"),
               f"Illegal LRC sampling {self.sampling!r}: area, uniform or intensity")
        _check(self.intensity_bins >= 2, f"Illegal intensity_bins {self.intensity_bins}: need >= 2")
        _check(self.num_regions >= 2,
               f"Illegal num_regions {self.num_regions}: need >= 2 to have negatives")
        _check(self.pixels_per_region >= 1,
               f"Illegal pixels_per_region {self.pixels_per_region}: need >= 1")
        _check(self.min_pixels >= 1, f"Illegal min_pixels {self.min_pixels}: need >= 1")
        _check(abs(self.temperature) >= 1e-8, f"Illegal temperature: abs({self.temperature}) < 1e-8")
        _check(self.weight >= 0, f"Illegal LRC weight {self.weight}")


@dataclass
class DistributedConfig:
    """Multi-process options, used when started by torchrun with WORLD_SIZE > 1.

    sync_bn: convert the online network's BatchNorm to SyncBatchNorm (CUDA only).
    gather_negatives: contrast against the whole global batch: MoCo enqueues every rank's
        keys, SimCLR's NT-Xent and LRC with ``negatives="batch"`` run on gathered embeddings.
    """

    sync_bn: bool = False
    gather_negatives: bool = False


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay; gradient clipping by global norm."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 3.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"Illegal lr {self.lr}")
        _check(self.weight_decay >= 0, f"Illegal weight_decay {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"Illegal warmup_steps {self.warmup_steps}")
        _check(self.grad_clip >= 0, f"Illegal grad_clip {self.grad_clip} (0 = off)")


@dataclass
class RunConfig:
    """Settings every training run shares (where, how long, on what).

    steps: optimiser steps; None only for fine-tuning, where it means the automatic budget.
    image_every: TensorBoard image summaries at step 0 and every N steps (pre-training: view
        pairs with their region maps; fine-tuning: a prediction overlay); 0 = none.
    """

    out: str = field(default="runs/run", metadata=PATH)
    steps: int | None = 1000
    batch_size: int = 32
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    checkpoint_every: int = 200
    log_every: int = 10
    image_every: int = 200
    cache_dir: str | None = field(default=None, metadata=PATH)

    def __post_init__(self) -> None:
        _check(self.steps is None or self.steps >= 1, f"Illegal steps {self.steps}")
        _check(self.batch_size >= 1, f"Illegal batch_size {self.batch_size}")
        _check(self.workers >= 0, f"Illegal workers {self.workers}")
        _check(self.checkpoint_every >= 1, f"Illegal checkpoint_every {self.checkpoint_every}")
        _check(self.log_every >= 1, f"Illegal log_every {self.log_every}")
        _check(self.image_every >= 0, f"Illegal image_every {self.image_every}: need >= 0 (0 = off)")


@dataclass
class OnlineProbeConfig:
    """A frozen-feature linear probe run during pre-training (``lrcseg.evaluate.probe.OnlineProbe``).

    dataset: a labelled dataset (None = off); every: probe every N steps (and at the end);
    labeled, split_seed: the K cases the probe is fitted on (as fine-tuning draws them);
    max_cases: it is scored on up to this many other "train" cases (never the test split);
    pixels: its class-balanced pixel budget. Logged as "probe/..." in metrics.jsonl and
    TensorBoard.
    """

    dataset: str | None = field(default=None, metadata=PATH)
    every: int = 100
    labeled: int = 1
    split_seed: int = 0
    max_cases: int = 3
    pixels: int = 20000

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"Illegal probe.every {self.every}: need >= 1")
        _check(self.labeled >= 1, f"Illegal probe.labeled {self.labeled}: need >= 1")
        _check(self.max_cases >= 1, f"Illegal probe.max_cases {self.max_cases}: need >= 1")
        _check(self.pixels >= 100, f"Illegal probe.pixels {self.pixels}: need >= 100")


@dataclass
class PretrainConfig:
    """A pre-training run: global method (+ LRC) on unlabelled slices.

    A global method's options are a section named after it, an instance of the dataclass the
    method declares (``lrcseg.methods.registry.options_class``): ``moco``, ``simclr`` and
    ``byol`` are fields; any other method's section is an entry of ``method_sections``, read
    and written as a top-level section all the same (``toy: {weight: 2.0}``), holding the
    configured method's defaults unless given. A section of a method that is not installed is
    a ConfigError. ``options()`` gives a method its section.
    """

    data: list[str] = field(default_factory=list, metadata=PATH)
    method: str = "moco"
    labels: str | None = field(default=None, metadata=PATH)
    run: RunConfig = field(default_factory=RunConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lrc: LRCConfig = field(default_factory=LRCConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    method_sections: dict[str, Any] = field(default_factory=dict, metadata=SECTIONS)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)

    def __post_init__(self) -> None:
        _check(self.method in method_names(),
               f"Illegal method {self.method!r}: one of {', '.join(method_names())}")
        _check(self.method != "none" or self.lrc.enabled,
               "method 'none' without LRC has no loss: enable LRC or pick a global method")
        _check(self.run.steps is not None, "pre-training needs run.steps (no automatic budget)")
        self.method_sections = _method_sections(self.method_sections, self.method)
        _check(self.probe.dataset is None or self.model.nnunet is None,
               "probe.dataset: the online probe cannot reach an nnU-Net plans network during "
               "pre-training yet (it probes FlexibleUNets, 2D or 3D); drop it and probe the "
               "finished run with lrcseg probe")
        if self.model.spatial_dims == 3:
            _check(self.augment.patch_size is not None,
                   "model.spatial_dims 3 needs augment.patch_size (d, h, w voxels of a view), "
                   "or --nnunet-plans with a 3d configuration, which sets it")
            _check(self.model.nnunet is not None
                   or all(side % 32 == 0 for side in self.augment.patch_size),
                   f"augment.patch_size {list(self.augment.patch_size)}: the ResNet U-Net halves "
                   "every axis five times, so each side must be a multiple of 32 (an nnU-Net "
                   "plans network pools each axis as its plans say)")
            _check(self.preprocess.context_slices == 1,
                   f"model.spatial_dims 3 takes whole volumes: preprocess.context_slices must be "
                   f"1, got {self.preprocess.context_slices}")
            _check(self.superpixels.method == "felzenszwalb",
                   f"model.spatial_dims 3: superpixels.method {self.superpixels.method!r} has no "
                   "3D version; use felzenszwalb (supervoxels)")
            _check(self.augment.zoom is not None
                   and 1 / self.augment.zoom[0] <= self.augment.box_scale + 1e-9,
                   f"augment.zoom {self.augment.zoom} in 3D: a view covers patch_size / zoom "
                   f"voxels, so 1 / zoom's lower end must be <= augment.box_scale "
                   f"{self.augment.box_scale}")

    def options(self, method: str | None = None) -> Any:
        """The options of ``method`` (default: the configured one), an instance of the
        dataclass it declares; None for a method that takes none."""
        name = self.method if method is None else method
        options = options_class(name)
        if options is None:
            return None
        section = self.method_sections.get(name, getattr(self, name, None))
        return section if isinstance(section, options) else options()


def _method_sections(sections: dict[str, Any], method: str) -> dict[str, Any]:
    """``PretrainConfig.method_sections`` checked: each entry the options dataclass of the
    installed method it is named after (a mapping is converted), plus the configured method's
    defaults when it is not a field and has options; ConfigError naming the bad section."""
    fields = sorted(f.name for f in dataclasses.fields(PretrainConfig)
                    if not f.metadata.get("sections"))
    wanted = dict(sections)
    if method not in fields and options_class(method) is not None:
        wanted.setdefault(method, {})
    checked = {}
    for name, values in wanted.items():
        _check(name not in fields and name in method_names(),
               f"PretrainConfig: unknown key {name!r}: not a config key ({', '.join(fields)}), "
               f"and no installed method is called {name!r} to take it as its options "
               f"(methods: {', '.join(method_names())})")
        options = options_class(name)
        _check(options is not None, f"method {name!r} takes no options: drop the {name!r} section")
        if not isinstance(values, options):
            _check(isinstance(values, dict), f"{name}: a mapping of options, got {values!r}")
            try:
                values = from_dict(options, values)
            except (TypeError, ValueError) as exc:  # a method's own check; ConfigError passes
                raise ConfigError(f"{name}: {exc}") from exc
        checked[name] = values
    return checked


@dataclass
class FinetuneStrategyConfig:
    """How fine-tuning treats the pre-trained layers (docs/METHOD.md, fine-tuning strategy).

    encoder_lr_scale, decoder_lr_scale: multipliers of the learning rate for the pre-trained
        encoder and decoder (> 0; 1 = the rate of the new segmentation head).
    head_first_steps: the first N steps of the budget train only the segmentation head, the
        encoder and decoder frozen with their BatchNorm in eval mode (the linear-probe phase of
        LP-FT, Kumar et al. 2022); each phase has its own warm-up and cosine decay.
    freeze_encoder: the encoder stays frozen (BatchNorm in eval mode) for the whole run.
    The defaults train every layer at one rate from step 0: the fine-tuning of earlier versions.
    """

    encoder_lr_scale: float = 1.0
    decoder_lr_scale: float = 1.0
    head_first_steps: int = 0
    freeze_encoder: bool = False

    def __post_init__(self) -> None:
        for name in ("encoder_lr_scale", "decoder_lr_scale"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and 0 < value < float("inf"),
                   f"Illegal strategy.{name} {value!r}: need a finite number > 0 (to keep the "
                   "encoder fixed, set strategy.freeze_encoder: true)")
        _check(isinstance(self.head_first_steps, int) and self.head_first_steps >= 0,
               f"Illegal strategy.head_first_steps {self.head_first_steps!r}: need an integer >= 0")
        _check(not self.freeze_encoder or self.encoder_lr_scale == 1.0,
               f"Illegal strategy: encoder_lr_scale {self.encoder_lr_scale} with freeze_encoder: "
               "a frozen encoder has no learning rate; leave encoder_lr_scale at 1")

    def changes(self) -> dict[str, Any]:
        """The options set away from their defaults; empty for the plain fine-tuning of earlier
        versions (every layer at one rate from step 0)."""
        default = FinetuneStrategyConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


@dataclass
class FinetuneConfig:
    """A few-label fine-tuning run (docs/METHOD.md, fine-tuning protocol).

    init: "scratch", a pre-training run folder, or an exported/checkpoint file.
    labeled: number of labelled training cases (int >= 1) or a fraction in (0, 1).
    run.steps: the budget; None = auto, scaled with the labelled slices (same for every init).
    snapshots: steps at which the weights are also saved (``snapshot_<step>.pt``, loadable
        like ``final.pt``) for a learning curve; each must be < the budget.
    image_size, rotation_deg, hflip: the geometric augmentation (crop side, rotation, flips).
    intensity: the intensity augmentation (``IntensityAugmentConfig``; on by default,
        ``intensity: {enabled: false}`` = geometric only).
    organ_contrast: the simulated contrast phase, a per-organ HU shift
        (``OrganContrastConfig``), applied before the intensity augmentation.
    strategy: learning rates and freezing of the pre-trained layers
        (``FinetuneStrategyConfig``); refused from scratch, which has no pre-trained layers.
    """

    dataset: str = field(default="", metadata=PATH)
    init: str = field(default="scratch", metadata=PATH)
    labeled: float = 1
    split_seed: int = 0
    snapshots: list[int] = field(default_factory=list)
    label_map: str | None = field(default=None, metadata=PATH)
    allow_mismatch: bool = False
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=None, batch_size=8))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    image_size: int = 224
    rotation_deg: float = 10.0
    hflip: bool = False
    intensity: IntensityAugmentConfig = field(default_factory=IntensityAugmentConfig)
    organ_contrast: OrganContrastConfig = field(default_factory=OrganContrastConfig)
    strategy: FinetuneStrategyConfig = field(default_factory=FinetuneStrategyConfig)

    def __post_init__(self) -> None:
        _check(self.labeled > 0, f"Illegal labeled {self.labeled}: need > 0")
        _check(self.labeled < 1 or float(self.labeled).is_integer(),
               f"Illegal labeled {self.labeled}: an integer count or a fraction in (0, 1)")
        _check(self.image_size % 32 == 0, f"Illegal image_size {self.image_size}: multiple of 32")
        self.snapshots = sorted(int(s) for s in self.snapshots)
        _check(all(s >= 1 for s in self.snapshots) and len(set(self.snapshots)) == len(self.snapshots),
               f"Illegal snapshots {self.snapshots}: distinct steps >= 1")
        _check(self.run.steps is None or not self.snapshots or self.snapshots[-1] < self.run.steps,
               f"Illegal snapshots {self.snapshots}: each must be < the budget {self.run.steps}")
        changed = ", ".join(f"strategy.{k} {v}" for k, v in self.strategy.changes().items())
        _check(self.init != "scratch" or not changed,
               f"Illegal {changed} with init scratch: the strategy sets the learning rates and "
               "freezing of pre-trained layers, and a run from scratch has none; leave strategy "
               "at its defaults")
        _check(self.run.steps is None or self.strategy.head_first_steps < self.run.steps,
               f"Illegal strategy.head_first_steps {self.strategy.head_first_steps}: must be < "
               f"the budget {self.run.steps} (the rest fine-tunes the network)")


# --------------------------------------------------------------------------- experiments


@dataclass
class PhantomSpec:
    """Generate the dataset: ``write_phantom_dataset(out, cases, seed, spacing_mm)``.

    out: folder for the dataset (relative paths are inside the experiment folder).
    anatomy: the generator's anatomy version (``lrcseg.phantoms.generate``): 2 (spine
        posterior, kidneys posterolateral to it, no organ painted inside another; checked
        against the real labelled case) or 1 (the phantoms of the evidence before it). An
        experiment folder recorded before the field existed counts as 1.
    pretrain_fraction, train_fraction: the shares of the cases in the pre-training pool and
        among the labelled candidates (``lrcseg.data.splits.make_splits``; the rest is test).
    """

    out: str = "phantoms"
    cases: int = 20
    seed: int = 0
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 5.0)
    anatomy: int = 2
    pretrain_fraction: float = 0.5
    train_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.spacing_mm = tuple(float(v) for v in self.spacing_mm)
        _check(self.anatomy in (1, 2) and not isinstance(self.anatomy, bool),
               f"Illegal phantoms.anatomy {self.anatomy!r}: 1 or 2 (the generator's versions)")
        _check(0 <= self.pretrain_fraction < 1 and 0 < self.train_fraction < 1
               and self.pretrain_fraction + self.train_fraction < 1,
               f"Illegal phantoms.pretrain_fraction {self.pretrain_fraction} / train_fraction "
               f"{self.train_fraction}: shares in [0, 1) and (0, 1) with a sum < 1 (the rest is test)")
        _check(self.cases >= 3, f"Illegal phantoms.cases {self.cases}: need >= 3 (pretrain/train/test)")
        _check(len(self.spacing_mm) == 3 and all(s > 0 for s in self.spacing_mm),
               f"Illegal phantoms.spacing_mm {self.spacing_mm}: three values > 0")


@dataclass
class InitSpec:
    """One initialisation of the matrix.

    name: its label in results and the report (unique; a folder name).
    method: "scratch" (no pre-training) or a pre-training method (moco, simclr, byol, none,
        supervised); "none" = LRC alone.
    lrc: add the LRC loss. regions: "felzenszwalb" or "grid" local regions.
    lrc_weight, lrc_temperature: overrides of lambda and tau_local (None = the default).
    overrides: nested keys of the pre-training config for this initialisation only (applied
        after the experiment's ``pretrain_overrides``), e.g. ``{model: {local_levels: [2, 3,
        4]}, moco: {momentum: 0.99}}``.
    """

    name: str = ""
    method: str = "scratch"
    lrc: bool = False
    regions: str = "felzenszwalb"
    lrc_weight: float | None = None
    lrc_temperature: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.name) and self.name.replace("_", "").replace("-", "").replace(".", "").isalnum(),
               f"Illegal initialisation name {self.name!r}: letters, digits, '_', '-', '.'")
        _check(self.method in ("scratch", *method_names()),
               f"initialisation {self.name}: illegal method {self.method!r}; one of scratch, "
               + ", ".join(method_names()))
        _check(self.regions in ("felzenszwalb", "grid"),
               f"initialisation {self.name}: illegal regions {self.regions!r}: felzenszwalb or grid")
        _check(self.method != "scratch" or not self.lrc,
               f"initialisation {self.name}: scratch has no pre-training to add LRC to")
        _check(self.method != "none" or self.lrc,
               f"initialisation {self.name}: method 'none' needs lrc: true (LRC alone)")
        _check(isinstance(self.overrides, dict),
               f"initialisation {self.name}: overrides must be a mapping of config keys")
        _check(self.method != "scratch" or not self.overrides,
               f"initialisation {self.name}: scratch has no pre-training to override")

    @property
    def pretrained(self) -> bool:
        return self.method != "scratch"


#: ``ExperimentConfig.draw_mode``: how a draw chooses its K labelled cases
DRAW_MODES = ("seeded", "distinct", "distinct_by_phase")
#: ``ExperimentConfig.nnunet_configuration``: the nnU-Net configurations an experiment runs
#: (``lrcseg.nnunet.workspace.CONFIGURATIONS``; tests/test_experiment_3d.py checks they agree)
NNUNET_CONFIGURATIONS = ("2d", "3d_fullres")


@dataclass
class ExperimentConfig:
    """A matrix of initialisations x labelled-case counts x draws x seeds on fixed splits.

    dataset: an existing labelled dataset with splits.json (pretrain/train/test), or None with
        ``phantoms`` set to generate one. labels_dataset: labelled source for "supervised".
    labeled: K values; draws: which K labelled cases a cell trains on (``draw_mode``); seeds:
        training seeds.
    draw_mode: "seeded" (draw d = split seed d of ``choose_labelled``; two draws of one K may
        pick the same cases), "distinct" (draw d = the d-th labelled set of one K that no
        earlier draw had: ``lrcseg.data.splits.distinct_labelled_sets``, so the draws of a K
        are pairwise different) or "distinct_by_phase" (distinct, and the draws' labelled cases
        follow the candidates' contrast phases in proportion; needs a dataset whose
        dataset.json records them, as phantoms do). Draws are then indices >= 0, and a cell
        still fine-tunes on ``choose_labelled(dataset, K, split_seed)`` with the split seed
        that draws its set. A folder recorded before it existed counts as "seeded".
    pretrain_steps, finetune_steps: the budgets (identical for every cell).
    eval_split: the split of splits.json the fine-tuned models are scored on: "test" for the
        evidence, "pretrain" (the pre-training pool) to choose hyper-parameters without test cases.
    baselines: initialisation names every other one is compared with (paired tests).
    configurations_tried: how many configurations were run before this one (reported).
    bootstrap_resamples, bootstrap_seed: the paired bootstrap of the report.
    pretrain_overrides: nested keys applied to every pre-training config (e.g. superpixels,
        augmentation, LRC sampling), before each initialisation's own ``overrides``.
    probe: also run the frozen-feature linear probe (``lrcseg.evaluate.probe.evaluate_probe``) of
        every (initialisation, seed) at each (K, draw), scored on ``eval_split``;
        probe_pixels is its pixel budget. Scratch is probed as a random network per seed.
        probe_levels: the probe's feature levels, a set ("all": encoder and decoder, "encoder":
        what every initialisation pre-trains, MoCo's decoder being random, "decoder") or a
        comma list of enc4/enc8/enc16/enc32/dec4/dec2/dec1 (``lrcseg.evaluate.probe``).
        probe_batchnorm: "reestimate" (BatchNorm statistics recomputed on the probe's fitting
        slices for every arm alike) or "stored". A folder recorded before these two existed
        probed enc4,enc8,enc16,dec4,dec2,dec1 with stored statistics: its experiment.yaml counts
        as that.
    finetune: False = probes only (a pre-training sweep scored by the probe); needs probe.
    learning_curve: initialisations whose cells are also evaluated at ``curve_steps`` (a list
        of names, or "all" = every initialisation, those a later invocation adds included).
    curve_steps: the learning-curve points before the full budget (each > 0 and <
        finetune_steps; sorted, no repeats); empty = 1/4 and 1/2 of the budget. The full budget
        is always the last point.
    finetune_strategy: the fine-tuning strategy (``FinetuneStrategyConfig``: learning-rate
        scales of the pre-trained layers, a head-first phase, a frozen encoder) of every
        pre-trained initialisation alike. Scratch has no pre-trained layers and fine-tunes
        with the default strategy whatever this says (``FinetuneConfig`` refuses any other
        from scratch). A folder recorded before it existed counts as the default. Not
        available with ``finetune_with: nnunet`` (nnU-Net's trainer has its own schedule).
    finetune_intensity: fine-tuning's intensity augmentation (``FinetuneConfig.intensity``
        on with its defaults, or off). A folder recorded before it existed holds cells
        fine-tuned without it, so its experiment.yaml counts as ``false``.
    finetune_organ_contrast: fine-tuning's organ contrast augmentation (``FinetuneConfig.
        organ_contrast`` on with its defaults, or off); a folder recorded before it existed
        counts as ``false``.
    equivalence_margin: the report's equivalence (TOST) margin in mean Dice, fixed before any
        number is seen (a report setting: it may change between invocations).
    keep_checkpoints: False deletes each block's weights once its metrics are written
        (pre-training weights once every probe and cell of the block has finished).
    finetune_with: "lrcseg" (lrcseg's fine-tuning) or "nnunet": every initialisation is then
        nnU-Net's ``nnunet_configuration`` network (2d by default; its plans, made once by
        nnU-Net's planner for the dataset in
        ``<out>/nnunet``), pre-trained through ``--nnunet-plans`` and fine-tuned by nnU-Net's
        own trainer on the K labelled cases for ``finetune_steps`` iterations
        (``nnunet_iterations_per_epoch`` per epoch), scored by lrcseg's evaluation. Needs the
        lrcseg[nnunet] extra and an nnU-Net raw dataset (phantoms are one); no probes or
        learning curves; the pre-training views are the plans' patch, not image_size.
    nnunet_dataset_id: the id under which nnU-Net sees the dataset (its folder naming).
    nnunet_mirroring: nnU-Net's test-time mirroring when predicting (its default; on).
    nnunet_batch_size: nnU-Net's fine-tuning batch size (None = the plans'; a CPU-sized run
        may lower it).
    nnunet_configuration: the nnU-Net configuration every cell is (only with ``finetune_with:
        nnunet``): "2d" (the default) or "3d_fullres", planned, pre-trained (the plans' 3D
        network, ``model.spatial_dims`` 3, views of the plans' patch, supervoxels at a third
        of the 2D superpixel scale unless an override sets it), trained and predicted as
        that configuration. Needs felzenszwalb regions in 3D. A folder recorded before it
        existed counts as "2d".
    """

    dataset: str | None = None
    phantoms: PhantomSpec | None = None
    labels_dataset: str | None = None
    initialisations: list[InitSpec] = field(default_factory=lambda: [
        InitSpec("scratch"), InitSpec("moco", "moco"), InitSpec("moco_lrc", "moco", lrc=True)])
    labeled: list[int] = field(default_factory=lambda: [1, 2])
    draws: list[int] = field(default_factory=lambda: [0, 1, 2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    pretrain_steps: int = 2000
    finetune_steps: int = 500
    backbone: str = "resnet18"
    image_size: int = 128
    spacing_mm: float = 2.0
    batch_size: int = 32
    finetune_batch_size: int = 8
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-3
    warmup_steps: int = 50
    device: str = "auto"
    eval_split: str = "test"
    baselines: list[str] = field(default_factory=lambda: ["scratch", "moco"])
    configurations_tried: int = 0
    bootstrap_resamples: int = 10000
    bootstrap_seed: int = 0
    qualitative_figure: bool = True
    cache_dir: str | None = None
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    probe: bool = False
    probe_pixels: int = 20000
    probe_levels: str = "all"
    probe_batchnorm: str = "reestimate"
    finetune: bool = True
    learning_curve: list[str] | str = field(default_factory=list)
    curve_steps: list[int] = field(default_factory=list)
    keep_checkpoints: bool = True
    finetune_intensity: bool = True
    finetune_organ_contrast: bool = False
    equivalence_margin: float = 0.02
    finetune_strategy: FinetuneStrategyConfig = field(default_factory=FinetuneStrategyConfig)
    draw_mode: str = "seeded"
    finetune_with: str = "lrcseg"
    nnunet_iterations_per_epoch: int = 250
    nnunet_dataset_id: int = 990
    nnunet_mirroring: bool = True
    nnunet_batch_size: int | None = None
    nnunet_configuration: str = "2d"

    def __post_init__(self) -> None:
        self.initialisations = [s if isinstance(s, InitSpec) else from_dict(InitSpec, s)
                                for s in self.initialisations]
        names = [s.name for s in self.initialisations]
        _check(len(names) > 0, "initialisations: need at least one")
        _check(len(set(names)) == len(names), f"initialisations: duplicate names in {names}")
        _check((self.dataset is None) != (self.phantoms is None),
               "give exactly one of dataset (a path) or phantoms (a block to generate them)")
        self.labeled = [int(k) for k in self.labeled]
        self.draws = [int(d) for d in self.draws]
        self.seeds = [int(s) for s in self.seeds]
        for key in ("labeled", "draws", "seeds"):
            values = getattr(self, key)
            _check(len(values) > 0 and len(set(values)) == len(values),
                   f"Illegal {key} {values}: a non-empty list without repeats")
        _check(all(k >= 1 for k in self.labeled), f"Illegal labeled {self.labeled}: counts >= 1")
        _check(isinstance(self.equivalence_margin, (int, float)) and 0 < self.equivalence_margin < 1,
               f"Illegal equivalence_margin {self.equivalence_margin!r}: a Dice difference in (0, 1)")
        _check(self.pretrain_steps >= 1 and self.finetune_steps >= 1,
               f"Illegal budgets pretrain_steps={self.pretrain_steps}, "
               f"finetune_steps={self.finetune_steps}: need >= 1")
        _check(self.image_size >= 32 and self.image_size % 32 == 0,
               f"Illegal image_size {self.image_size}: a multiple of 32, >= 32")
        _check(self.batch_size >= 2, f"Illegal batch_size {self.batch_size}: need >= 2 (contrastive)")
        _check(self.finetune_batch_size >= 1, f"Illegal finetune_batch_size {self.finetune_batch_size}")
        _check(self.configurations_tried >= 0,
               f"Illegal configurations_tried {self.configurations_tried}: need >= 0")
        _check(self.bootstrap_resamples >= 100,
               f"Illegal bootstrap_resamples {self.bootstrap_resamples}: need >= 100")
        _check(self.eval_split != "train",
               "Illegal eval_split 'train': the labelled cases are drawn from it; use test "
               "(or pretrain for a hyper-parameter sweep)")
        unknown = sorted(set(self.baselines) - set(names))
        _check(not unknown, f"baselines {unknown} are not initialisations ({names})")
        self._check_learning_curve(names)
        self._check_draws_and_strategy()
        _check(self.finetune or self.probe, "finetune: false needs probe: true (nothing to run)")
        _check(self.probe_pixels >= 100, f"Illegal probe_pixels {self.probe_pixels}: need >= 100")
        levels = self.probe_levels.split(",")
        _check(self.probe_levels in PROBE_LEVEL_SETS
               or (levels and all(v in PROBE_LEVELS for v in levels)),
               f"Illegal probe_levels {self.probe_levels!r}: one of {', '.join(PROBE_LEVEL_SETS)} "
               f"or a comma list of {', '.join(PROBE_LEVELS)}")
        _check(self.probe_batchnorm in ("reestimate", "stored"),
               f"Illegal probe_batchnorm {self.probe_batchnorm!r}: reestimate or stored")
        _check(isinstance(self.pretrain_overrides, dict),
               "pretrain_overrides must be a mapping of pre-training config keys")
        _check(self.finetune_with in ("lrcseg", "nnunet"),
               f"Illegal finetune_with {self.finetune_with!r}: lrcseg or nnunet")
        if self.finetune_with == "nnunet":
            _check(not self.probe and not self.learning_curve,
                   "finetune_with nnunet: the probe and learning curves read lrcseg's networks; "
                   "set probe: false and learning_curve: []")
            _check(self.finetune, "finetune_with nnunet needs finetune: true")
            _check(not self.finetune_strategy.changes(),
                   "finetune_with nnunet: finetune_strategy sets lrcseg's fine-tuning; nnU-Net's "
                   "trainer has its own schedule (leave finetune_strategy at its defaults)")
            _check(not any(s.method == "supervised" for s in self.initialisations),
                   "finetune_with nnunet: supervised pre-training is not available for nnU-Net "
                   "networks yet")
            _check(self.nnunet_batch_size is None or self.nnunet_batch_size >= 1,
                   f"Illegal nnunet_batch_size {self.nnunet_batch_size}: >= 1 or null")
            _check(1 <= self.nnunet_dataset_id <= 999,
                   f"Illegal nnunet_dataset_id {self.nnunet_dataset_id}: 1..999")
            per_epoch = self.nnunet_iterations_per_epoch
            _check(per_epoch >= 1 and (self.finetune_steps <= per_epoch
                                       or self.finetune_steps % per_epoch == 0),
                   f"finetune_steps {self.finetune_steps} must be a multiple of "
                   f"nnunet_iterations_per_epoch {per_epoch} (or smaller than it)")
        self._check_nnunet_configuration()
        if any(s.method == "supervised" for s in self.initialisations):
            _check(self.labels_dataset is not None,
                   "a 'supervised' initialisation needs labels_dataset (the labelled source)")
        # Validate the derived run configs now, so a bad field fails before any training.
        ModelConfig(backbone=self.backbone)
        PreprocessConfig(spacing_mm=self.spacing_mm)
        OptimConfig(lr=self.pretrain_lr, warmup_steps=self.warmup_steps)
        OptimConfig(lr=self.finetune_lr, warmup_steps=self.warmup_steps)

    def _check_nnunet_configuration(self) -> None:
        _check(self.nnunet_configuration in NNUNET_CONFIGURATIONS,
               f"Illegal nnunet_configuration {self.nnunet_configuration!r}: "
               + " or ".join(NNUNET_CONFIGURATIONS))
        _check(self.finetune_with == "nnunet" or self.nnunet_configuration == "2d",
               f"nnunet_configuration {self.nnunet_configuration} needs finetune_with: nnunet "
               "(lrcseg's own fine-tuning is 2D)")
        grid = sorted(s.name for s in self.initialisations if s.pretrained and s.regions == "grid")
        _check(self.nnunet_configuration == "2d" or not grid,
               f"nnunet_configuration {self.nnunet_configuration}: initialisation(s) "
               f"{', '.join(grid)} use grid regions, which have no 3D version; use felzenszwalb "
               "(supervoxels)")

    def _check_learning_curve(self, names: list[str]) -> None:
        if isinstance(self.learning_curve, str):
            _check(self.learning_curve == "all",
                   f"Illegal learning_curve {self.learning_curve!r}: a list of initialisations "
                   "or all")
        else:
            unknown = sorted(set(self.learning_curve) - set(names))
            _check(not unknown, f"learning_curve {unknown} are not initialisations ({names})")
        steps = [int(s) for s in self.curve_steps]
        _check(len(set(steps)) == len(steps) and all(0 < s < self.finetune_steps for s in steps),
               f"Illegal curve_steps {self.curve_steps}: distinct steps > 0 and < finetune_steps "
               f"{self.finetune_steps} (the full budget is always the last point)")
        self.curve_steps = sorted(steps)

    def _check_draws_and_strategy(self) -> None:
        _check(self.draw_mode in DRAW_MODES,
               f"Illegal draw_mode {self.draw_mode!r}: one of {', '.join(DRAW_MODES)}")
        _check(self.draw_mode == "seeded" or min(self.draws) >= 0,
               f"Illegal draws {self.draws} with draw_mode {self.draw_mode}: indices >= 0 "
               "(draw d is the d-th distinct labelled set)")
        if isinstance(self.finetune_strategy, dict):
            self.finetune_strategy = from_dict(FinetuneStrategyConfig, self.finetune_strategy)
        head_first = self.finetune_strategy.head_first_steps
        _check(head_first < self.finetune_steps,
               f"Illegal finetune_strategy.head_first_steps {head_first}: must be < "
               f"finetune_steps {self.finetune_steps} (the rest fine-tunes the network)")

    def init(self, name: str) -> InitSpec:
        return next(s for s in self.initialisations if s.name == name)

    def curve_inits(self) -> list[str]:
        """The initialisations with a learning curve (``learning_curve``, "all" resolved)."""
        if self.learning_curve == "all":
            return [s.name for s in self.initialisations]
        return list(self.learning_curve)


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(obj: Any) -> Any:
    """Nested dataclasses -> plain dicts/lists (tuples become lists); a ``SECTIONS`` field's
    entries become keys of their own."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if f.metadata.get("sections"):
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten_dict(config: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a<sep>b": leaf}: ``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_dict(value, sep, name + sep))
        else:
            flat[name] = value
    return flat


def from_dict(cls: type, data: dict[str, Any] | None) -> Any:
    """Build dataclass ``cls`` from a (partial) dict; unknown keys raise ConfigError.

    A partial section fills its missing keys from ``cls``'s own default for that field, so
    ``{"run": {"steps": 20}}`` keeps FinetuneConfig's batch size 8, not RunConfig's 32. A
    ``SECTIONS`` field takes the keys that name no field (``cls`` checks them).
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    sections = [name for name, f in fields.items() if f.metadata.get("sections")]
    if sections and unknown:
        data[sections[0]] = {**(data.get(sections[0]) or {}), **{k: data.pop(k) for k in unknown}}
        unknown = []
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        factory = fields[name].default_factory
        if (isinstance(value, dict) and dataclasses.is_dataclass(hints[name])
                and factory is not dataclasses.MISSING):
            value = update_dict(to_dict(factory()), value)
        kwargs[name] = _coerce(hints[name], value)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(inner[0], value) if len(inner) == 1 else value
    return value


def upgrade_model_dict(model: dict[str, Any]) -> dict[str, Any]:
    """A ``ModelConfig`` dict as written by an older lrcseg -> today's keys (``local_level: l``
    became ``local_levels: [l]``); other dicts are returned as they are."""
    model = dict(model)
    model.setdefault("spatial_dims", 2)  # written before 3D existed
    if "local_level" in model:
        level = model.pop("local_level")
        model.setdefault("local_levels", [level])
    return model


def update_dict(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``overrides`` wins; returns a new dict."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = update_dict(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (ConfigError naming the file otherwise)."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(loaded).__name__}")
    return loaded or {}


def load_config(cls: type, path: str | Path | None = None,
                overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None):
    """Defaults <- ``base`` <- YAML file <- overrides (a nested dict, e.g. from CLI flags).

    base: settings that replace the defaults but not what the file or the flags say (what an
    initialising run fixes). An invalid value is reported with the file's name when a file
    was read, since the user has to correct it there or in a flag.
    """
    data = update_dict(base or {}, read_config_file(path) if path is not None else {})
    data = update_dict(data, overrides or {})
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path} (or a flag overriding it): {exc}") from exc


def absolute_paths(cfg: Any) -> Any:
    """A copy of config ``cfg`` whose path fields (metadata ``PATH``) are absolute, resolved
    against the working directory; "scratch" and empty values stay as they are."""
    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if value is None or value in NOT_PATHS:
            return value
        return str(Path(value).expanduser().absolute())

    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("path"):
            changes[f.name] = resolve(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = absolute_paths(value)
    return dataclasses.replace(cfg, **changes)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of the canonical JSON of ``obj``: stable across runs and machines."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
