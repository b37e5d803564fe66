"""The pre-training network: a FlexibleUNet plus a global and a local projection head.

One forward pass gives both outputs the losses need (LRC_METHOD.md section 4):

- ``global``: GAP(bottleneck) -> MLP -> L2-normalise, a float32 tensor (B, P).
- ``local``: a list with one map per level of ``cfg.local_levels``: decoder block l (stride
  s_l = 16 / 2**l; 1/2 by default) -> its own 1x1 conv head -> L2-normalise per pixel, a
  float32 tensor (B, P, H/s_l, W/s_l).

The decoder is run only up to the finest local level: finer blocks and the segmentation head
feed nothing during pre-training, so running them would cost time and leave parameters without
gradients (a problem for DDP). They are kept in the state dict and exported with their
initial weights; ``local_levels = (2, 3, 4)`` trains the whole decoder. ``backbone_state_dict`` gives the encoder + decoder weights under the exact
keys of a plain ``FlexibleUNet``.
"""

from __future__ import annotations

from torch import Tensor, nn

from lrcseg.config import ModelConfig
from lrcseg.models.heads import GlobalProjectionHead, LocalProjectionHead
from lrcseg.models.unet import SEGMENTATION_HEAD_PREFIX, build_unet, encoder_channels

# Pre-training never uses the segmentation head; it must still exist for FlexibleUNet's keys.
_PRETRAIN_OUT_CHANNELS = 2


class PretrainNetwork(nn.Module):
    """U-Net with projection heads for global (MoCo) and local (LRC) contrastive losses.

    Args:
        cfg: backbone, decoder widths, local levels and projection width P.
        in_channels: C, input channels (windows x context slices).

    ``forward(x)`` with x a float tensor (B, C, H, W), H and W multiples of 32, returns
    ``{"global": (B, P), "local": [(B, P, H/s_l, W/s_l) for l in cfg.local_levels]}``, all
    float32 and unit-norm; the decoder runs only up to the finest local level (finer blocks
    feed nothing in pre-training), unless ``full_decoder=True``.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.unet = build_unet(cfg, in_channels, _PRETRAIN_OUT_CHANNELS)
        bottleneck = encoder_channels(cfg.backbone)[-1]
        self.global_head = GlobalProjectionHead(bottleneck, bottleneck, cfg.proj_dim)
        self.local_heads = nn.ModuleList(
            LocalProjectionHead(cfg.decoder_channels[level], cfg.proj_dim) for level in cfg.local_levels)

    @property
    def local_strides(self) -> tuple[int, ...]:
        return self.cfg.local_strides

    def forward(self, x: Tensor, full_decoder: bool = False) -> dict[str, Tensor]:
        """Decoder blocks 0..max(local_levels) (all five with ``full_decoder``, which adds
        "decoder": (B, C_0, H, W) full-resolution features for a segmentation head), with the
        same skips as MONAI's ``UNetDecoder.forward``."""
        features = self.unet.encoder(x)
        skips = features[:-1][::-1]
        y, out = features[-1], {"global": self.global_head(features[-1])}
        last = len(self.unet.decoder.blocks) - 1 if full_decoder else max(self.cfg.local_levels)
        by_level = {}
        for i in range(last + 1):
            y = self.unet.decoder.blocks[i](y, skips[i] if i < self.unet.skip_connect else None)
            by_level[i] = y
        out["local"] = [head(by_level[level])
                        for level, head in zip(self.cfg.local_levels, self.local_heads, strict=True)]
        if full_decoder:
            out["decoder"] = y
        return out

    def encode_global(self, x: Tensor) -> Tensor:
        """Encoder + global head only (MoCo keys): (B, C, H, W) -> (B, P) unit vectors."""
        return self.global_head(self.unet.encoder(x)[-1])

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """Encoder + decoder weights keyed as in ``FlexibleUNet`` (no segmentation head)."""
        return {
            k: v for k, v in self.unet.state_dict().items() if not k.startswith(SEGMENTATION_HEAD_PREFIX)
        }
