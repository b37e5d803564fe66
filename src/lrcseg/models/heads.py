"""Projection heads used only during pre-training (dropped before fine-tuning).

- ``GlobalProjectionHead``: MoCo v2's MLP on the global-average-pooled bottleneck,
  Linear(C, C_h) -> ReLU -> Linear(C_h, P), L2-normalised (He et al. / Chen et al. 2020), or
  left unnormalised (``normalize=False``) for a method that needs the raw projection.
- ``LocalProjectionHead``: the per-pixel analogue on a decoder feature map,
  Conv1x1(C, C) -> ReLU -> Conv1x1(C, P), L2-normalised over channels at every pixel, or left
  unnormalised (``normalize=False``) for a loss that normalises only the pixels it samples.

Both take ``spatial_dims`` (``ModelConfig.spatial_dims``): feature maps are (B, C, h, w) for 2
and (B, C, d, h, w) for 3. The convolutions come from MONAI's layer factory keyed by it
(``Conv[Conv.CONV, spatial_dims]``: ``nn.Conv2d`` / ``nn.Conv3d``), the pooling is a mean over
every spatial axis. Both return float32 even under autocast, so the losses compute in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import Tensor, nn


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"Illegal {name} {value}: must be a positive integer")


def check_spatial_dims(spatial_dims: int) -> int:
    """``spatial_dims`` if it is 2 or 3; ValueError otherwise."""
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"Illegal spatial_dims {spatial_dims!r}: 2 (slices) or 3 (volumes)")
    return int(spatial_dims)


def spatial_axes(spatial_dims: int) -> tuple[int, ...]:
    """The spatial axes of a (B, C, *spatial) tensor: (2, 3) in 2D, (2, 3, 4) in 3D."""
    return tuple(range(2, 2 + spatial_dims))


def _shape_name(spatial_dims: int) -> str:
    return "(B, C, h, w)" if spatial_dims == 2 else "(B, C, d, h, w)"


class GlobalProjectionHead(nn.Module):
    """z = normalize(W2 · relu(W1 · GAP(f) + b1) + b2).

    Args:
        in_dim: C, channels of the bottleneck feature map.
        hidden_dim: C_h, hidden width (MoCo v2 uses C_h = C).
        out_dim: P, projection width (128 by default in the configs).
        normalize: L2-normalise every row (True); False returns W2 · relu(...) + b2 as it is.
        spatial_dims: 2 or 3, the spatial axes of the feature map it pools.

    Input: a float tensor (B, C, h, w) (3D: (B, C, d, h, w); the deepest encoder feature map,
    averaged over its spatial axes) or an already pooled (B, C). Output: a float32 tensor
    (B, P), unit L2 norm per row when ``normalize``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, normalize: bool = True,
                 spatial_dims: int = 2):
        super().__init__()
        _check_positive(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.normalize = normalize
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim == 2 + self.spatial_dims:
            features = features.mean(dim=spatial_axes(self.spatial_dims))
        if features.ndim != 2:
            raise ValueError(f"GlobalProjectionHead expects {_shape_name(self.spatial_dims)} or "
                             f"(B, C), got {tuple(features.shape)}")
        z = self.mlp(features).float()
        return F.normalize(z, dim=1) if self.normalize else z


class LocalProjectionHead(nn.Module):
    """z(u) = normalize(W2 * relu(W1 * f(u) + b1) + b2) at every pixel (voxel) u (1x1
    convolutions, 1x1x1 in 3D).

    Args:
        in_channels: C, channels of the decoder feature map (64 at 1/4 resolution by default).
        out_dim: P, projection width.
        normalize: L2-normalise every pixel (True); False returns W2 * relu(...) + b2 as it
            is, for ``LRCLoss``, which normalises the B x N x P pixels it samples itself (the
            same loss and gradients, without a pass over the whole map).
        spatial_dims: 2 (``nn.Conv2d``) or 3 (``nn.Conv3d``).

    Input: (B, C, h, w) (3D: (B, C, d, h, w)). Output: a float32 tensor (B, P, h, w) (3D:
    (B, P, d, h, w)), unit L2 norm over P per pixel when ``normalize``.
    """

    def __init__(self, in_channels: int, out_dim: int, normalize: bool = True,
                 spatial_dims: int = 2):
        super().__init__()
        _check_positive(in_channels=in_channels, out_dim=out_dim)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.normalize = normalize
        conv = Conv[Conv.CONV, self.spatial_dims]
        self.net = nn.Sequential(
            conv(in_channels, in_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            conv(in_channels, out_dim, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 + self.spatial_dims:
            raise ValueError(f"LocalProjectionHead expects {_shape_name(self.spatial_dims)}, got "
                             f"{tuple(features.shape)}")
        z = self.net(features).float()
        return F.normalize(z, dim=1) if self.normalize else z

