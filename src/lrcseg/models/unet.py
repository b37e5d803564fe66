"""The segmentation U-Net: MONAI ``FlexibleUNet`` with a ResNet encoder, 2D or 3D as
``ModelConfig.spatial_dims`` says.

The same keyword arguments build the network for pre-training, fine-tuning and the exported
weights' JSON, so the three cannot drift apart: always go through ``flexible_unet_kwargs``.

Layout of a ``FlexibleUNet`` built here, for an input of shape (B, C, H, W) (3D: (B, C, D, H, W)):

- ``encoder(x)`` returns 5 feature maps at strides 2, 4, 8, 16, 32; their channels are
  ``encoder_channels(backbone)`` (the last one is the bottleneck: 512 for ResNet-10/18/34,
  2048 for ResNet-50/101).
- ``decoder.blocks[i]`` outputs ``decoder_channels[i]`` channels at stride ``16 / 2**i``
  (0 -> 1/16, 1 -> 1/8, 2 -> 1/4, 3 -> 1/2, 4 -> 1/1).
- ``segmentation_head`` maps the full-resolution decoder output to ``out_channels`` logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import Tensor, nn

from lrcseg.config import ModelConfig

SEGMENTATION_HEAD_PREFIX = "segmentation_head."


def flexible_unet_kwargs(cfg: ModelConfig, in_channels: int, out_channels: int) -> dict[str, Any]:
    """Keyword arguments of ``FlexibleUNet`` for this model configuration (JSON-serialisable),
    ``spatial_dims`` from ``cfg`` (2: slices, 3: volume patches; MONAI's ResNet encoders exist
    in both).

    out_channels: number of segmentation classes (background included). Pre-training drops
        the segmentation head, so any small positive number will do there.
    """
    if in_channels < 1:
        raise ValueError(f"Illegal in_channels {in_channels}: must be >= 1")
    if out_channels < 1:
        raise ValueError(f"Illegal out_channels {out_channels}: must be >= 1")
    return {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "backbone": cfg.backbone,
        "pretrained": False,
        "decoder_channels": [int(c) for c in cfg.decoder_channels],
        "spatial_dims": cfg.spatial_dims,
    }


def build_unet(cfg: ModelConfig, in_channels: int, out_channels: int) -> FlexibleUNet:
    """A freshly initialised ``FlexibleUNet`` (no ImageNet/MedicalNet weights) with
    ``cfg.spatial_dims`` spatial axes."""
    return FlexibleUNet(**flexible_unet_kwargs(cfg, in_channels, out_channels))


def encoder_channels(backbone: str) -> tuple[int, ...]:
    """Channels of the 5 encoder feature maps (strides 2..32) for a MONAI backbone name."""
    if backbone not in FLEXUNET_BACKBONE.register_dict:
        raise ValueError(f"Unknown FlexibleUNet backbone {backbone!r}")
    return tuple(int(c) for c in FLEXUNET_BACKBONE.register_dict[backbone]["feature_channel"])


def decoder_outputs(unet: nn.Module, features: Sequence[Tensor], last: int) -> Iterator[Tensor]:
    """The outputs of a ``FlexibleUNet``'s decoder blocks 0..last, coarsest first.

    features: the 5 encoder maps ``unet.encoder(x)`` (strides 2 .. 32). Block i gets the
    previous output and, while ``i < unet.skip_connect``, the encoder map of the same stride,
    as MONAI's ``UNetDecoder.forward`` does; it yields (B, decoder_channels[i], H / s, W / s)
    (3D: (B, decoder_channels[i], D / s, H / s, W / s)) at stride s = 16 / 2**i. The one walk of the decoder: the pre-training network and the
    probe run the decoder only as deep as they need.
    """
    skips = list(features[:-1])[::-1]
    y = features[-1]
    for i in range(last + 1):
        y = unet.decoder.blocks[i](y, skips[i] if i < unet.skip_connect else None)
        yield y
