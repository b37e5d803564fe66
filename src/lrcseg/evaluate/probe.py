"""Frozen-feature dense linear probe: how linearly separable are the organs in a U-Net's features?

The network is frozen; only a per-pixel softmax classifier is trained on its features, so the
score measures the representation, not a fine-tuning schedule (docs/METHOD.md, "Frozen-feature
probe").

    K labelled cases (``choose_labelled``, as fine-tuning draws them) -> slice cache
    -> class-balanced pixel draw from the labels (``choose_pixels``)
    -> BatchNorm running statistics re-estimated on the slices holding those pixels
       (``reestimate_batchnorm``; ``batchnorm="stored"`` keeps the network's own)
    -> features of those slices, sampled at the pixels (``gather_features``)
    -> standardise, multinomial logistic regression by full-batch L-BFGS (``fit_linear_probe``)
    -> ``ProbeModel`` (B, C, H, W) -> (B, K, H, W) logits -> ``predict_labels`` and
       ``SegmentationMetrics`` on each test case's original grid (``evaluate_probe``).

**Networks.** The U-Net is read through the levels adapter of ``models/pretrain_net.py``,
the one the pre-training network uses: ``FlexibleUNetLevels`` (a 2D or 3D FlexibleUNet) or
``NnUNetLevels`` (an nnU-Net plans network, 2d or 3d_fullres, with its CTNormalization
input). A 2D network reads whole slices, as below. A 3D network (``model.spatial_dims: 3``)
reads each labelled volume whole, ``(1, C, Z, H, W)`` with Z the axial axis as in 3D
pre-training, zero-padded to multiples of the network's total stride along z and of
lcm(32, that stride) in-plane (the in-plane rule the 2D probe and ``lrcseg.evaluate.predict``
pad by), split evenly; its features are sampled at the chosen voxels with trilinear
``grid_sample``, and the fitted probe predicts each test volume whole too. One forward pass per
volume: simple and exact (no tiles, no seams; nnU-Net's instance normalisation sees one input
extent when fitting and predicting), at the memory of one volume through the network.

**Levels** (``DenseFeatures``). ``encN``: encoder map at stride N (N in 2, 4, 8, 16, 32),
``decN``: output of the decoder block at stride N (N in 16, 8, 4, 2, 1). N is the in-plane
stride (an nnU-Net network may pool z less); a network has the levels its adapter reports
(``encoder_strides``, ``decoder_strides``): a FlexibleUNet all of them, an nnU-Net network
those of its stages (its full-resolution first stage and strides above 32 are not levels;
where two stages share an in-plane stride the first listed is the level). A named set means
its members the network has; a level asked for by name that the network lacks is a
ConfigError naming those it has. Named sets
(:data:`LEVEL_SETS`): "encoder" = enc4, enc8, enc16, enc32 (what every pre-training trains,
the bottleneck included); "decoder" = dec4, dec2, dec1; "all" (the default) = both. MoCo
trains only the encoder, so its decoder levels are those of a random network; LRC and
fine-tuning train the decoder too: "encoder" compares initialisations on what they all train.

**BatchNorm** (``reestimate_batchnorm``). A block that never ran in train mode (all of a
random network; the decoder blocks a pre-training never runs) holds BatchNorm's initial
running statistics (mean 0, variance 1): an identity, not the normalisation fine-tuning
starts from. By default every BatchNorm layer on the probe's path (the encoder, and the
decoder down to the finest decoder level probed: with "all", every layer of the network) is
re-estimated first: its running statistics are reset and recomputed from forward passes over
the probe's own fitting slices that normalise by batch statistics and average them
cumulatively, as train mode with ``momentum=None`` does; no gradients, weights and every other
module untouched. Every network is then probed with its BatchNorm in the same defined state,
whatever its training ran.

**Features at a pixel.** Level l with map ``f_l`` (C_l, h, w) at stride s is upsampled
bilinearly (``align_corners=False``; 3D: trilinear, (C_l, d, h, w)) to the input size; at the
chosen pixels that equals ``grid_sample`` at the pixel centres, so the full-resolution stack
is never built. With x the
concatenation over levels (D = sum_l C_l), mu and sigma its per-channel mean and standard
deviation over the chosen pixels:

    logits(x) = W (x - mu) / sigma + b,   W (K, D), b (K,)

fitted by minimising the class-balanced cross-entropy ``sum_c mean_{i: y_i = c} CE_i / P``
over the P classes present, plus ``l2 / 2 * ||W||^2`` (l2 = 0.001, fixed a priori), with
``torch.optim.LBFGS`` (strong-Wolfe line search) in float64 on the CPU from zeros:
deterministic for a given machine and torch thread count (BLAS sums depend on both).

**Prediction** (``ProbeModel``). Upsampling and the affine map are both linear, so
``logits = sum_l upsample(W'_l f_l) + b'`` with ``W'_l = W_l / sigma_l`` and
``b' = b - sum_l W'_l mu_l``: each level is reduced to K channels at its own resolution and only
the K-channel maps are upsampled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import FlexibleUNet
from torch import Tensor, nn
from tqdm import tqdm

from lrcseg.config import ModelConfig, PreprocessConfig, from_dict, to_dict
from lrcseg.data.labels import labelled_volumes, model_labels
from lrcseg.data.layouts import Case, load_dataset
from lrcseg.data.preprocess import stack_context
from lrcseg.data.readers import Volume
from lrcseg.data.slice_cache import CachedVolume, SliceCache
from lrcseg.data.splits import choose_labelled, split_cases
from lrcseg.errors import ConfigError
from lrcseg.evaluate.metrics import SegmentationMetrics
from lrcseg.evaluate.predict import PAD_MULTIPLE, pad_amounts, predict_labels
from lrcseg.evaluate.run import check_label_names, score_cases
from lrcseg.models.export import load_exported
from lrcseg.models.load import (
    load_backbone,
    load_checkpoint,
    load_finetuned,
    load_pretrain_network,
    pretrained_unet_weights,
    resolve_checkpoint,
)
from lrcseg.models.pretrain_net import FlexibleUNetLevels, NnUNetLevels
from lrcseg.models.unet import build_unet

ENCODER_STRIDES = (2, 4, 8, 16, 32)   # unet.encoder(x)[i] has stride 2 ** (i + 1)
DECODER_STRIDES = (16, 8, 4, 2, 1)    # unet.decoder.blocks[i] has stride 16 / 2 ** i
LEVELS = tuple(f"enc{s}" for s in ENCODER_STRIDES) + tuple(f"dec{s}" for s in DECODER_STRIDES)
LevelSet = Literal["all", "encoder", "decoder"]
_ENCODER_SET = ("enc4", "enc8", "enc16", "enc32")
_DECODER_SET = ("dec4", "dec2", "dec1")
#: the named level sets :func:`parse_levels` accepts besides explicit lists
LEVEL_SETS: dict[str, tuple[str, ...]] = {"all": _ENCODER_SET + _DECODER_SET,
                                          "encoder": _ENCODER_SET, "decoder": _DECODER_SET}
DEFAULT_LEVELS = LEVEL_SETS["all"]
#: "reestimate": BatchNorm statistics recomputed on the fitting slices; "stored": as loaded
BatchNormMode = Literal["reestimate", "stored"]
BATCHNORM_MODES: tuple[str, ...] = get_args(BatchNormMode)
DEFAULT_BATCHNORM: BatchNormMode = "reestimate"
DEFAULT_PIXELS = 20000
DEFAULT_L2 = 1e-3
DEFAULT_MAX_ITER = 500
# Logit of a class without any fitting pixel: never predicted (exp underflows to 0).
_ABSENT_LOGIT = -1e4
#: what the probe reads: a FlexibleUNet (2D or 3D) or a levels adapter of ``pretrain_net``
LevelsAdapter = FlexibleUNetLevels | NnUNetLevels
ProbeNetwork = FlexibleUNet | FlexibleUNetLevels | NnUNetLevels


def parse_levels(levels: LevelSet | str | Sequence[str]) -> tuple[str, ...]:
    """Validated level names in the canonical order of :data:`LEVELS`.

    levels: a set name of :data:`LEVEL_SETS` ("all", "encoder", "decoder"), a comma list
    ("enc4,dec1") or a sequence of names. ConfigError for an empty list, an unknown name or a
    repeated one.
    """
    if isinstance(levels, str) and levels.strip() in LEVEL_SETS:
        return LEVEL_SETS[levels.strip()]
    names = [s.strip() for s in levels.split(",")] if isinstance(levels, str) else list(levels)
    names = [n for n in names if n]
    choices = f"{', '.join(LEVEL_SETS)} or a list of {', '.join(LEVELS)}"
    if not names:
        raise ConfigError(f"no probe levels given; choose {choices}")
    unknown = [n for n in names if n not in LEVELS]
    if unknown:
        raise ConfigError(f"unknown probe level(s) {', '.join(unknown)}; choose {choices} "
                          "(encN: encoder at stride N, decN: decoder block at stride N)")
    if len(set(names)) != len(names):
        raise ConfigError(f"probe levels repeated: {','.join(names)}")
    return tuple(n for n in LEVELS if n in names)


def level_set_name(levels: Sequence[str]) -> str:
    """The name of the :data:`LEVEL_SETS` entry equal to ``levels``, else "custom"."""
    return next((name for name, members in LEVEL_SETS.items() if tuple(levels) == members),
                "custom")


def check_batchnorm_mode(mode: str) -> BatchNormMode:
    """``mode`` if it is one of :data:`BATCHNORM_MODES`, else ConfigError."""
    if mode not in BATCHNORM_MODES:
        raise ConfigError(f"unknown probe BatchNorm mode {mode!r}; choose from "
                          f"{', '.join(BATCHNORM_MODES)}")
    return cast(BatchNormMode, mode)


def _level_table(adapter: LevelsAdapter) -> dict[str, tuple[str, int]]:
    """Probe level name -> ("enc", index of the encoder map) | ("dec", decoder level) of a
    network, from its adapter's in-plane strides; names outside :data:`LEVELS` are left out,
    and where two maps share a name the first listed keeps it."""
    table: dict[str, tuple[str, int]] = {}
    for index, stride in enumerate(adapter.encoder_strides):
        table.setdefault(f"enc{stride}", ("enc", index))
    for level, stride in sorted(adapter.decoder_strides.items()):
        table.setdefault(f"dec{stride}", ("dec", level))
    return {name: where for name, where in table.items() if name in LEVELS}


def _levels_of(table: dict[str, tuple[str, int]], levels: str | Sequence[str]) -> tuple[str, ...]:
    """``parse_levels(levels)`` that the network (``table``) has: a named set keeps its members
    the network has; a level asked for by name that it lacks is a ConfigError."""
    names = parse_levels(levels)
    present = tuple(n for n in names if n in table)
    if present == names:
        return names
    has = ", ".join(n for n in LEVELS if n in table)
    if names in LEVEL_SETS.values() and present:
        return present
    raise ConfigError(f"this network has no probe level(s) "
                      f"{', '.join(n for n in names if n not in table)}; its levels: {has}")


class DenseFeatures(nn.Module):
    """A frozen U-Net as a dense feature extractor: the maps of the chosen levels.

    Args:
        network: a ``FlexibleUNet`` (2D or 3D; its segmentation head is not used) or a levels
            adapter of ``models/pretrain_net.py`` (``FlexibleUNetLevels``, ``NnUNetLevels``:
            an nnU-Net plans network, 2d or 3d_fullres), through which the maps are read.
        levels: level names (:func:`parse_levels`), default :data:`DEFAULT_LEVELS`; a named
            set means its members this network has (module docstring, "Levels").
        freeze: also set ``requires_grad=False`` on the U-Net's parameters. Pass False for a
            network that is still being trained (the online probe); the caller then restores
            its mode.

    The U-Net is put in eval mode (BatchNorm uses its running statistics) and stays there
    whatever ``train()`` is called with (:func:`reestimate_batchnorm` makes its BatchNorm
    layers use batch statistics through forward hooks). ``forward(x)`` with x a float tensor
    (B, C, H, W) (``spatial_dims`` 3: (B, C, D, H, W)), every side a multiple of the network's
    total stride along it (``multiple`` is one), returns one tensor per level, in
    ``self.levels`` order, of shape (B, C_l, H / s_l, W / s_l) (3D: (B, C_l, D / t_l, H / s_l,
    W / s_l)) for the level's strides; no gradients flow into the U-Net. The whole encoder
    runs; the decoder only as deep as the finest decoder level asked for (``path()``: the
    modules a forward pass runs).
    """

    def __init__(self, network: ProbeNetwork, levels: str | Sequence[str] = DEFAULT_LEVELS,
                 freeze: bool = True):
        super().__init__()
        if isinstance(network, FlexibleUNet):
            network = FlexibleUNetLevels.of(network)
        if not isinstance(network, (FlexibleUNetLevels, NnUNetLevels)):
            raise ValueError("DenseFeatures needs a FlexibleUNet or a levels adapter "
                             f"(FlexibleUNetLevels, NnUNetLevels), got {type(network).__name__}")
        self.adapter = network
        self.unet = network.unet
        self.spatial_dims = network.spatial_dims
        table = _level_table(network)
        self.levels = _levels_of(table, levels)
        self._where = {name: table[name] for name in self.levels}
        self._last_block = max((i for kind, i in self._where.values() if kind == "dec"),
                               default=-1)
        # the padding of every input: in-plane to lcm(32, total stride) as the 2D probe and
        # ``evaluate.predict`` pad slices, z (3D) to the total stride
        in_plane = tuple(math.lcm(PAD_MULTIPLE, d) for d in network.divisor[-2:])
        self.multiple = network.divisor[:-2] + in_plane
        if freeze:
            self.unet.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> DenseFeatures:
        super().train(mode)
        self.unet.eval()
        return self

    def path(self) -> list[nn.Module]:
        """The U-Net's modules that ``forward`` runs: the encoder and the decoder blocks down to
        the finest decoder level asked for."""
        return self.adapter.modules(self._last_block)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 2 + self.spatial_dims:
            raise ValueError(f"this {self.spatial_dims}D network's features take "
                             f"{2 + self.spatial_dims}-dimensional input, got {tuple(x.shape)}")
        with torch.no_grad():
            features = self.adapter.encode(x)
            decoded = self.adapter.decode(features, self._last_block) if self._last_block >= 0 else {}
        return [features[i] if kind == "enc" else decoded[i] for kind, i in self._where.values()]


class ProbeModel(nn.Module):
    """Frozen features + the fitted per-pixel linear classifier, a segmentation network.

    Args:
        features: the :class:`DenseFeatures` the classifier was fitted on.
        channels: C_l of each level (D = sum).
        weight: (K, D) on standardised features; bias: (K,); mean, std: (D,) the standardisation.

    ``forward(x)``: (B, C, H, W) -> (B, K, H, W) logits (3D: (B, C, D, H, W) -> (B, K, D, H, W);
    float32 outside autocast), computed per level as ``upsample(W'_l f_l)`` plus ``b'``
    (module docstring), equal to upsampling and concatenating all levels first, then
    standardising and applying (W, b). An input whose sides are not multiples of
    ``features.multiple`` is zero-padded to them (split evenly, as the fitting inputs were) and
    the logits cropped back.
    """

    def __init__(self, features: DenseFeatures, channels: Sequence[int], weight: Tensor,
                 bias: Tensor, mean: Tensor, std: Tensor):
        super().__init__()
        d = sum(channels)
        if len(channels) != len(features.levels):
            raise ValueError(f"{len(channels)} channel counts for {len(features.levels)} levels")
        if weight.ndim != 2 or weight.shape[1] != d or bias.shape != weight.shape[:1]:
            raise ValueError(f"weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit "
                             f"(K, {d}) / (K,)")
        if mean.shape != (d,) or std.shape != (d,):
            raise ValueError(f"mean {tuple(mean.shape)} / std {tuple(std.shape)}: expected ({d},)")
        self.features = features
        folded = weight.double() / std.double()
        offset = bias.double() - folded @ mean.double()
        self.num_classes = int(weight.shape[0])
        ones = (1,) * features.spatial_dims
        for i, w in enumerate(torch.split(folded, list(channels), dim=1)):
            self.register_buffer(f"weight_{i}", w.float().reshape(*w.shape, *ones).contiguous())
        self.register_buffer("bias", offset.float())

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        pads = [pad_amounts(n, m) for n, m in zip(size, self.features.multiple, strict=True)]
        if not any(before + after for before, after in pads):
            return self._logits(x)
        logits = self._logits(F.pad(x, [v for pad in reversed(pads) for v in pad], value=0.0))
        return logits[(..., *(slice(before, before + n) for (before, _), n in zip(pads, size,
                                                                                 strict=True)))]

    def _logits(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        conv = F.conv2d if self.features.spatial_dims == 2 else F.conv3d
        mode = "bilinear" if self.features.spatial_dims == 2 else "trilinear"
        logits = self.bias.view(1, -1, *(1,) * len(size)).expand(x.shape[0], -1, *size)
        for i, f in enumerate(self.features(x)):
            y = conv(f.float(), getattr(self, f"weight_{i}"))
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, mode=mode, align_corners=False)
            logits = logits + y
        return logits


class _VolumeAsSlices(nn.Module):
    """A 3D :class:`ProbeModel` in the place of ``evaluate.predict``'s slice network: given every
    slice of a volume as one batch, (Z, C, H, W) in order, it predicts the volume
    (1, C, Z, H, W) and returns its logits as slices, (Z, K, H, W); ``predict_labels`` then
    maps them back to the original grid as it does a 2D network's."""

    def __init__(self, probe: ProbeModel):
        super().__init__()
        self.probe = probe

    def forward(self, x: Tensor) -> Tensor:
        return self.probe(x.movedim(0, 1)[None])[0].movedim(1, 0)


def choose_pixels(labels: Sequence[np.ndarray], num_classes: int, budget: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Class-balanced draw of up to ``budget`` labelled pixels across volumes.

    labels: per volume a (Z, H, W) integer map with ids in [0, num_classes). Each class gets
    ``min(budget // num_classes, its pixel count)`` pixels, uniformly without replacement over
    all its pixels in all volumes. Returns per volume the sorted flat indices into (Z, H, W).
    """
    if budget < num_classes:
        raise ConfigError(f"pixel budget {budget} is smaller than the {num_classes} classes")
    per_class = budget // num_classes
    flat = [np.asarray(lab).reshape(-1) for lab in labels]
    counts = np.stack([np.bincount(f, minlength=num_classes)[:num_classes] for f in flat])
    picks: list[list[np.ndarray]] = [[] for _ in flat]
    for c in range(num_classes):
        total = int(counts[:, c].sum())
        if total == 0:
            continue
        chosen = np.sort(rng.choice(total, size=min(per_class, total), replace=False))
        bounds = np.concatenate([[0], np.cumsum(counts[:, c])])
        for v, f in enumerate(flat):
            mine = chosen[(chosen >= bounds[v]) & (chosen < bounds[v + 1])] - bounds[v]
            if mine.size:
                picks[v].append(np.flatnonzero(f == c)[mine])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in picks]


def _padded_slices(volume: CachedVolume, zs: Sequence[int], context_slices: int,
                   batch_size: int, multiple: Sequence[int] = (PAD_MULTIPLE, PAD_MULTIPLE)
                   ) -> Iterator[tuple[list[int], Tensor, tuple[int, int]]]:
    """Batches ``(zs, x, (top, left))`` of whole slices, x (B, C, H_p, W_p) float32 padded with
    zeros to multiples of ``multiple`` (32: as ``lrcseg.evaluate.predict`` pads them)."""
    _, _, h, w = volume.image.shape
    (top, bottom), (left, right) = pad_amounts(h, multiple[0]), pad_amounts(w, multiple[1])
    for start in range(0, len(zs), batch_size):
        batch = list(zs[start:start + batch_size])
        x = np.stack([stack_context(volume.image, z, context_slices) for z in batch])
        x = torch.from_numpy(x.astype(np.float32))
        yield batch, F.pad(x, (left, right, top, bottom), value=0.0), (top, left)


def _padded_volume(volume: CachedVolume, context_slices: int, multiple: Sequence[int]
                   ) -> tuple[list[int], Tensor, tuple[int, int, int]]:
    """``(zs, x, (front, top, left))``: the whole volume as one input x (1, C, Z_p, H_p, W_p)
    float32 (C = its windows, Z the axial axis as in 3D pre-training), zero-padded to multiples
    of ``multiple`` (d, h, w) split evenly; zs = every slice."""
    if context_slices != 1:
        raise ConfigError(f"a 3D network reads whole volumes: preprocess.context_slices must be 1, "
                          f"got {context_slices}")
    image = np.moveaxis(np.asarray(volume.image), 1, 0)  # (C, Z, H, W)
    pads = [pad_amounts(n, m) for n, m in zip(image.shape[1:], multiple, strict=True)]
    x = torch.from_numpy(image.astype(np.float32))[None]
    x = F.pad(x, [v for pad in reversed(pads) for v in pad], value=0.0)
    return list(range(image.shape[1])), x, tuple(before for before, _ in pads)


def _network_inputs(features: DenseFeatures, volume: CachedVolume, zs: Sequence[int],
                    context_slices: int, batch_size: int
                    ) -> Iterator[tuple[list[int], Tensor, tuple[int, ...]]]:
    """The inputs that read slices ``zs`` of ``volume``: ``(zs of the input, x, padding before
    each spatial axis)``. A 2D network: batches of those slices (``_padded_slices``); a 3D one:
    the whole volume (``_padded_volume``), which holds them all."""
    if features.spatial_dims == 2:
        yield from _padded_slices(volume, zs, context_slices, batch_size, features.multiple)
    else:
        yield _padded_volume(volume, context_slices, features.multiple)


def _pick_slices(volume: CachedVolume, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, in-plane flat index) of flat indices into the volume's (Z, H, W)."""
    return np.divmod(flat, int(np.prod(volume.image.shape[2:])))


def _sampling_grid(coords: Sequence[np.ndarray], before: Sequence[int],
                   padded: Sequence[int]) -> Tensor:
    """``grid_sample``'s grid at voxel centres, (1, 1, n, 2) or (1, 1, 1, n, 3) as (x, y[, z]):
    coords are the n points' indices along each spatial axis ((z,) row, col) of the unpadded
    input, before the padding before each axis, padded the padded sizes."""
    normalised = [(2 * (c + b) + 1) / n - 1 for c, b, n in zip(coords, before, padded, strict=True)]
    grid = torch.from_numpy(np.stack(normalised[::-1], axis=-1)).float()
    return grid.reshape(*(1,) * len(coords), *grid.shape)


def _point_grids(features: DenseFeatures, z_of: np.ndarray, yx: np.ndarray, width: int,
                 batch: list[int], before: tuple[int, ...], padded: Sequence[int]
                 ) -> Iterator[tuple[int, Tensor]]:
    """``(b, grid)`` per sample b of an input holding slices ``batch``: where it reads the
    chosen points (slice ``z_of``, in-plane flat index ``yx`` in rows of ``width``) that lie in
    it, in their order. 2D: one grid per slice; 3D: one grid of the volume's points."""
    if features.spatial_dims == 2:
        for b, z in enumerate(batch):
            yield b, _sampling_grid(np.divmod(yx[z_of == z], width), before, padded)
    else:
        mask = np.isin(z_of, batch)
        yield 0, _sampling_grid((z_of[mask], *np.divmod(yx[mask], width)), before, padded)


def _batchnorm_layers(features: DenseFeatures) -> list[nn.Module]:
    """The BatchNorm layers (with running statistics) on the features' path, in order."""
    return [m for part in features.path() for m in part.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _train_mode_batchnorm(module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> Tensor:
    """Forward hook: the layer's train-mode output with ``momentum=None``, i.e. normalised by
    the batch's statistics, its running statistics updated to the cumulative average."""
    module.num_batches_tracked.add_(1)
    return F.batch_norm(inputs[0], module.running_mean, module.running_var, module.weight,
                        module.bias, True, 1.0 / float(module.num_batches_tracked), module.eps)


def reestimate_batchnorm(features: DenseFeatures, volumes: Sequence[CachedVolume],
                         picks: Sequence[np.ndarray], context_slices: int,
                         batch_size: int = 8) -> dict[str, int]:
    """Recompute the running statistics of every BatchNorm layer on the features' path from
    the slices holding ``picks`` (module docstring, "BatchNorm"; a 3D network: from the
    volumes holding them, each one batch).

    Each layer's running mean and variance are reset, then set to the cumulative average
    over batches of the batch statistics (unbiased variance) seen by forward passes in which
    every one of these layers normalises by its batch's statistics: what train mode with
    ``momentum=None`` computes. It is done by a forward hook, so no module changes mode or
    momentum (a ``SyncBatchNorm`` in train mode would synchronise across ranks, and only one
    rank probes). No gradients; weights untouched; deterministic for given inputs. The slices
    run in the order ``gather_features`` runs them, padded alike. Returns {"layers", "slices"}
    (3D: every slice of the volumes run).
    """
    layers = _batchnorm_layers(features)
    device = next(features.unet.parameters()).device
    slices = 0
    for layer in layers:
        layer.reset_running_stats()
    hooks = [layer.register_forward_hook(_train_mode_batchnorm) for layer in layers]
    try:
        for volume, flat in zip(volumes, picks, strict=True):
            zs = np.unique(_pick_slices(volume, flat)[0])
            for batch, x, _ in _network_inputs(features, volume, zs, context_slices, batch_size):
                features(x.to(device))
                slices += len(batch)
    finally:
        for hook in hooks:
            hook.remove()
    if layers and not slices:
        raise ConfigError("no slice to re-estimate the probe's BatchNorm statistics on")
    return {"layers": len(layers), "slices": slices}


def gather_features(features: DenseFeatures, volumes: Sequence[CachedVolume],
                    picks: Sequence[np.ndarray], context_slices: int, batch_size: int = 8,
                    progress: bool = False) -> list[Tensor]:
    """Each level's features at the chosen pixels: a list over levels of (N, C_l) float32 CPU
    tensors, rows in the order of ``picks`` (volume, then flat index).

    Only slices holding chosen pixels are run (a 3D network: each volume whole); each level is
    sampled with ``grid_sample`` at the pixel (voxel) centres (border clamped), equal to
    bilinear (trilinear) upsampling with ``align_corners=False`` followed by indexing.
    """
    device = next(features.unet.parameters()).device
    rows: list[list[Tensor]] = [[] for _ in features.levels]
    slices = [_pick_slices(v, flat) for v, flat in zip(volumes, picks, strict=True)]
    bar = tqdm(total=sum(len(np.unique(z_of)) for z_of, _ in slices), desc="probe features",
               unit="slice", disable=not progress)
    for volume, (z_of, yx) in zip(volumes, slices, strict=True):
        zs = np.unique(z_of)
        for batch, x, before in _network_inputs(features, volume, zs, context_slices, batch_size):
            maps = features(x.to(device))
            for b, grid in _point_grids(features, z_of, yx, volume.image.shape[3], batch,
                                           before, x.shape[2:]):
                grid = grid.to(device)
                for level, f in enumerate(maps):
                    sampled = F.grid_sample(f[b:b + 1].float(), grid, mode="bilinear",
                                            padding_mode="border", align_corners=False)
                    rows[level].append(sampled.flatten(2)[0].T.cpu())
            bar.update(len(np.intersect1d(batch, zs)))
    bar.close()
    return [torch.cat(r) for r in rows]


def fit_linear_probe(x: Tensor, y: Tensor, num_classes: int, l2: float = DEFAULT_L2,
                     max_iter: int = DEFAULT_MAX_ITER) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Class-balanced multinomial logistic regression by full-batch L-BFGS (module docstring).

    x: (N, D) float features (already standardised); y: (N,) class ids in [0, num_classes).
    Classes without a sample get zero weights and a bias of -1e4 (never predicted).
    Returns weight (K, D) float64, bias (K,) float64 and {"iterations", "loss",
    "train_accuracy"} (loss and accuracy at the solution); deterministic (float64 on the CPU
    from zeros). Works under ``torch.no_grad`` too (L-BFGS enables gradients for its closure).
    """
    if l2 < 0:
        raise ValueError(f"Illegal l2 {l2}: must be >= 0")
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.long)
    present, target = torch.unique(y, return_inverse=True)
    if len(present) < 2:
        raise ConfigError(f"the chosen pixels hold {len(present)} class(es); a probe needs >= 2")
    class_weight = 1.0 / torch.bincount(target).double()
    weight = torch.zeros(x.shape[1], len(present), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(present), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def objective(logits: Tensor) -> Tensor:
        return (F.cross_entropy(logits, target, weight=class_weight)
                + 0.5 * l2 * weight.pow(2).sum())

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective(x @ weight + bias)
        loss.backward()
        return loss

    optimizer.step(closure)  # L-BFGS enables gradients for the closure itself
    with torch.no_grad():
        logits = x @ weight + bias
        loss = objective(logits)
        accuracy = float((logits.argmax(1) == target).double().mean())
    full_weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    full_bias = torch.full((num_classes,), _ABSENT_LOGIT, dtype=torch.float64)
    full_weight[present] = weight.detach().T
    full_bias[present] = bias.detach()
    info = {"iterations": int(optimizer.state[weight]["n_iter"]), "loss": float(loss),
            "train_accuracy": accuracy}
    return full_weight, full_bias, info


def fit_probe(features: DenseFeatures, volumes: Sequence[CachedVolume], picks: Sequence[np.ndarray],
              num_classes: int, context_slices: int, l2: float = DEFAULT_L2,
              max_iter: int = DEFAULT_MAX_ITER, batch_size: int = 8, progress: bool = False,
              batchnorm: BatchNormMode = DEFAULT_BATCHNORM) -> tuple[ProbeModel, dict[str, Any]]:
    """Re-estimate BatchNorm (``batchnorm="reestimate"``: :func:`reestimate_batchnorm` on the
    same slices; this changes the network's running statistics), gather features at ``picks``
    (labels from ``volumes[i].label``), standardise, fit.

    Returns the :class:`ProbeModel` (on the features' device) and {"iterations", "loss",
    "train_accuracy", "pixels", "channels" (level -> C_l), "pixels_per_class" (list over class
    ids), "batchnorm" (the mode), "batchnorm_layers", "batchnorm_slices" (0, 0 when
    "stored"), "fit_seconds"}; fit_seconds covers the re-estimation, feature extraction and
    the L-BFGS fit.
    """
    start = time.perf_counter()
    bn = {"layers": 0, "slices": 0}
    if check_batchnorm_mode(batchnorm) == "reestimate":
        bn = reestimate_batchnorm(features, volumes, picks, context_slices, batch_size)
    per_level = gather_features(features, volumes, picks, context_slices, batch_size, progress)
    y = torch.from_numpy(np.concatenate([np.asarray(v.label).reshape(-1)[p].astype(np.int64)
                                         for v, p in zip(volumes, picks, strict=True)]))
    x = torch.cat(per_level, dim=1).double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant channels: centred only
    weight, bias, info = fit_linear_probe((x - mean) / std, y, num_classes, l2, max_iter)
    channels = [int(f.shape[1]) for f in per_level]
    model = ProbeModel(features, channels, weight, bias, mean, std)
    model.to(next(features.unet.parameters()).device)
    info.update(pixels=int(len(y)), channels=dict(zip(features.levels, channels, strict=True)),
                pixels_per_class=np.bincount(y.numpy(), minlength=num_classes).tolist(),
                batchnorm=batchnorm, batchnorm_layers=bn["layers"], batchnorm_slices=bn["slices"],
                fit_seconds=time.perf_counter() - start)
    return model, info


def load_probe_network(model: str, backbone: str | None = None, spacing_mm: float | None = None,
                       seed: int = 0) -> tuple[ProbeNetwork, PreprocessConfig, dict[str, Any]]:
    """The U-Net to probe, its preprocessing and its provenance.

    model: "scratch" (a random U-Net of ``backbone``, default resnet18, initialised under
    ``torch.manual_seed(seed)`` without touching the global RNG; preprocessing
    ``PreprocessConfig(spacing_mm=spacing_mm)``), a pre-training run folder or checkpoint,
    a fine-tuning run folder or checkpoint, or an exported ``.pt`` with its ``.json``.
    backbone and spacing_mm apply to scratch only (ConfigError otherwise). Returns
    (the network on the CPU, preprocessing, {"model", "kind", "backbone"[, "labels"]}): a
    ``FlexibleUNet`` (a 3D one for a 3D export), or, for a 3D or nnU-Net pre-training, the
    levels adapter of its ``PretrainNetwork`` (``FlexibleUNetLevels`` / ``NnUNetLevels``; its
    "backbone" names the nnU-Net configuration and network class).
    """
    if model == "scratch":
        cfg = ModelConfig(backbone=backbone or "resnet18")
        preprocess = (PreprocessConfig() if spacing_mm is None
                      else PreprocessConfig(spacing_mm=spacing_mm))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = build_unet(cfg, preprocess.in_channels, 1)
        return unet, preprocess, {"model": "scratch", "kind": "scratch", "backbone": cfg.backbone}
    path = resolve_checkpoint(model, "model (pre-training or fine-tuning run, or export)")
    if path.with_suffix(".json").is_file():
        weights, meta = load_exported(path)
        unet = FlexibleUNet(**meta["flexible_unet"], out_channels=1)
        load_backbone(unet, weights, path)
        preprocess = from_dict(PreprocessConfig, meta["preprocess"])
        info = {"model": str(path), "kind": "exported",
                "backbone": meta["flexible_unet"]["backbone"]}
    else:
        state = load_checkpoint(path)
        kind = state.get("kind")
        if kind == "pretrain" and _reads_through_adapter(state):
            unet, preprocess, info = _pretrained_levels(path)
        elif kind == "pretrain":  # the U-Net inside PretrainNetwork, without the heads
            their = state["config"]["model"]
            model_cfg = ModelConfig(backbone=their["backbone"],
                                    decoder_channels=their["decoder_channels"])
            preprocess = from_dict(PreprocessConfig, state["config"]["preprocess"])
            unet = build_unet(model_cfg, preprocess.in_channels, 1)
            load_backbone(unet, pretrained_unet_weights(state), path)
            info = {"model": str(path), "kind": kind, "backbone": model_cfg.backbone}
        elif kind == "finetune":
            unet, meta = load_finetuned(path)
            preprocess = meta["preprocess"]
            info = {"model": str(path), "kind": kind, "backbone": meta["model_config"].backbone,
                    "labels": meta["labels"]}
        else:
            raise ConfigError(f"{path}: not a pre-training or fine-tuning checkpoint (kind={kind})")
    for flag, value in (("--backbone", backbone), ("--spacing", spacing_mm)):
        if value is not None:
            raise ConfigError(f"{path}: {flag} applies to --model scratch only; this model "
                              f"brings its own (backbone {info['backbone']}, spacing "
                              f"{preprocess.spacing_mm} mm)")
    return unet, preprocess, info


def _reads_through_adapter(state: dict[str, Any]) -> bool:
    """Whether a pre-training checkpoint is probed through its ``PretrainNetwork``'s levels
    adapter: a 3D network or an nnU-Net plans network (a 2D FlexibleUNet is rebuilt plainly)."""
    model = state["config"]["model"]
    return model.get("spatial_dims", 2) != 2 or bool(model.get("nnunet"))


def _pretrained_levels(path: Path) -> tuple[LevelsAdapter, PreprocessConfig, dict[str, Any]]:
    """The levels adapter of a 3D or nnU-Net pre-training's network, its preprocessing and
    provenance (``load_probe_network``)."""
    net, cfg, _ = load_pretrain_network(path)
    arch = cfg.model.nnunet
    name = cfg.model.backbone if arch is None else (
        f"nnU-Net {arch.configuration} {arch.network_class_name.rsplit('.', 1)[-1]}")
    return net.levels, cfg.preprocess, {"model": str(path), "kind": "pretrain", "backbone": name}


def _to_device(network: ProbeNetwork, device: torch.device) -> ProbeNetwork:
    """``network`` (a module or a levels adapter) with its weights on ``device``."""
    (network if isinstance(network, nn.Module) else network.unet).to(device)
    return network


def _probe_labels(dataset, dataset_path: str | Path) -> dict[str, int]:
    if not dataset.labels:
        raise ConfigError(f"{dataset_path}: the probe needs a labelled dataset with label names "
                          "(nnU-Net dataset.json or datalist)")
    labels, _ = model_labels(dataset.labels, None)  # no label map: the dataset's own ids
    return labels


def evaluate_probe(model: str, dataset_path: str | Path, labeled: float = 1, split_seed: int = 0,
                   split: str = "test", seed: int = 0, backbone: str | None = None,
                   spacing_mm: float | None = None, pixels: int = DEFAULT_PIXELS,
                   levels: LevelSet | str | Sequence[str] = DEFAULT_LEVELS,
                   device: str | torch.device = "cpu", cache_dir: str | None = None,
                   progress: bool = True, batch_size: int = 8,
                   l2: float = DEFAULT_L2,
                   batchnorm: BatchNormMode = DEFAULT_BATCHNORM) -> dict[str, Any]:
    """Fit a linear probe on K labelled cases and score it on ``split``.

    model: see :func:`load_probe_network`. The K cases are ``choose_labelled(dataset, labeled,
    split_seed)["labeled"]``, read through the slice cache at the model's preprocessing; the
    pixel draw uses ``np.random.default_rng(seed)`` (seed also initialises scratch).
    levels: :func:`parse_levels` ("all", "encoder", "decoder" or a list); batchnorm:
    "reestimate" (default) or "stored" (:func:`fit_probe`).
    Returns the ``lrcseg evaluate`` metrics dict (:meth:`SegmentationMetrics.result`) plus
    "probe": the provenance (model, kind, levels and their set name, BatchNorm mode, pixels,
    K, split seed, labelled case ids, fit seconds, L-BFGS iterations, train accuracy, ...).
    """
    levels = parse_levels(levels)
    check_batchnorm_mode(batchnorm)
    if pixels < 1:
        raise ConfigError(f"Illegal --pixels {pixels}: must be >= 1")
    device = torch.device(device)
    network, preprocess, info = load_probe_network(model, backbone, spacing_mm, seed)
    dataset = load_dataset(dataset_path)
    labels = _probe_labels(dataset, dataset_path)
    if "labels" in info:
        check_label_names(info["labels"], dataset.labels, None, Path(dataset_path))
    chosen = choose_labelled(dataset, labeled, split_seed)
    eval_cases = split_cases(dataset, split)
    num_classes = max(labels.values()) + 1
    volumes = labelled_volumes(SliceCache(preprocess, cache_dir),
                               [dataset.case(i) for i in chosen["labeled"]], dataset.labels)
    picks = choose_pixels([v.label for v in volumes], num_classes, pixels,
                          np.random.default_rng(seed))
    features = DenseFeatures(_to_device(network, device), levels)
    probe, fit_info = fit_probe(features, volumes, picks, num_classes, preprocess.context_slices,
                                l2=l2, batch_size=batch_size, progress=progress,
                                batchnorm=batchnorm)
    volumetric = features.spatial_dims == 3
    predictor = _VolumeAsSlices(probe) if volumetric else probe

    def predict(case: Case, image: Volume) -> np.ndarray:
        # 3D: every slice in one batch, i.e. the whole volume (``_VolumeAsSlices``)
        return predict_labels(predictor, image, preprocess, device=device,
                              batch_size=image.shape[2] if volumetric else batch_size,
                              num_classes=num_classes)

    result = score_cases(eval_cases, predict, labels, dataset.labels, progress=progress,
                         desc="probe evaluate")
    per_class = fit_info["pixels_per_class"]
    result["probe"] = {
        **{k: v for k, v in info.items() if k != "labels"},
        "dataset": str(Path(dataset_path).resolve()),
        "split": split,
        "spatial_dims": features.spatial_dims,
        "levels": list(features.levels),
        "level_set": level_set_name(levels),
        "channels": fit_info["channels"],
        "batchnorm": batchnorm,
        "batchnorm_layers": fit_info["batchnorm_layers"],
        "batchnorm_slices": fit_info["batchnorm_slices"],
        "pixels": int(pixels),
        "pixels_used": fit_info["pixels"],
        "pixels_per_class": {n: int(per_class[i]) for n, i in labels.items()},
        "labeled": len(chosen["labeled"]),
        "split_seed": int(split_seed),
        "seed": int(seed),
        "labelled_cases": chosen["labeled"],
        "preprocess": to_dict(preprocess),
        "l2": float(l2),
        "lbfgs_iterations": fit_info["iterations"],
        "train_loss": fit_info["loss"],
        "train_accuracy": fit_info["train_accuracy"],
        "fit_seconds": round(fit_info["fit_seconds"], 3),
    }
    return result


class OnlineProbe:
    """A probe to run during pre-training: fit on K labelled cases, score on a few others.

    Args:
        dataset: a labelled dataset (nnU-Net dataset.json or datalist).
        preprocess: the pre-training preprocessing (the network's input).
        labeled, split_seed: the K fitting cases, ``choose_labelled(dataset, labeled,
            split_seed)["labeled"]``.
        max_cases: score on up to this many of the remaining "train" candidates (sorted ids;
            never the test split).
        pixels, seed, levels, l2: the pixel budget, the seed of its draw (made once, here),
            the feature levels and the L2 penalty.
        batchnorm: "reestimate" (default; the network's own statistics are put back after
            each score) or "stored".
        cache_dir: the slice cache root (None = ``$LRCSEG_CACHE`` or ~/.cache/lrcseg).

    ``score(unet)`` (a FlexibleUNet, 2D or 3D, or a levels adapter: ``PretrainNetwork.levels``
    reaches an nnU-Net network too) fits a fresh classifier on the network's current features
    (a 3D network: on whole volumes, module docstring) and returns
    {"probe/mean_dice": float, "probe/dice/<organ>": float (NaN if the organ is absent from
    both prediction and reference of every case)}. Dice is computed on the network grid of the
    slice cache (a monitoring signal; ``lrcseg probe`` scores on the original grids). The
    network is put in eval mode and every submodule's mode is restored afterwards; its
    features are computed under ``torch.no_grad``; its buffers (the BatchNorm statistics the
    probe re-estimates) are restored to their values before the call; torch's global RNG
    state (CPU and the network's CUDA device) is left unchanged, so a run with the probe is
    bit-identical to one without.
    """

    def __init__(self, dataset: str | Path, preprocess: PreprocessConfig, labeled: float = 1,
                 split_seed: int = 0, max_cases: int = 3, pixels: int = DEFAULT_PIXELS,
                 cache_dir: str | None = None, seed: int = 0,
                 levels: LevelSet | str | Sequence[str] = DEFAULT_LEVELS, l2: float = DEFAULT_L2,
                 batch_size: int = 8, batchnorm: BatchNormMode = DEFAULT_BATCHNORM):
        if max_cases < 1:
            raise ValueError(f"Illegal max_cases {max_cases}: must be >= 1")
        self.levels = parse_levels(levels)
        self.batchnorm = check_batchnorm_mode(batchnorm)
        self.preprocess = preprocess
        self.l2 = l2
        self.batch_size = batch_size
        data = load_dataset(dataset)
        self.labels = _probe_labels(data, dataset)
        self.num_classes = max(self.labels.values()) + 1
        chosen = choose_labelled(data, labeled, split_seed)
        self.fit_ids = chosen["labeled"]
        self.score_ids = [c for c in chosen["candidates"] if c not in self.fit_ids][:max_cases]
        if not self.score_ids:
            raise ConfigError(f"{dataset}: all {len(chosen['candidates'])} training candidates "
                              "are fitting cases; none is left to score the online probe on")
        cache = SliceCache(preprocess, cache_dir)
        self.fit_volumes = labelled_volumes(cache, [data.case(i) for i in self.fit_ids],
                                            data.labels)
        self.score_volumes = labelled_volumes(cache, [data.case(i) for i in self.score_ids],
                                              data.labels)
        self.picks = choose_pixels([v.label for v in self.fit_volumes], self.num_classes, pixels,
                                   np.random.default_rng(seed))

    def score(self, unet: ProbeNetwork) -> dict[str, float]:
        network = unet if isinstance(unet, nn.Module) else unet.unet
        device = next(network.parameters()).device
        modes = {m: m.training for m in network.modules()}
        buffers = [b.clone() for b in network.buffers()]
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    torch.no_grad():
                features = DenseFeatures(unet, self.levels, freeze=False)
                probe, _ = fit_probe(features, self.fit_volumes, self.picks, self.num_classes,
                                     self.preprocess.context_slices, l2=self.l2,
                                     batch_size=self.batch_size, batchnorm=self.batchnorm)
                result = self._dice(probe)
        finally:
            for module, mode in modes.items():
                module.training = mode
            with torch.no_grad():
                for buffer, saved in zip(network.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
        return result

    def _dice(self, probe: ProbeModel) -> dict[str, float]:
        """Dice of the probe's predictions on the score cases, on the cached network grid."""
        device = probe.bias.device
        metrics = SegmentationMetrics({n: i for n, i in self.labels.items() if i != 0})
        for volume in self.score_volumes:
            pred = np.empty(volume.label.shape, dtype=np.int16)  # (Z, H, W)
            zs = list(range(volume.image.shape[0]))
            for batch, x, before in _network_inputs(probe.features, volume, zs,
                                                    self.preprocess.context_slices,
                                                    self.batch_size):
                size = pred.shape[-len(before):]  # (H, W); 3D (Z, H, W)
                logits = probe(x.to(device))[(..., *(slice(b, b + n) for b, n in
                                                     zip(before, size, strict=True)))]
                labels = logits.argmax(dim=1).cpu().numpy()
                pred[batch] = labels if probe.features.spatial_dims == 2 else labels[0]
            metrics.add(volume.case_id, pred.transpose(1, 2, 0),
                        np.asarray(volume.label).transpose(1, 2, 0), volume.spacing_mm)
        result = metrics.result()
        out = {"probe/mean_dice": result["mean_dice"]}
        for organ in result["organs"]:
            dice = result["mean"][organ]["dice"]
            out[f"probe/dice/{organ}"] = float("nan") if dice is None else dice
        return out
