"""Global pre-training objectives behind one interface, so the loop does not care which.

An objective is an ``nn.Module`` with
    forward(out1, out2, views) -> (loss, stats)
        out*: the online network's outputs on each view ({"global": (B, P), "local": ...,
            and "decoder": (B, C_0, H, W) full-resolution decoder features when the objective
            sets ``full_decoder = True``});
        views: ``Views`` (the augmented images, their labels if any, the step's generators).
    after_step(step, total_steps): bookkeeping after the optimiser step (e.g. EMA momentum).
    logs_global: False if the objective contributes nothing to log (method "none").
Its state_dict holds everything a resume needs (momentum encoders, queue, predictor).

Methods: "moco" (MoCo v2, ``losses/moco.py``), "simclr" (NT-Xent, ``losses/simclr.py``),
"byol" (``losses/byol.py``), "none" (LRC alone) and "supervised" (Dice + cross-entropy on
labelled slices, MONAI ``DiceCELoss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from monai.networks.nets.flexible_unet import SegmentationHead
from torch import Tensor, nn

from lrcseg.config import PRETRAIN_METHODS, PretrainConfig
from lrcseg.errors import ConfigError
from lrcseg.losses.byol import BYOL, DEFAULT_BASE_MOMENTUM, DEFAULT_PREDICTOR_HIDDEN
from lrcseg.losses.moco import MoCoQueue, MoCoV2, default_queue_size
from lrcseg.losses.simclr import DEFAULT_TEMPERATURE, SimCLRLoss
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.train.distributed import (
    concat_all_gather,
    gather_with_grad,
    get_world_size,
    shuffled_forward_across_ranks,
)


@dataclass
class Views:
    """What a global objective may need besides the online outputs.

    view1, view2: (B, C, S, S) augmented views. labels1, labels2: (B, S, S) long label ids
    carried through the views' geometry (None when unlabelled). generator: this rank's step
    generator; shared_generator: the same on every rank (cross-rank shuffles).
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


class _Objective(nn.Module):
    full_decoder = False
    logs_global = True

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing by default."""


class _GatheredQueue(MoCoQueue):
    """A MoCo queue that enqueues the keys (and groups) of every rank (same queue on all ranks)."""

    def enqueue(self, keys: Tensor, groups: Tensor | None = None) -> None:
        super().enqueue(concat_all_gather(keys), None if groups is None else concat_all_gather(groups))


class MoCoObjective(_Objective):
    """Symmetric MoCo v2: each view is a query for the other view's momentum key.

    L_global = (InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2, queue of earlier keys; both views'
    keys are enqueued (2B per step, or 2 x global batch with ``gather_keys``).

    Under DDP (world > 1) with ``shuffle_bn`` the keys use the cross-rank BatchNorm shuffle
    (``shuffled_forward_across_ranks``) with the step's shared generator; on one process the
    local sub-batch shuffle of ``MoCoV2``. With ``position_partitions`` P > 0, slices in the
    same of P equal bands of relative z (``Views.groups``) are positives of each other.
    """

    def __init__(self, online: PretrainNetwork, queue_size: int, temperature: float,
                 momentum: float, shuffle_bn: bool, seed: int, gather_keys: bool = False,
                 position_partitions: int = 0):
        super().__init__()
        self.grouped = position_partitions > 0
        self.moco = MoCoV2(online, queue_size, temperature=temperature, momentum=momentum,
                           shuffle_splits=2 if shuffle_bn else 1,
                           generator=torch.Generator().manual_seed(seed), grouped=self.grouped)
        if gather_keys:
            gathered = _GatheredQueue(online.cfg.proj_dim, queue_size, grouped=self.grouped)
            gathered.load_state_dict(self.moco.queue.state_dict())
            self.moco.queue = gathered
        self.cross_rank_shuffle = shuffle_bn and get_world_size() > 1
        self._online = [online]  # a plain reference: its weights belong to the loop's state

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        key_forward = None
        if self.cross_rank_shuffle:
            def key_forward(encode, x):
                return shuffled_forward_across_ranks(encode, x, views.shared_generator)
        if self.grouped and views.groups is None:
            raise ValueError("MoCo with position positives needs the slices' groups")
        return self.moco(out1["global"], out2["global"], views.view1, views.view2,
                         self._online[0], views.generator, key_forward=key_forward,
                         groups=views.groups if self.grouped else None)


class SimCLRObjective(_Objective):
    """NT-Xent over the 2B global embeddings (2 x global batch with ``gather``)."""

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, gather: bool = False):
        super().__init__()
        self.loss = SimCLRLoss(temperature)
        self.gather = gather

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = out1["global"], out2["global"]
        if self.gather:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        return self.loss(z1, z2)


class BYOLObjective(_Objective):
    """BYOL with a predictor on the online global embedding and an EMA target (annealed)."""

    def __init__(self, online: PretrainNetwork, base_momentum: float = DEFAULT_BASE_MOMENTUM,
                 hidden_dim: int = DEFAULT_PREDICTOR_HIDDEN):
        super().__init__()
        self.byol = BYOL(online, base_momentum, hidden_dim)
        self._online = [online]

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.byol(out1["global"], out2["global"], views.view1, views.view2)

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the online weights into the target with tau_step (0.99 -> 1)."""
        self.byol.update_target(self._online[0], step, total_steps)


class NoGlobalObjective(_Objective):
    """Method "none": LRC alone. The global loss is an exact 0 and nothing is logged."""

    logs_global = False

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        return out1["global"].new_zeros(()), {}


class SupervisedObjective(_Objective):
    """L_seg = (DiceCE(head(d1), y1) + DiceCE(head(d2), y2)) / 2 on both labelled views.

    d*: (B, C_0, S, S) full-resolution decoder features of each view; head: a 3x3 conv
    ``SegmentationHead`` to K = num_classes logits (label ids 0..K-1 of the labelled dataset,
    0 = background); y*: (B, S, S) label ids carried through the views' geometry (pixels
    outside the slice are background). DiceCE is MONAI's (softmax, one-hot, batch Dice), as in
    fine-tuning. Only the slices ``views.labelled`` marks enter L_seg; a batch without any gives
    an exact 0 that still depends on the head (unlabelled pool slices feed only LRC).
    """

    full_decoder = True

    def __init__(self, decoder_channels: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"Illegal num_classes {num_classes}: need background + >= 1 organ")
        self.num_classes = num_classes
        self.head = SegmentationHead(spatial_dims=2, in_channels=decoder_channels,
                                     out_channels=num_classes, kernel_size=3)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        if views.labels1 is None or views.labels2 is None:
            raise ValueError("the supervised objective needs the views' labels")
        losses = []
        for out, labels in ((out1, views.labels1), (out2, views.labels2)):
            logits = self.head(out["decoder"]).float()
            if views.labelled is not None:
                if not bool(views.labelled.any()):
                    losses.append(logits.sum() * 0.0)
                    continue
                logits, labels = logits[views.labelled], labels[views.labelled]
            losses.append(self.loss(logits, labels[:, None]))
        return (losses[0] + losses[1]) / 2, {}


def build_global_objective(cfg: PretrainConfig, online: PretrainNetwork, num_slices: int,
                           world_size: int = 1, gather_negatives: bool = False,
                           num_classes: int | None = None) -> nn.Module:
    """The global objective named by ``cfg.method`` for ``online``.

    world_size, gather_negatives: under DDP with gathering, MoCo enqueues 2 x global batch keys
    per step (the queue size must be a multiple of it) and SimCLR contrasts the global batch.
    num_classes: label ids of the labelled dataset (max id + 1), for "supervised".
    """
    gather = gather_negatives and world_size > 1
    if cfg.method == "moco":
        per_step = 2 * cfg.run.batch_size * (world_size if gather else 1)
        queue = cfg.moco.queue_size or default_queue_size(num_slices, per_step)
        if queue % per_step:
            what = "2 x global batch" if gather else "2 x batch_size"
            raise ConfigError(f"moco.queue_size {queue} must be a multiple of {what} = {per_step} "
                              "(both views' keys are enqueued each step)")
        return MoCoObjective(online, queue, cfg.moco.temperature, cfg.moco.momentum,
                             cfg.moco.shuffle_bn, cfg.run.seed, gather_keys=gather,
                             position_partitions=cfg.moco.position_partitions)
    if cfg.method == "simclr":
        return SimCLRObjective(cfg.simclr.temperature, gather=gather)
    if cfg.method == "byol":
        return BYOLObjective(online, cfg.byol.base_momentum, cfg.byol.predictor_hidden)
    if cfg.method == "none":
        return NoGlobalObjective()
    if cfg.method == "supervised":
        if num_classes is None:
            raise ConfigError("method 'supervised' needs a labelled dataset: pass --labels DATASET")
        return SupervisedObjective(online.full_resolution_channels, num_classes)
    raise ConfigError(f"pre-training method {cfg.method!r} is not implemented "
                      f"(available: {', '.join(PRETRAIN_METHODS)})")
