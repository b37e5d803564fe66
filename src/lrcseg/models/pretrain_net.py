"""The pre-training network: any U-Net plus a global and a local projection head, 2D or 3D
as ``ModelConfig.spatial_dims`` says (the U-Net, the heads and the input check follow it).

The U-Net is reached through a small *levels* adapter that yields its encoder feature maps
and its decoder outputs by level, so the heads attach by level and not by one library's
internals. Two adapters exist: MONAI's FlexibleUNet (``ModelConfig.backbone``) and nnU-Net's
plans network (``ModelConfig.nnunet``: ``PlainConvUNet`` / ``ResidualEncoderUNet``).

Level l is the decoder output 4 - l stages above full resolution: 0 = 1/16, 1 = 1/8,
2 = 1/4, 3 = 1/2, 4 = 1/1 (with 2 x 2 poolings, 2 x 2 x 2 in 3D; an nnU-Net network with more
stages has coarser decoder stages before level 0, which run but are not levels).

One forward pass gives both outputs the losses need (LRC_METHOD.md section 4):

- ``global``: GAP(bottleneck) -> MLP -> L2-normalise (unless ``normalize_global=False``), a
  float32 tensor (B, P).
- ``local``: a list with one map per level of ``cfg.local_levels``: decoder level l -> its own
  1x1 conv head, a float32 tensor (B, P, H_l, W_l) (3D: (B, P, D_l, H_l, W_l)), *not*
  normalised: the LRC loss L2-normalises only the pixels it samples (``LRCLoss``), not the
  whole map.

Besides encode / decode, an adapter says what a dense reader of its features (the linear
probe, ``evaluate/probe.py``) needs: ``spatial_dims``; ``divisor``, the total stride per
spatial axis (every input side a multiple of it); ``encoder_strides`` and ``decoder_strides``,
the in-plane stride of each encoder map and of each decoder level (what the probe's level
names encN / decN say); and ``modules(last)``, the modules ``encode`` and ``decode(..., last)``
run (``last = -1``: the encoder only).

The decoder is run only up to the finest local level: finer blocks and the segmentation head
feed nothing during pre-training, so running them would cost time and leave parameters without
gradients (a problem for DDP). They are kept in the state dict and exported with their
initial weights; ``local_levels = (2, 3, 4)`` trains the whole decoder. ``backbone_state_dict``
gives the U-Net's weights under the exact keys of the plain network.
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets import FlexibleUNet
from torch import Tensor, nn

from lrcseg.config import ModelConfig
from lrcseg.models.heads import GlobalProjectionHead, LocalProjectionHead
from lrcseg.models.unet import (
    SEGMENTATION_HEAD_PREFIX,
    build_unet,
    decoder_outputs,
    encoder_channels,
)

# Pre-training never uses the segmentation head; it must still exist for FlexibleUNet's keys.
_PRETRAIN_OUT_CHANNELS = 2
#: levels 0..4 = decoder outputs at 1/16 .. 1/1
NUM_LEVELS = 5


class FlexibleUNetLevels:
    """Levels of a MONAI ``FlexibleUNet``: ``decoder.blocks[l]`` is level l (stride 16 / 2**l)."""

    #: every axis is halved five times
    TOTAL_STRIDE = 32

    def __init__(self, unet: nn.Module, cfg: ModelConfig):
        self.unet = unet
        self.bottleneck_channels = encoder_channels(cfg.backbone)[-1]
        self.channels = tuple(cfg.decoder_channels)
        self.spatial_dims = cfg.spatial_dims
        self.divisor = (self.TOTAL_STRIDE,) * cfg.spatial_dims
        self.encoder_strides = (2, 4, 8, 16, 32)
        self.decoder_strides = {level: 16 // 2 ** level for level in range(NUM_LEVELS)}

    @classmethod
    def of(cls, unet: FlexibleUNet) -> FlexibleUNetLevels:
        """The adapter of a ``FlexibleUNet`` built elsewhere (an export, a fine-tuned model):
        its backbone, decoder widths and ``spatial_dims`` read from the network itself."""
        widths = tuple(int(block.convs.conv_1.conv.out_channels) for block in unet.decoder.blocks)
        return cls(unet, ModelConfig(backbone=unet.backbone, decoder_channels=widths,
                                     spatial_dims=unet.spatial_dims))

    def modules(self, last: int) -> list[nn.Module]:
        """The encoder and decoder blocks 0..last, the modules ``encode`` and ``decode`` run."""
        return [self.unet.encoder, *self.unet.decoder.blocks[:last + 1]]

    def encode(self, x: Tensor) -> list[Tensor]:
        """(B, C, H, W) (3D: (B, C, D, H, W)) -> the 5 encoder maps, strides 2 .. 32 (the last
        is the bottleneck)."""
        return self.unet.encoder(x)

    def decode(self, features: list[Tensor], last: int) -> dict[int, Tensor]:
        """Decoder levels 0..last from the encoder maps, with MONAI ``UNetDecoder``'s skips."""
        return dict(enumerate(decoder_outputs(self.unet, features, last)))

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """Encoder + decoder weights keyed as in ``FlexibleUNet`` (no segmentation head)."""
        return {k: v for k, v in self.unet.state_dict().items()
                if not k.startswith(SEGMENTATION_HEAD_PREFIX)}


class NnUNetLevels:
    """Levels of an nnU-Net ``PlainConvUNet`` / ``ResidualEncoderUNet`` (dynamic-network-
    architectures): ``decoder.stages[s]`` is level ``s - (len(stages) - 5)``; the input goes
    through ``NnUNetInput`` (lrcseg's window channel -> CTNormalization) first."""

    def __init__(self, unet: nn.Module, cfg: ModelConfig, input_channel: int):
        from lrcseg.nnunet.network import NnUNetInput

        self.unet = unet
        self.input = NnUNetInput(cfg.nnunet, input_channel)
        features = [int(f) for f in cfg.nnunet.arch_kwargs["features_per_stage"]]
        self.bottleneck_channels = features[-1]
        stages = len(unet.decoder.stages)
        self.first = stages - NUM_LEVELS  # decoder stage of level 0 (< 0: coarse levels missing)
        # decoder stage s outputs the channels of encoder stage -(s + 2)
        self.channels = tuple(features[-(self.first + level + 2)] if self.first + level >= 0 else 0
                              for level in range(NUM_LEVELS))
        self.spatial_dims = cfg.spatial_dims
        strides = [[int(v) for v in (s if isinstance(s, (list, tuple)) else [s] * cfg.spatial_dims)]
                   for s in cfg.nnunet.arch_kwargs["strides"]]
        # the cumulative stride of encoder stage k along each axis (nnU-Net's (D,) H, W order)
        cumulative = [tuple(math.prod(axis) for axis in zip(*strides[:k + 1], strict=True))
                      for k in range(len(strides))]
        self.divisor = cumulative[-1]
        self.encoder_strides = tuple(c[-1] for c in cumulative)
        # level l has the resolution of encoder stage 4 - l (the skip it concatenates)
        self.decoder_strides = {level: self.encoder_strides[NUM_LEVELS - 1 - level]
                                for level in range(NUM_LEVELS) if self.first + level >= 0}

    def encode(self, x: Tensor) -> list[Tensor]:
        return self.unet.encoder(self.input(x))

    def modules(self, last: int) -> list[nn.Module]:
        """The encoder and the decoder's transposed convolutions and stages up to level last."""
        decoder, stop = self.unet.decoder, self.first + last + 1 if last >= 0 else 0
        return [self.unet.encoder, *decoder.transpconvs[:stop], *decoder.stages[:stop]]

    def decode(self, features: list[Tensor], last: int) -> dict[int, Tensor]:
        """nnU-Net ``UNetDecoder``'s stages (transposed conv, concatenated skip, convs) up to
        level ``last``, without the segmentation layers."""
        decoder, y, out = self.unet.decoder, features[-1], {}
        for s in range(self.first + last + 1):
            y = decoder.stages[s](torch.cat((decoder.transpconvs[s](y), features[-(s + 2)]), 1))
            if s >= self.first:
                out[s - self.first] = y
        return out

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """Every weight of the plans' network, segmentation layers included (nnU-Net's loader
        skips them, but its network has them)."""
        return dict(self.unet.state_dict())


class PretrainNetwork(nn.Module):
    """U-Net with projection heads for global (MoCo) and local (LRC) contrastive losses.

    Args:
        cfg: the U-Net (FlexibleUNet backbone, or ``cfg.nnunet``), local levels, width P.
        in_channels: C, input channels (windows x context slices). An nnU-Net network takes
            the second window (the plans' CT clip range) of a single slice: C must be 2.
        normalize_global: L2-normalise the global projection (the global method's
            ``normalized_global``); it holds no weights, so checkpoints load either way.

    ``forward(x)`` with x a float tensor (B, C, H, W) (``cfg.spatial_dims`` 3: (B, C, D, H, W)),
    every spatial side a multiple of the network's total stride, returns ``{"global": (B, P),
    "local": [(B, P, H_l, W_l) (3D: (B, P, D_l, H_l, W_l)) for l in cfg.local_levels]}``, all
    float32 (global unit-norm unless ``normalize_global=False``, local unnormalised); the
    decoder runs only up to the finest local level (finer blocks feed nothing in
    pre-training), unless ``full_decoder=True``.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, normalize_global: bool = True):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        if cfg.nnunet is None:
            self.unet = build_unet(cfg, in_channels, _PRETRAIN_OUT_CHANNELS)
            self.levels = FlexibleUNetLevels(self.unet, cfg)
        else:
            from lrcseg.nnunet.network import build_nnunet

            if in_channels != 2:
                raise ValueError(f"an nnU-Net network takes 2 cached channels (soft-tissue window, "
                                 f"CT clip range) of one slice, got in_channels={in_channels}")
            self.unet = build_nnunet(cfg.nnunet)
            self.levels = NnUNetLevels(self.unet, cfg, input_channel=1)
        missing = [level for level in cfg.local_levels if self.levels.channels[level] == 0]
        if missing:
            raise ValueError(f"local level(s) {missing} do not exist in this network (too few "
                             "stages); use finer levels (3 = 1/2, 4 = 1/1)")
        bottleneck = self.levels.bottleneck_channels
        self.global_head = GlobalProjectionHead(bottleneck, bottleneck, cfg.proj_dim,
                                                normalize=normalize_global,
                                                spatial_dims=cfg.spatial_dims)
        self.local_heads = nn.ModuleList(
            LocalProjectionHead(self.levels.channels[level], cfg.proj_dim, normalize=False,
                                spatial_dims=cfg.spatial_dims)
            for level in cfg.local_levels)

    @property
    def full_resolution_channels(self) -> int:
        """Channels of the full-resolution decoder output (level 4)."""
        return self.levels.channels[NUM_LEVELS - 1]

    def _encode(self, x: Tensor) -> list[Tensor]:
        """The encoder maps of x, after checking it has ``cfg.spatial_dims`` spatial axes (a
        2D batch given to a 3D network, or the reverse, would otherwise fail deep inside a
        convolution)."""
        if x.ndim != 2 + self.cfg.spatial_dims:
            shape = "(B, C, H, W)" if self.cfg.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(f"this {self.cfg.spatial_dims}D network takes {shape} input, got "
                             f"{tuple(x.shape)}")
        return self.levels.encode(x)

    def forward(self, x: Tensor, full_decoder: bool = False) -> dict[str, Tensor]:
        """Decoder levels 0..max(local_levels) (all five with ``full_decoder``, which adds
        "decoder": (B, C_4, H, W), 3D (B, C_4, D, H, W), full-resolution features for a
        segmentation head)."""
        features = self._encode(x)
        out = {"global": self.global_head(features[-1])}
        last = NUM_LEVELS - 1 if full_decoder else max(self.cfg.local_levels)
        by_level = self.levels.decode(features, last)
        out["local"] = [head(by_level[level])
                        for level, head in zip(self.cfg.local_levels, self.local_heads, strict=True)]
        if full_decoder:
            out["decoder"] = by_level[last]
        return out

    def encode_global(self, x: Tensor) -> Tensor:
        """Encoder + global head only (MoCo keys): (B, C, H, W) (3D: (B, C, D, H, W)) -> (B, P),
        unit vectors unless ``normalize_global=False``."""
        return self.global_head(self._encode(x)[-1])

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The U-Net's weights keyed as in the plain network (FlexibleUNet: no segmentation
        head; nnU-Net: every key)."""
        return self.levels.backbone_state_dict()
