"""Method "none": no global loss, LRC alone (the config refuses "none" without LRC)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lrcseg.methods.base import GlobalMethod, MethodContext, Views
from lrcseg.methods.registry import register_method

if TYPE_CHECKING:
    from lrcseg.config import PretrainConfig
    from lrcseg.models.pretrain_net import PretrainNetwork


@register_method("none")
class NoGlobal(GlobalMethod):
    """The global loss is an exact scalar 0 (on out1["global"]'s device) and nothing is logged."""

    logs_global = False

    @classmethod
    def from_config(cls, cfg: PretrainConfig, online: PretrainNetwork,
                    context: MethodContext) -> NoGlobal:
        return cls()

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        return out1["global"].new_zeros(()), {}
