"""InfoNCE of queries against their keys and a bank of negatives (MoCo's loss).

Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018; the form of
He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020.

For B queries q (B, P), their positive keys k (B, P) and K negatives n (K, P), all unit
vectors, one batched matmul gives every logit with the positive at index 0::

    logits_i = [q_i.k_i, q_i.n_1, ..., q_i.n_K] / t                  (B, 1 + K)
    L        = -1/B sum_i log( exp(q_i.k_i / t) / sum_{a in A_i} exp(q_i.a / t) ),
               A_i = {k_i} + {n_1, ..., n_K}

With position groups (Chaitanya et al. 2020, "global" positives), the negatives in the
query's group are positives too (multi-positive InfoNCE over the same A_i)::

    L = -1/B sum_i 1/|Pos_i| sum_{p in Pos_i} log( exp(q_i.a_p / t) / sum_{a in A_i} exp(q_i.a / t) ),
    Pos_i = {k_i} + {n_j : group(n_j) = group(q_i)}

Keys and negatives are constants: only the queries receive gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: tau of MoCo v2
DEFAULT_TEMPERATURE = 0.2


def infonce(query: Tensor, key: Tensor, negatives: Tensor, temperature: float,
            groups: Tensor | None = None, negative_groups: Tensor | None = None) -> Tensor:
    """InfoNCE (see the module docstring): query, key (B, P), negatives (K, P) -> scalar.

    groups: (B,) long position group of each query and negative_groups (K,) long of each
    negative (a group no query has, e.g. -1, matches nothing), or both None (plain InfoNCE).
    """
    q = query.float()
    k = key.detach().float()
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ negatives.detach().float().t()
    logits = torch.cat([positive, negative], dim=1) / temperature
    if groups is None:
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
    if (negative_groups is None or groups.shape != (q.shape[0],)
            or negative_groups.shape != (negatives.shape[0],)):
        raise ValueError("position positives need groups (B,) and negative_groups (K,)")
    same = groups[:, None].to(negative_groups.device) == negative_groups[None, :]
    pos = torch.cat([torch.ones_like(same[:, :1]), same], dim=1).to(logits.dtype)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return (-(log_prob * pos).sum(1) / pos.sum(1)).mean()


class InfoNCELoss(nn.Module):
    """InfoNCE (see the module docstring) as a module.

    Args:
        temperature: t, abs(t) >= 1e-8.

    forward(query, key, negatives, groups=None, negative_groups=None) -> scalar loss:
        query: (B, P) float, unit rows (gradients flow); key: (B, P) the positives;
        negatives: (K, P) the negative bank (a queue); groups (B,) / negative_groups (K,)
        long, optional position groups whose matches count as positives.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        if abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        self.temperature = temperature

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor, groups: Tensor | None = None,
                negative_groups: Tensor | None = None) -> Tensor:
        return infonce(query, key, negatives, self.temperature, groups, negative_groups)
