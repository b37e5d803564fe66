"""Projection heads used only during pre-training (dropped before fine-tuning).

- ``GlobalProjectionHead``: MoCo v2's MLP on the global-average-pooled bottleneck,
  Linear(C, C_h) -> ReLU -> Linear(C_h, P), L2-normalised (He et al. / Chen et al. 2020), or
  left unnormalised (``normalize=False``) for a method that needs the raw projection.
- ``LocalProjectionHead``: the per-pixel analogue on a decoder feature map,
  Conv1x1(C, C) -> ReLU -> Conv1x1(C, P), L2-normalised over channels at every pixel, or left
  unnormalised (``normalize=False``) for a loss that normalises only the pixels it samples.

Both return float32 even under autocast, so the losses compute in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"Illegal {name} {value}: must be a positive integer")


class GlobalProjectionHead(nn.Module):
    """z = normalize(W2 · relu(W1 · GAP(f) + b1) + b2).

    Args:
        in_dim: C, channels of the bottleneck feature map.
        hidden_dim: C_h, hidden width (MoCo v2 uses C_h = C).
        out_dim: P, projection width (128 by default in the configs).
        normalize: L2-normalise every row (True); False returns W2 · relu(...) + b2 as it is.

    Input: a float tensor (B, C, h, w) (the deepest encoder feature map; averaged over h, w)
    or an already pooled (B, C). Output: a float32 tensor (B, P), unit L2 norm per row when
    ``normalize``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, normalize: bool = True):
        super().__init__()
        _check_positive(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        self.normalize = normalize
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim == 4:
            features = features.mean(dim=(2, 3))
        if features.ndim != 2:
            raise ValueError(f"GlobalProjectionHead expects (B, C, h, w) or (B, C), got {tuple(features.shape)}")
        z = self.mlp(features).float()
        return F.normalize(z, dim=1) if self.normalize else z


class LocalProjectionHead(nn.Module):
    """z(u) = normalize(W2 * relu(W1 * f(u) + b1) + b2) at every pixel u (1x1 convolutions).

    Args:
        in_channels: C, channels of the decoder feature map (64 at 1/4 resolution by default).
        out_dim: P, projection width.
        normalize: L2-normalise every pixel (True); False returns W2 * relu(...) + b2 as it
            is, for ``LRCLoss``, which normalises the B x N x P pixels it samples itself (the
            same loss and gradients, without a pass over the whole map).

    Input: (B, C, h, w). Output: a float32 tensor (B, P, h, w), unit L2 norm over P per pixel
    when ``normalize``.
    """

    def __init__(self, in_channels: int, out_dim: int, normalize: bool = True):
        super().__init__()
        _check_positive(in_channels=in_channels, out_dim=out_dim)
        self.normalize = normalize
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_dim, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 4:
            raise ValueError(f"LocalProjectionHead expects (B, C, h, w), got {tuple(features.shape)}")
        z = self.net(features).float()
        return F.normalize(z, dim=1) if self.normalize else z

