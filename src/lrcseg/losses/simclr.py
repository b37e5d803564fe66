"""SimCLR's NT-Xent loss: normalised-temperature cross-entropy over the 2B views of a batch.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.

With z1, z2 (B, P) the global embeddings of the two views and z = [z1; z2] (2B, P) unit rows,
every row i is an anchor whose positive is the other view of the same slice, pos(i) = i +- B,
and whose contrast set is every other row (2B - 1 candidates, 2B - 2 negatives)::

    s_ij = z_i . z_j / t
    l_i  = -log( exp(s_i,pos(i)) / sum_{j != i} exp(s_ij) )
    L    = 1 / (2B) sum_i l_i

When the method gathers the embeddings of every rank (``lrcseg.methods.simclr``, ``gather``)
z holds the whole global batch, so every rank computes the same loss as one process would on
the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: tau for NT-Xent (SimCLR uses 0.1-0.5; 0.2 matches MoCo v2's temperature)
DEFAULT_TEMPERATURE = 0.2


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent of two views: z1, z2 (B, P) -> (scalar loss, scalar top-1 accuracy).

    Rows are L2-normalised here (a no-op for unit embeddings). Accuracy is the share of
    anchors whose positive has the largest similarity in their contrast set.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1/z2 must be equal (B, P), got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if z1.shape[0] < 1:
        raise ValueError("NT-Xent needs at least one sample per view")
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = (z @ z.t()) / temperature
    self_pair = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    target = torch.arange(2 * B, device=z.device).roll(B)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(dim=1) == target).float().mean().detach()
    return loss, acc


class SimCLRLoss(nn.Module):
    """NT-Xent (see the module docstring) as a module.

    Args:
        temperature: t > 0.

    forward(z1, z2) with z1, z2 float tensors (B, P) -> (loss, {"simclr_acc": accuracy}).
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        if abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        self.temperature = temperature

    def forward(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, acc = nt_xent(z1, z2, self.temperature)
        return loss, {"simclr_acc": acc}
