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

**Levels** (``DenseFeatures``). ``encN``: encoder map at stride N (N in 2, 4, 8, 16, 32),
``decN``: output of the decoder block at stride N (N in 16, 8, 4, 2, 1). Named sets
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
bilinearly (``align_corners=False``) to the input size; at the chosen pixels that equals
``grid_sample`` at the pixel centres, so the full-resolution stack is never built. With x the
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
from lrcseg.evaluate.predict import pad_amounts, predict_labels
from lrcseg.evaluate.run import check_label_names, score_cases
from lrcseg.models.export import load_exported
from lrcseg.models.load import (
    load_backbone,
    load_checkpoint,
    load_finetuned,
    pretrained_unet_weights,
    resolve_checkpoint,
)
from lrcseg.models.unet import build_unet, decoder_outputs

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


class DenseFeatures(nn.Module):
    """A frozen U-Net as a dense feature extractor: the maps of the chosen levels.

    Args:
        unet: a 2D ``FlexibleUNet`` (its segmentation head is not used).
        levels: level names (:func:`parse_levels`), default :data:`DEFAULT_LEVELS`.
        freeze: also set ``requires_grad=False`` on the U-Net's parameters. Pass False for a
            network that is still being trained (the online probe); the caller then restores
            its mode.

    The U-Net is put in eval mode (BatchNorm uses its running statistics) and stays there
    whatever ``train()`` is called with (:func:`reestimate_batchnorm` makes its BatchNorm
    layers use batch statistics through forward hooks). ``forward(x)`` with x a float tensor
    (B, C, H, W), H and W multiples of 32, returns one tensor per level, in ``self.levels``
    order, of shape (B, C_l, H / s_l, W / s_l) for the level's stride s_l; no gradients flow
    into the U-Net. The whole encoder runs; the decoder only as deep as the finest decoder
    level asked for (``path()``: the modules a forward pass runs).
    """

    def __init__(self, unet: FlexibleUNet, levels: str | Sequence[str] = DEFAULT_LEVELS,
                 freeze: bool = True):
        super().__init__()
        if not isinstance(unet, FlexibleUNet):
            raise ValueError(f"DenseFeatures needs a FlexibleUNet, got {type(unet).__name__}")
        self.levels = parse_levels(levels)
        self.unet = unet
        if freeze:
            unet.requires_grad_(False)
        self.train(False)
        blocks = [DECODER_STRIDES.index(int(n[3:])) for n in self.levels if n.startswith("dec")]
        self._last_block = max(blocks, default=-1)

    def train(self, mode: bool = True) -> DenseFeatures:
        super().train(mode)
        self.unet.eval()
        return self

    def path(self) -> list[nn.Module]:
        """The U-Net's modules that ``forward`` runs: the encoder and the decoder blocks down to
        the finest decoder level asked for."""
        return [self.unet.encoder, *self.unet.decoder.blocks[:self._last_block + 1]]

    def forward(self, x: Tensor) -> list[Tensor]:
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            features = self.unet.encoder(x)
            for stride, f in zip(ENCODER_STRIDES, features, strict=True):
                out[f"enc{stride}"] = f
            for i, y in enumerate(decoder_outputs(self.unet, features, self._last_block)):
                out[f"dec{DECODER_STRIDES[i]}"] = y
        return [out[name] for name in self.levels]


class ProbeModel(nn.Module):
    """Frozen features + the fitted per-pixel linear classifier, a segmentation network.

    Args:
        features: the :class:`DenseFeatures` the classifier was fitted on.
        channels: C_l of each level (D = sum).
        weight: (K, D) on standardised features; bias: (K,); mean, std: (D,) the standardisation.

    ``forward(x)``: (B, C, H, W) -> (B, K, H, W) logits (float32 outside autocast), H and W
    multiples of 32, computed per level as
    ``upsample(W'_l f_l)`` plus ``b'`` (module docstring), equal to upsampling and
    concatenating all levels first, then standardising and applying (W, b).
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
        for i, w in enumerate(torch.split(folded, list(channels), dim=1)):
            self.register_buffer(f"weight_{i}", w.float()[:, :, None, None].contiguous())
        self.register_buffer("bias", offset.float())

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        logits = self.bias[None, :, None, None].expand(x.shape[0], -1, *size)
        for i, f in enumerate(self.features(x)):
            y = F.conv2d(f.float(), getattr(self, f"weight_{i}"))
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            logits = logits + y
        return logits


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
                   batch_size: int) -> Iterator[tuple[list[int], Tensor, tuple[int, int]]]:
    """Batches ``(zs, x, (top, left))`` of whole slices, x (B, C, H_p, W_p) float32 padded with
    zeros to multiples of 32 as ``lrcseg.evaluate.predict`` pads them."""
    _, _, h, w = volume.image.shape
    (top, bottom), (left, right) = pad_amounts(h), pad_amounts(w)
    for start in range(0, len(zs), batch_size):
        batch = list(zs[start:start + batch_size])
        x = np.stack([stack_context(volume.image, z, context_slices) for z in batch])
        x = torch.from_numpy(x.astype(np.float32))
        yield batch, F.pad(x, (left, right, top, bottom), value=0.0), (top, left)


def _pick_slices(volume: CachedVolume, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, in-plane flat index) of flat indices into the volume's (Z, H, W)."""
    return np.divmod(flat, int(np.prod(volume.image.shape[2:])))


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
    the slices holding ``picks`` (module docstring, "BatchNorm").

    Each layer's running mean and variance are reset, then set to the cumulative average
    over batches of the batch statistics (unbiased variance) seen by forward passes in which
    every one of these layers normalises by its batch's statistics: what train mode with
    ``momentum=None`` computes. It is done by a forward hook, so no module changes mode or
    momentum (a ``SyncBatchNorm`` in train mode would synchronise across ranks, and only one
    rank probes). No gradients; weights untouched; deterministic for given inputs. The slices
    run in the order ``gather_features`` runs them, padded alike. Returns {"layers", "slices"}.
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
            for batch, x, _ in _padded_slices(volume, zs, context_slices, batch_size):
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

    Only slices holding chosen pixels are run; each level is sampled with ``grid_sample`` at
    the pixel centres (border clamped), equal to bilinear upsampling with
    ``align_corners=False`` followed by indexing.
    """
    device = next(features.unet.parameters()).device
    rows: list[list[Tensor]] = [[] for _ in features.levels]
    slices = [_pick_slices(v, flat) for v, flat in zip(volumes, picks, strict=True)]
    bar = tqdm(total=sum(len(np.unique(z_of)) for z_of, _ in slices), desc="probe features",
               unit="slice", disable=not progress)
    for volume, (z_of, yx) in zip(volumes, slices, strict=True):
        w = volume.image.shape[3]
        for batch, x, (top, left) in _padded_slices(volume, np.unique(z_of), context_slices,
                                                    batch_size):
            maps = features(x.to(device))
            hp, wp = x.shape[-2:]
            for b, z in enumerate(batch):
                row, col = np.divmod(yx[z_of == z], w)
                grid = torch.from_numpy(np.stack([(2 * (col + left) + 1) / wp - 1,
                                                  (2 * (row + top) + 1) / hp - 1], axis=-1))
                grid = grid.float().to(device)[None, None]  # (1, 1, n, 2) as (x, y)
                for level, f in enumerate(maps):
                    sampled = F.grid_sample(f[b:b + 1].float(), grid, mode="bilinear",
                                            padding_mode="border", align_corners=False)
                    rows[level].append(sampled[0, :, 0].T.cpu())
            bar.update(len(batch))
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
                       seed: int = 0) -> tuple[FlexibleUNet, PreprocessConfig, dict[str, Any]]:
    """The U-Net to probe, its preprocessing and its provenance.

    model: "scratch" (a random U-Net of ``backbone``, default resnet18, initialised under
    ``torch.manual_seed(seed)`` without touching the global RNG; preprocessing
    ``PreprocessConfig(spacing_mm=spacing_mm)``), a pre-training run folder or checkpoint,
    a fine-tuning run folder or checkpoint, or an exported ``.pt`` with its ``.json``.
    backbone and spacing_mm apply to scratch only (ConfigError otherwise). Returns
    (U-Net on the CPU, preprocessing, {"model", "kind", "backbone"[, "labels"]}).
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
        if kind == "pretrain":  # the U-Net inside PretrainNetwork, without the heads
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
    unet, preprocess, info = load_probe_network(model, backbone, spacing_mm, seed)
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
    features = DenseFeatures(unet.to(device), levels)
    probe, fit_info = fit_probe(features, volumes, picks, num_classes, preprocess.context_slices,
                                l2=l2, batch_size=batch_size, progress=progress,
                                batchnorm=batchnorm)

    def predict(case: Case, image: Volume) -> np.ndarray:
        return predict_labels(probe, image, preprocess, device=device, batch_size=batch_size,
                              num_classes=num_classes)

    result = score_cases(eval_cases, predict, labels, dataset.labels, progress=progress,
                         desc="probe evaluate")
    per_class = fit_info["pixels_per_class"]
    result["probe"] = {
        **{k: v for k, v in info.items() if k != "labels"},
        "dataset": str(Path(dataset_path).resolve()),
        "split": split,
        "levels": list(levels),
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

    ``score(unet)`` fits a fresh classifier on the network's current features and returns
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

    def score(self, unet: FlexibleUNet) -> dict[str, float]:
        device = next(unet.parameters()).device
        modes = {m: m.training for m in unet.modules()}
        buffers = [b.clone() for b in unet.buffers()]
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
                for buffer, saved in zip(unet.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
        return result

    def _dice(self, probe: ProbeModel) -> dict[str, float]:
        """Dice of the probe's predictions on the score cases, on the cached network grid."""
        device = probe.bias.device
        metrics = SegmentationMetrics({n: i for n, i in self.labels.items() if i != 0})
        for volume in self.score_volumes:
            _, _, h, w = volume.image.shape
            pred = np.empty(volume.label.shape, dtype=np.int16)  # (Z, H, W)
            zs = list(range(volume.image.shape[0]))
            for batch, x, (top, left) in _padded_slices(volume, zs, self.preprocess.context_slices,
                                                        self.batch_size):
                logits = probe(x.to(device))[:, :, top:top + h, left:left + w]
                pred[batch] = logits.argmax(dim=1).cpu().numpy()
            metrics.add(volume.case_id, pred.transpose(1, 2, 0),
                        np.asarray(volume.label).transpose(1, 2, 0), volume.spacing_mm)
        result = metrics.result()
        out = {"probe/mean_dice": result["mean_dice"]}
        for organ in result["organs"]:
            dice = result["mean"][organ]["dice"]
            out[f"probe/dice/{organ}"] = float("nan") if dice is None else dice
        return out
