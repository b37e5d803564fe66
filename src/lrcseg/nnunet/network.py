"""nnU-Net's own network from an ``NnUNetNetworkConfig`` (``plans.network_from_plans``).

Needs the optional extra ``lrcseg[nnunet]`` (nnunetv2 and dynamic-network-architectures) when
a network is built, not to import this module. The network is built by nnU-Net's
``get_network_from_plans`` from the plans' "architecture" entry, exactly as nnU-Net's trainer
builds it, so its state dict has nnU-Net's own keys (``PlainConvUNet`` /
``ResidualEncoderUNet``: InstanceNorm, LeakyReLU, no BatchNorm). ``NnUNetInput`` turns lrcseg's
cached window channel into nnU-Net's CTNormalization input (``plans`` says how).

``models/pretrain_net.py`` builds its nnU-Net network here (its levels adapter
``NnUNetLevels`` sits there, beside the FlexibleUNet one), so this module imports nothing from
``lrcseg.models``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lrcseg.config import NnUNetNetworkConfig
from lrcseg.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a network is built
    from torch import Tensor, nn

#: the key nnU-Net's ``load_pretrained_weights`` reads
NNUNET_WEIGHTS_KEY = "network_weights"
#: key fragment of the segmentation layers, which nnU-Net's loader skips
SEG_LAYERS = ".seg_layers."


def require_nnunet() -> None:
    """ConfigError saying how to install the extra, unless nnunetv2 imports."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise ConfigError("nnU-Net networks need the optional extra: pip install -c "
                          "constraints.txt 'lrcseg[nnunet]' (constraints.txt pinning your torch "
                          f"version, so pip does not replace it) ({exc})") from exc


def build_nnunet(arch: NnUNetNetworkConfig) -> nn.Module:
    """The plans' network, freshly initialised as nnU-Net initialises it (one input channel)."""
    require_nnunet()
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(arch.network_class_name, arch.arch_kwargs,
                                  arch.kw_requires_import, input_channels=1,
                                  output_channels=arch.num_classes, allow_init=True,
                                  deep_supervision=False)


class NnUNetInput:
    """lrcseg's window channel -> nnU-Net's CTNormalization, (clip(HU) - mean) / std.

    The cached channel ``channel`` holds ``w = (clip(HU, lo, hi) - lo) / (hi - lo)`` with
    (lo, hi) = ``arch.clip_hu``, so nnU-Net's input is ``w * (hi - lo) / std + (lo - mean) / std``.
    Input (B, C, *S) float with S = (H, W) for a 2D network or (D, H, W) for a 3D one, output
    (B, 1, *S).
    """

    def __init__(self, arch: NnUNetNetworkConfig, channel: int):
        lo, hi = arch.clip_hu
        self.channel = channel
        self.scale = (hi - lo) / arch.std
        self.offset = (lo - arch.mean) / arch.std

    def __call__(self, x: Tensor) -> Tensor:
        return x[:, self.channel:self.channel + 1] * self.scale + self.offset


def check_loads_into(weights: dict[str, Tensor], arch: NnUNetNetworkConfig, source: str) -> None:
    """What nnU-Net's ``load_pretrained_weights`` asserts: every key of the plans' network but
    the segmentation layers is present with the same shape. ConfigError otherwise, one line
    naming the first key (in the network's order) that is missing or differs, with both shapes;
    2D weights for a 3D network, or the reverse, are called so."""
    import torch

    with torch.device("meta"):
        reference = build_nnunet(arch).state_dict()
    for key, value in reference.items():
        if SEG_LAYERS in key:
            continue
        expected = tuple(value.shape)
        got = tuple(weights[key].shape) if key in weights else None
        if got == expected:
            continue
        if got is None:
            problem = f"{key} is missing from the weights"
        else:
            problem = f"{key} is {got} in the weights, {expected} in the network"
            if len(got) != len(expected) and min(len(got), len(expected)) >= 4:  # convolutions
                problem += f": {len(got) - 2}D weights, a {len(expected) - 2}D network"
        raise ConfigError(f"{source}: the weights do not fit the network of {arch.plans} "
                          f"({arch.configuration}): {problem}; pre-train with --nnunet-plans of "
                          "these plans and this configuration")
