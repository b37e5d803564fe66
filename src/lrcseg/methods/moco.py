"""MoCo v2: momentum key encoder, queue of negative keys, shuffled BatchNorm, position positives.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning" (MoCo v2), 2020.

Each view is the query for the other view's key (``lrcseg.losses.infonce``)::

    L = (InfoNCE(q1, k2, queue) + InfoNCE(q2, k1, queue)) / 2
    theta_k <- m theta_k + (1 - m) theta_q          (every step, before the keys are computed)

q_v (B, P) are the online global embeddings (from the loop's forward pass, which also gives
the local features LRC needs), k_v (B, P) the key encoder's on the same views; then both k1
and k2 are enqueued, 2B keys per step (2 x global batch with gathered keys), so the queue
size K must be a multiple of that.

Position positives (``grouped``; ``moco.position_partitions`` P > 0 in the config): slices in
the same of P equal bands of relative z (``Views.groups``) are positives of each other, so the
queue also keeps each key's group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrcseg.distributed import (
    concat_all_gather,
    get_world_size,
    shuffled_forward_across_ranks,
)
from lrcseg.errors import ConfigError
from lrcseg.losses.infonce import DEFAULT_TEMPERATURE, InfoNCELoss
from lrcseg.methods.base import GlobalMethod, MethodContext, Views
from lrcseg.methods.moco_options import MocoConfig
from lrcseg.methods.momentum import frozen_copy, momentum_update
from lrcseg.methods.registry import register_method

if TYPE_CHECKING:
    from lrcseg.config import PretrainConfig
    from lrcseg.models.pretrain_net import PretrainNetwork

MAX_QUEUE_SIZE = 65536

KeyForward = Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]


def default_queue_size(num_slices: int, global_batch: int) -> int:
    """K = min(65536, about num_slices / 4), rounded down to a multiple of the global batch,
    at least one batch: a slice rarely meets its own stale key in the queue.
    """
    if num_slices < 1 or global_batch < 1:
        raise ValueError(f"Illegal num_slices {num_slices} / global_batch {global_batch}: need >= 1")
    target = min(MAX_QUEUE_SIZE, num_slices // 4)
    return max(global_batch, target // global_batch * global_batch)


class MoCoQueue(nn.Module):
    """A ring buffer of K keys of width P, kept in buffers so it is saved and resumed exactly.

    Buffers: ``keys`` (K, P) float32, initialised to random unit vectors (from ``generator``),
    and ``ptr`` () long, the next row to overwrite. ``enqueue(k)`` writes the B rows of k
    (B, P) at ``ptr`` and advances it by B modulo K. K must be a multiple of B, so a batch
    never straddles the end of the buffer (checked at every enqueue).
    With ``grouped`` the queue also keeps ``groups`` (K,) long, each key's position group
    (-1 for the initial random keys, which match nothing); ``enqueue(k, groups)`` then needs
    the keys' groups (B,).
    """

    def __init__(self, dim: int, size: int, generator: torch.Generator | None = None,
                 grouped: bool = False):
        super().__init__()
        if dim < 1:
            raise ValueError(f"Illegal queue dim {dim}: must be >= 1")
        if size < 1:
            raise ValueError(f"Illegal queue size {size}: must be >= 1")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.grouped = grouped
        if grouped:
            self.register_buffer("groups", torch.full((size,), -1, dtype=torch.long))
        # A host copy of ``ptr`` so enqueueing never waits for the device; the buffer stays
        # the saved truth and refreshes the copy on load_state_dict.
        self._ptr = 0
        self.register_load_state_dict_post_hook(MoCoQueue._sync_host_pointer)

    @staticmethod
    def _sync_host_pointer(module: MoCoQueue, incompatible_keys) -> None:
        module._ptr = int(module.ptr)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, groups: Tensor | None = None) -> None:
        batch = keys.shape[0]
        if keys.ndim != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"keys must be (B, {self.keys.shape[1]}), got {tuple(keys.shape)}")
        if self.size % batch != 0:
            raise ValueError(f"queue size {self.size} is not a multiple of the key batch {batch}")
        if self.grouped != (groups is not None) or (groups is not None and groups.shape != (batch,)):
            raise ValueError("a grouped queue needs the keys' groups (B,), an ungrouped one none")
        start = self._ptr
        self.keys[start:start + batch] = keys.detach().to(self.keys.dtype)
        if groups is not None:
            self.groups[start:start + batch] = groups.to(self.groups.device, torch.long)
        self._ptr = (start + batch) % self.size
        self.ptr.fill_(self._ptr)


class _GatheredQueue(MoCoQueue):
    """A MoCo queue that enqueues the keys (and groups) of every rank (same queue on all ranks)."""

    def enqueue(self, keys: Tensor, groups: Tensor | None = None) -> None:
        super().enqueue(concat_all_gather(keys), None if groups is None else concat_all_gather(groups))


def shuffled_forward(encode: Callable[[Tensor], Tensor], x: Tensor, num_splits: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """Run ``encode`` on a shuffled batch in ``num_splits`` chunks, return rows in input order.

    BatchNorm then normalises each key with the statistics of a random sub-batch, unlike the
    query (computed on the whole batch in its original order): this emulates on one device
    MoCo's cross-GPU shuffle, which stops the model from cheating through batch statistics.
    The number of chunks is lowered so each has >= 2 samples. (Under DDP with ``shuffle_bn``
    MoCo gathers, shuffles across ranks and scatters instead.)
    x: (B, ...); encode maps (b, ...) -> (b, P); returns (B, P).
    """
    batch = x.shape[0]
    splits = max(1, min(num_splits, batch // 2))
    gen_device = generator.device if generator is not None else x.device
    perm = torch.randperm(batch, generator=generator, device=gen_device).to(x.device)
    out = torch.cat([encode(chunk) for chunk in x[perm].chunk(splits)], dim=0)
    return out[torch.argsort(perm)]


@register_method("moco")
class MoCo(GlobalMethod):
    """Symmetric MoCo v2 (see the module docstring): owns the key encoder and the queue.

    Args:
        online: the online ``PretrainNetwork`` (unwrapped; deep-copied into ``key_encoder``,
            whose parameters never require gradients). It must have ``encode_global(x) ->
            (B, P)`` and ``cfg.proj_dim`` = P.
        queue_size: K, a multiple of 2 x the global batch (see ``default_queue_size``).
        temperature: t (0.2 for MoCo v2). momentum: m in [0, 1).
        shuffle_bn: shuffled BatchNorm for the keys: on one process two shuffled
            sub-batches (``shuffled_forward``), under DDP the cross-rank shuffle with the
            step's shared generator (``shuffled_forward_across_ranks``).
        seed: seeds the queue's initial random keys.
        gather_keys: enqueue every rank's keys (``--gather-negatives`` under DDP).
        position_partitions: P > 0 turns on position positives: the loop bins each slice's
            relative z position into P groups, and forward then needs ``views.groups`` (B,),
            which are enqueued with the keys.

    forward(out1, out2, views) -> (loss, stats): queries out*["global"] (B, P) (unit norm,
    gradients flow); views.view1/view2 (B, C, H, W) are encoded by the key encoder (encoder +
    global head only) after the momentum update; views.generator drives the one-process
    shuffle. The loss uses the queue *before* this step's keys are enqueued. stats:
    {"moco_acc": the share of queries whose positive beats every queue key}.
    Options: ``MocoConfig``, the config's ``moco:`` section.
    """

    options = MocoConfig

    def __init__(self, online: nn.Module, queue_size: int, temperature: float = DEFAULT_TEMPERATURE,
                 momentum: float = 0.99, shuffle_bn: bool = True, seed: int = 0,
                 gather_keys: bool = False, position_partitions: int = 0):
        super().__init__()
        self.loss = InfoNCELoss(temperature)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Illegal momentum {momentum}: need 0 <= m < 1")
        self.momentum = momentum
        self.shuffle_splits = 2 if shuffle_bn else 1
        if position_partitions < 0:
            raise ValueError(f"Illegal position_partitions {position_partitions}: must be >= 0")
        self.position_partitions = position_partitions
        self.grouped = grouped = position_partitions > 0
        self.key_encoder = frozen_copy(online)
        self.queue = MoCoQueue(online.cfg.proj_dim, queue_size,
                               generator=torch.Generator().manual_seed(seed), grouped=grouped)
        if gather_keys:  # the same initial keys, then every rank's keys enqueued
            gathered = _GatheredQueue(online.cfg.proj_dim, queue_size, grouped=grouped)
            gathered.load_state_dict(self.queue.state_dict())
            self.queue = gathered
        self.cross_rank_shuffle = shuffle_bn and get_world_size() > 1
        self._online = [online]  # a plain reference: its weights belong to the loop's state

    @classmethod
    def from_config(cls, cfg: PretrainConfig, online: PretrainNetwork,
                    context: MethodContext) -> MoCo:
        """K from ``moco.queue_size`` or ``default_queue_size``; ConfigError unless it is a
        multiple of the keys enqueued per step (2 x batch, 2 x global batch when gathering)."""
        options: MocoConfig = cfg.options()
        per_step = 2 * cfg.run.batch_size * (context.world_size if context.gather else 1)
        queue = options.queue_size or default_queue_size(context.num_slices, per_step)
        if queue % per_step:
            what = "2 x global batch" if context.gather else "2 x batch_size"
            raise ConfigError(f"moco.queue_size {queue} must be a multiple of {what} = {per_step} "
                              "(both views' keys are enqueued each step)")
        return cls(online, queue, options.temperature, options.momentum, options.shuffle_bn,
                   cfg.run.seed, gather_keys=context.gather,
                   position_partitions=options.position_partitions)

    def _key_forward(self, views: Views) -> KeyForward:
        if self.cross_rank_shuffle:
            def key_forward(encode: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
                return shuffled_forward_across_ranks(encode, x, views.shared_generator)
        else:
            def key_forward(encode: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
                return shuffled_forward(encode, x, self.shuffle_splits, views.generator)
        return key_forward

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.grouped and views.groups is None:
            raise ValueError("MoCo with position positives needs the slices' groups")
        groups = views.groups if self.grouped else None
        q1, q2 = out1["global"], out2["global"]
        key_forward = self._key_forward(views)
        momentum_update(self._online[0], self.key_encoder, self.momentum)
        with torch.no_grad():
            k1, k2 = (key_forward(self.key_encoder.encode_global, x) for x in (views.view1, views.view2))
        queue = self.queue.keys.clone()
        queue_groups = self.queue.groups.clone() if groups is not None else None
        loss = (self.loss(q1, k2, queue, groups, queue_groups)
                + self.loss(q2, k1, queue, groups, queue_groups)) / 2
        acc = _beats_queue(torch.cat([q1, q2]), torch.cat([k2, k1]), queue)
        self.queue.enqueue(torch.cat([k1, k2]),
                           None if groups is None else torch.cat([groups, groups]))
        return loss, {"moco_acc": acc}


@torch.no_grad()
def _beats_queue(queries: Tensor, keys: Tensor, queue: Tensor) -> Tensor:
    """Share of queries (N, P) whose positive key (N, P) scores above every queue key (K, P)."""
    q = queries.float()
    positive = (q * keys).sum(dim=1)
    return (positive > (q @ queue.t()).max(dim=1).values).float().mean()
