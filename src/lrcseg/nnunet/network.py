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
    Input (B, C, H, W) float, output (B, 1, H, W).
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
    the segmentation layers is present with the same shape. ConfigError otherwise."""
    import torch

    with torch.device("meta"):
        reference = build_nnunet(arch).state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items() if SEG_LAYERS not in k}
    got = {k: tuple(v.shape) for k, v in weights.items() if SEG_LAYERS not in k}
    missing = sorted(set(expected) - set(got))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or wrong:
        raise ConfigError(f"{source}: the weights do not fit the network of {arch.plans} "
                          f"({arch.configuration}): missing {missing[:3]}, wrong shape {wrong[:3]}; "
                          "pre-train with --nnunet-plans of these plans")
