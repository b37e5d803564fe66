"""BYOL: a predictor on the online embedding regresses an EMA target network's embedding.

Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020.

Online: q_v = predictor(z_v), z_v the online global embedding (B, P) of view v.
Target: t_v = target_encoder.encode_global(x_v) (B, P), no gradient; the target encoder is an
exponential moving average of the online encoder + global head. The loss is
``lrcseg.losses.byol.BYOLLoss`` (symmetric 2 - 2 cos, in [0, 4])::

    theta_t <- tau_k theta_t + (1 - tau_k) theta_online             after optimiser step k
    tau_k    = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2           tau_base -> 1 over K steps
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lrcseg.losses.byol import BYOLLoss
from lrcseg.methods.base import GlobalMethod, MethodContext, Views
from lrcseg.methods.byol_options import BYOLConfig
from lrcseg.methods.momentum import frozen_copy, momentum_update
from lrcseg.methods.registry import register_method

if TYPE_CHECKING:
    from lrcseg.config import PretrainConfig
    from lrcseg.models.pretrain_net import PretrainNetwork

#: tau_base, the target momentum at step 0 (annealed to 1 at the last step)
DEFAULT_BASE_MOMENTUM = BYOLConfig.base_momentum
#: predictor hidden width (BYOL uses 4096 for P = 256; we keep 4 x P)
DEFAULT_PREDICTOR_HIDDEN = BYOLConfig.predictor_hidden


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2: base at k = 0, 1 at k = K."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class BYOLPredictor(nn.Module):
    """q = W2 relu(BN(W1 z)): the MLP predictor, (B, P) -> (B, P) (not normalised)."""

    def __init__(self, dim: int, hidden_dim: int = DEFAULT_PREDICTOR_HIDDEN):
        super().__init__()
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"Illegal predictor widths dim={dim}, hidden_dim={hidden_dim}: need >= 1")
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.mlp(z)


@register_method("byol")
class BYOL(GlobalMethod):
    """BYOL with its predictor and EMA target encoder (see the module docstring).

    Args:
        online: the online network (unwrapped); deep-copied into ``target_encoder``, whose
            parameters never require gradients. It must have ``encode_global(x) -> (B, P)``
            and ``cfg.proj_dim`` = P.
        base_momentum: tau_base in [0, 1).
        hidden_dim: predictor hidden width.

    forward(out1, out2, views) -> (loss, stats):
        out1["global"], out2["global"]: (B, P) online global embeddings (gradients flow);
        views.view1, views.view2: (B, C, H, W), encoded by the target without gradient.
        stats: {"byol_cos": mean cos(q, t) over both directions}.
    after_step(step, total_steps): the EMA step with tau_step (``update_target``).
    Options: ``BYOLConfig``, the config's ``byol:`` section.
    """

    options = BYOLConfig

    def __init__(self, online: nn.Module, base_momentum: float = DEFAULT_BASE_MOMENTUM,
                 hidden_dim: int = DEFAULT_PREDICTOR_HIDDEN):
        super().__init__()
        if not 0.0 <= base_momentum < 1.0:
            raise ValueError(f"Illegal base_momentum {base_momentum}: need 0 <= m < 1")
        self.base_momentum = base_momentum
        self.predictor = BYOLPredictor(online.cfg.proj_dim, hidden_dim)
        self.target_encoder = frozen_copy(online)
        self.loss = BYOLLoss()
        self._online = [online]  # a plain reference: its weights belong to the loop's state

    @classmethod
    def from_config(cls, cfg: PretrainConfig, online: PretrainNetwork,
                    context: MethodContext) -> BYOL:
        options: BYOLConfig = cfg.options()
        return cls(online, options.base_momentum, options.predictor_hidden)

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            t1 = self.target_encoder.encode_global(views.view1)
            t2 = self.target_encoder.encode_global(views.view2)
        q1, q2 = self.predictor(out1["global"]), self.predictor(out2["global"])
        return self.loss(q1, q2, t1, t2)

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the online weights into the target with tau_step (base -> 1)."""
        self.update_target(step, total_steps)

    @torch.no_grad()
    def update_target(self, step: int, total_steps: int) -> float:
        """theta_t <- tau theta_t + (1 - tau) theta_online with tau = cosine_momentum(...)."""
        tau = cosine_momentum(step, total_steps, self.base_momentum)
        momentum_update(self._online[0], self.target_encoder, tau)
        return tau
