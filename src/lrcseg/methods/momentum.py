"""Momentum (EMA) copies of the online network, shared by MoCo's key encoder and BYOL's target.

    theta_target <- m theta_target + (1 - m) theta_online          parameter by parameter
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(online: nn.Module) -> nn.Module:
    """A deep copy of ``online`` whose parameters never require gradients.

    Take it from the unwrapped network, before any ``torch.compile``/DDP/SyncBatchNorm
    wrapping, so ``momentum_update`` pairs the same parameters in the same order.
    """
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """theta_target <- m theta_target + (1 - m) theta_online, parameter by parameter.

    m = 0 copies the online weights exactly, m = 1 keeps the target. Buffers (BatchNorm
    running statistics) are not touched: the target keeps its own, as in MoCo. The two
    modules must have the same parameters in the same order (see ``frozen_copy``).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"Illegal momentum {m}: need 0 <= m <= 1")
    online_params = list(online.parameters())
    target_params = list(target.parameters())
    if len(online_params) != len(target_params) or any(
        a.shape != b.shape for a, b in zip(online_params, target_params, strict=True)
    ):
        raise ValueError("online and target networks have different parameters")
    # lerp(t, o, w) computes o - (o - t)(1 - w) for w >= 0.5: exact copy at w = 1 (m = 0).
    torch._foreach_lerp_(target_params, [p.detach() for p in online_params], 1.0 - m)
