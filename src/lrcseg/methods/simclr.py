"""SimCLR: NT-Xent over the 2B global embeddings of a batch (``lrcseg.losses.simclr``).

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.

SimCLR has no state besides its loss; with gathering (``--gather-negatives`` under DDP) the
embeddings of every rank are gathered with their gradients, so the contrast set is the whole
global batch (2 x global batch embeddings).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lrcseg.distributed import gather_with_grad
from lrcseg.losses.simclr import DEFAULT_TEMPERATURE, SimCLRLoss
from lrcseg.methods.base import GlobalMethod, MethodContext, Views
from lrcseg.methods.registry import register_method
from lrcseg.methods.simclr_options import SimCLRConfig

if TYPE_CHECKING:
    from lrcseg.config import PretrainConfig
    from lrcseg.models.pretrain_net import PretrainNetwork


@register_method("simclr")
class SimCLR(GlobalMethod):
    """NT-Xent of out1["global"], out2["global"] (B, P) -> (loss, {"simclr_acc": top-1}).

    Args:
        temperature: t, abs(t) >= 1e-8.
        gather: contrast the embeddings of every rank (2 x global batch).

    Options: ``SimCLRConfig``, the config's ``simclr:`` section.
    """

    options = SimCLRConfig

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, gather: bool = False):
        super().__init__()
        self.loss = SimCLRLoss(temperature)
        self.gather = gather

    @classmethod
    def from_config(cls, cfg: PretrainConfig, online: PretrainNetwork,
                    context: MethodContext) -> SimCLR:
        options: SimCLRConfig = cfg.options()
        return cls(options.temperature, gather=context.gather)

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = out1["global"], out2["global"]
        if self.gather:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        return self.loss(z1, z2)
