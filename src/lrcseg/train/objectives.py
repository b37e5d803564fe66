"""Global pre-training objectives behind one interface, so the loop does not care which.

An objective is an ``nn.Module`` with
    forward(out1, out2, view1, view2, generator) -> (loss, stats)
        out*: the online network's outputs on each view ({"global": (B, P), "local": ...});
        view*: the augmented views (B, C, H, W), for objectives with their own encoders.
    after_step(step, total_steps): bookkeeping after the optimiser step (e.g. momentum).
Its state_dict holds everything a resume needs (momentum encoder, queue).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lrcseg.config import PretrainConfig
from lrcseg.errors import ConfigError
from lrcseg.losses.moco import MoCoV2, default_queue_size
from lrcseg.models.pretrain_net import PretrainNetwork


class MoCoObjective(nn.Module):
    """Symmetric MoCo v2: each view is a query for the other view's momentum key.

    L_global = (InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2, queue of earlier keys; both views'
    keys are enqueued (2B per step, so the queue size must be a multiple of 2B).
    """

    def __init__(self, online: PretrainNetwork, queue_size: int, temperature: float,
                 momentum: float, shuffle_bn: bool, seed: int):
        super().__init__()
        self.moco = MoCoV2(online, queue_size, temperature=temperature, momentum=momentum,
                           shuffle_splits=2 if shuffle_bn else 1,
                           generator=torch.Generator().manual_seed(seed))
        self._online = [online]  # a plain reference: its weights belong to the loop's state

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], view1: Tensor,
                view2: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        return self.moco(out1["global"], out2["global"], view1, view2, self._online[0], generator)

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing: MoCo updates its key encoder at the start of each forward."""


def build_global_objective(cfg: PretrainConfig, online: PretrainNetwork, num_slices: int
                           ) -> nn.Module:
    """The global objective named by ``cfg.method`` for ``online``."""
    if cfg.method == "moco":
        per_step = 2 * cfg.run.batch_size  # both views' keys are enqueued
        queue = cfg.moco.queue_size or default_queue_size(num_slices, per_step)
        if queue % per_step:
            raise ConfigError(f"moco.queue_size {queue} must be a multiple of 2 x batch_size "
                              f"= {per_step} (both views' keys are enqueued each step)")
        return MoCoObjective(online, queue, cfg.moco.temperature, cfg.moco.momentum,
                             cfg.moco.shuffle_bn, cfg.run.seed)
    raise ConfigError(f"pre-training method {cfg.method!r} is not implemented yet "
                      "(available: moco)")
