"""The interface of a global pre-training method, so the loop does not care which one runs.

A method is an ``nn.Module`` (``GlobalMethod``) with
    from_config(cfg, online, context) -> method
        builds it for a ``PretrainConfig`` and the online ``PretrainNetwork``;
    forward(out1, out2, views) -> (loss, stats)
        out*: the online network's outputs on each view ({"global": (B, P), "local": ...,
            and "decoder": (B, C_0, H, W) full-resolution decoder features, (B, C_0, D, H, W)
            with ``ModelConfig.spatial_dims`` 3, when the method sets ``full_decoder = True``});
        views: ``Views`` (the augmented images, their labels if any, the step's generators);
        loss: a scalar; stats: detached scalars, logged as "global/<key>";
    after_step(step, total_steps): bookkeeping after the optimiser step (e.g. an EMA);
    options: the dataclass of its options, the config section named after the method
        (``cfg.options()`` in ``from_config``; see ``lrcseg.methods.registry``), or None;
    normalized_global: whether out*["global"] (and the network's ``encode_global``) are unit
        vectors (True) or the global head's raw output (False, e.g. for a variance term);
    logs_global: False if the method contributes nothing to log (method "none");
    needs_labels, position_partitions: what the loop must put into ``Views`` for it.
Its state_dict holds everything a resume needs (momentum encoders, queue, predictor); the
pre-training checkpoint stores it as "global_objective". The online network is not part of
it: a method keeps a plain reference (``self._online = [online]``) when it needs one.

``build_method`` builds the method ``cfg.method`` names (``lrcseg.methods.registry``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lrcseg.methods.registry import method_class

if TYPE_CHECKING:
    from lrcseg.config import PretrainConfig
    from lrcseg.models.pretrain_net import PretrainNetwork


@dataclass
class Views:
    """What a global method may need besides the online outputs.

    view1, view2: (B, C, S, S) augmented views (3D: (B, C, S_d, S, S) patches). labels1,
    labels2: (B, S, S) (3D: (B, S_d, S, S)) long label ids carried through the views'
    geometry (None when unlabelled). generator: this rank's step generator;
    shared_generator: the same on every rank (cross-rank shuffles).
    groups: (B,) long position group of each slice (MoCo position positives), else None.
    labelled: (B,) bool, which slices carry labels (False for unlabelled pool slices in
        supervised + LRC pre-training, whose labels are all background); None = all.
    """

    view1: Tensor
    view2: Tensor
    generator: torch.Generator
    shared_generator: torch.Generator
    labels1: Tensor | None = None
    labels2: Tensor | None = None
    groups: Tensor | None = None
    labelled: Tensor | None = None


@dataclass(frozen=True)
class MethodContext:
    """What the pre-training loop knows when it builds a method, besides the config.

    num_slices: slices in the pre-training pool (MoCo's automatic queue size).
    world_size: processes of the run (1 without torchrun).
    gather_negatives: ``--gather-negatives``, contrast against the whole global batch.
    num_classes: label ids of the labelled dataset (max id + 1), for "supervised"; else None.
    """

    num_slices: int
    world_size: int = 1
    gather_negatives: bool = False
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.num_slices < 1 or self.world_size < 1:
            raise ValueError(f"Illegal num_slices {self.num_slices} / world_size "
                             f"{self.world_size}: need >= 1")

    @property
    def gather(self) -> bool:
        """Whether the method contrasts across ranks (gathering on, more than one process)."""
        return self.gather_negatives and self.world_size > 1


class GlobalMethod(nn.Module):
    """Base class of the global methods (see the module docstring for the interface)."""

    #: the dataclass of the method's options (its config section, named after the method),
    #: defined where importing it loads no torch; None = the method takes no options
    options: type | None = None
    #: False if forward needs the global head's output unnormalised: the pre-training network
    #: then skips the L2 normalisation of out["global"] and ``encode_global``
    normalized_global = True
    #: True if forward needs out["decoder"], the (B, C_0, H, W) full-resolution features
    full_decoder = False
    #: False if the method logs no global loss (its loss is always 0)
    logs_global = True
    #: True if forward needs ``views.labels1/2`` at every step (and ``views.labelled`` when
    #: the pool mixes labelled and unlabelled slices), e.g. supervised pre-training
    needs_labels = False
    #: P > 0: forward needs ``views.groups``, each slice's relative z position binned in P
    position_partitions = 0

    @classmethod
    def from_config(cls, cfg: PretrainConfig, online: PretrainNetwork,
                    context: MethodContext) -> GlobalMethod:
        """The method as ``cfg`` configures it for ``online``; ConfigError if it cannot run."""
        raise NotImplementedError

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after optimiser step ``step`` of ``total_steps``; nothing by default."""


def build_method(cfg: PretrainConfig, online: PretrainNetwork, num_slices: int,
                 world_size: int = 1, gather_negatives: bool = False,
                 num_classes: int | None = None) -> GlobalMethod:
    """The global method named by ``cfg.method`` for ``online`` (see ``MethodContext``)."""
    context = MethodContext(num_slices, world_size, gather_negatives, num_classes)
    return method_class(cfg.method).from_config(cfg, online, context)
