"""BYOL: a predictor on the online embedding regresses an EMA target network's embedding.

Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020.

Online: q_v = predictor(z_v), z_v the online global embedding (B, P) of view v.
Target: t_v = normalize(target_encoder(x_v)) (B, P), no gradient; the target encoder is an
exponential moving average of the online encoder + global head::

    l(q, t)  = 2 - 2 cos(q, t) = || q/|q| - t/|t| ||^2            per sample
    L        = 1/2 [ mean_b l(q1_b, t2_b) + mean_b l(q2_b, t1_b) ]   (symmetric, in [0, 4])
    theta_t <- tau_k theta_t + (1 - tau_k) theta_online             after optimiser step k
    tau_k    = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2           tau_base -> 1 over K steps

(BYOL sums the two directions; we average them so the scale matches the other global losses.)
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrcseg.losses.moco import momentum_update

#: tau_base, the target momentum at step 0 (annealed to 1 at the last step)
DEFAULT_BASE_MOMENTUM = 0.99
#: predictor hidden width (BYOL uses 4096 for P = 256; we keep 4 x P)
DEFAULT_PREDICTOR_HIDDEN = 512


def byol_regression(q: Tensor, t: Tensor) -> Tensor:
    """2 - 2 cos(q, t) per row: q, t (B, P) -> (B,). t is treated as a constant."""
    return 2 - 2 * F.cosine_similarity(q.float(), t.detach().float(), dim=1)


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


class BYOL(nn.Module):
    """The symmetric BYOL loss with its predictor and EMA target encoder.

    Args:
        online: the online network (unwrapped); deep-copied into ``target_encoder``, whose
            parameters never require gradients. It must have ``encode_global(x) -> (B, P)``
            and ``cfg.proj_dim`` = P.
        base_momentum: tau_base in [0, 1).
        hidden_dim: predictor hidden width.

    forward(z1, z2, x1, x2) -> (loss, stats):
        z1, z2: (B, P) online global embeddings of the views (gradients flow).
        x1, x2: (B, C, H, W) the views, encoded by the target encoder without gradient.
        stats: {"byol_cos": mean cos(q, t) over both directions}.
    update_target(online, step, total_steps): the EMA step with tau_step.
    """

    def __init__(self, online: nn.Module, base_momentum: float = DEFAULT_BASE_MOMENTUM,
                 hidden_dim: int = DEFAULT_PREDICTOR_HIDDEN):
        super().__init__()
        if not 0.0 <= base_momentum < 1.0:
            raise ValueError(f"Illegal base_momentum {base_momentum}: need 0 <= m < 1")
        self.base_momentum = base_momentum
        self.predictor = BYOLPredictor(online.cfg.proj_dim, hidden_dim)
        self.target_encoder = copy.deepcopy(online)
        self.target_encoder.requires_grad_(False)

    def forward(self, z1: Tensor, z2: Tensor, x1: Tensor, x2: Tensor
                ) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            t1, t2 = self.target_encoder.encode_global(x1), self.target_encoder.encode_global(x2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        per_sample = torch.cat([byol_regression(q1, t2), byol_regression(q2, t1)])
        loss = per_sample.mean()
        return loss, {"byol_cos": (1 - per_sample.detach() / 2).mean()}

    @torch.no_grad()
    def update_target(self, online: nn.Module, step: int, total_steps: int) -> float:
        tau = cosine_momentum(step, total_steps, self.base_momentum)
        momentum_update(online, self.target_encoder, tau)
        return tau
