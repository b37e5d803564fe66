"""BYOL's regression loss: the predicted online embedding regresses the target embedding.

Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020.

With q_v (B, P) the predictor's output on view v's online embedding and t_v (B, P) the target
network's embedding of view v (a constant)::

    l(q, t) = 2 - 2 cos(q, t) = || q/|q| - t/|t| ||^2                per sample, in [0, 4]
    L       = 1/2 [ mean_b l(q1_b, t2_b) + mean_b l(q2_b, t1_b) ]    (symmetric)

(BYOL sums the two directions; we average them so the scale matches the other global losses.)
The predictor and the EMA target network are the method's state: ``lrcseg.methods.byol``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def byol_regression(q: Tensor, t: Tensor) -> Tensor:
    """2 - 2 cos(q, t) per row: q, t (B, P) -> (B,). t is treated as a constant."""
    return 2 - 2 * F.cosine_similarity(q.float(), t.detach().float(), dim=1)


class BYOLLoss(nn.Module):
    """The symmetric BYOL loss (see the module docstring); it has no parameters.

    forward(q1, q2, t1, t2) -> (loss, stats):
        q1, q2: (B, P) float predictions from the online embeddings of views 1 and 2
            (gradients flow); t1, t2: (B, P) target embeddings of views 1 and 2 (constants).
        q1 regresses t2 and q2 regresses t1. stats: {"byol_cos": mean cos(q, t) over both
        directions}.
    """

    def forward(self, q1: Tensor, q2: Tensor, t1: Tensor, t2: Tensor
                ) -> tuple[Tensor, dict[str, Tensor]]:
        if q1.ndim != 2 or not q1.shape == q2.shape == t1.shape == t2.shape:
            raise ValueError("q1, q2, t1, t2 must be equal (B, P), got "
                             f"{[tuple(x.shape) for x in (q1, q2, t1, t2)]}")
        per_sample = torch.cat([byol_regression(q1, t2), byol_regression(q2, t1)])
        loss = per_sample.mean()
        return loss, {"byol_cos": (1 - per_sample.detach() / 2).mean()}
