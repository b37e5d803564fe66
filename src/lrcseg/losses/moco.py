"""MoCo v2: momentum key encoder, queue of negative keys, InfoNCE, shuffled BatchNorm.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning" (MoCo v2), 2020.

For a query q (B, P) from the online network and its key k (B, P) from the momentum encoder
(another view of the same slice), with a queue of K earlier keys (K, P), all unit vectors::

    logits = [q.k, q.queue_1, ..., q.queue_K] / t        (B, 1 + K)
    L      = cross_entropy(logits, target 0)
    theta_k <- m theta_k + (1 - m) theta_q                 (after every step, before the keys)

The online forward pass belongs to the training loop (one pass gives the global query and the
local features LRC needs); ``MoCoV2`` takes the precomputed queries and computes the keys.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrcseg.models.pretrain_net import PretrainNetwork

MAX_QUEUE_SIZE = 65536


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """theta_target <- m theta_target + (1 - m) theta_online, parameter by parameter.

    m = 0 copies the online weights exactly, m = 1 keeps the target. Buffers (BatchNorm
    running statistics) are not touched: the key encoder keeps its own, as in MoCo. The two
    modules must have the same parameters in the same order (e.g. the target is a deep copy
    of the online network taken before any ``torch.compile``/DDP wrapping).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"Illegal momentum {m}: need 0 <= m <= 1")
    online_params = list(online.parameters())
    target_params = list(target.parameters())
    if len(online_params) != len(target_params) or any(
        a.shape != b.shape for a, b in zip(online_params, target_params, strict=True)
    ):
        raise ValueError("online and target networks have different parameters")
    # lerp(t, o, w) computes o - (o - t)(1 - w) for w >= 0.5: exact copy at w = 1 (m = 0).
    torch._foreach_lerp_(target_params, [p.detach() for p in online_params], 1.0 - m)


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


def moco_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float,
                 groups: Tensor | None = None, queue_groups: Tensor | None = None) -> Tensor:
    """InfoNCE with the positive at index 0: q (B, P), k (B, P), queue (K, P) -> scalar.

    L = -1/B sum_i log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.queue_j / t)) ).
    With position groups (``groups`` (B,) of the queries, ``queue_groups`` (K,) of the queue
    keys; Chaitanya et al. 2020's "global" positives), the queue keys of the query's group are
    positives too (multi-positive InfoNCE over A_i = {k_i} + queue):
    L = -1/B sum_i 1/|Pos_i| sum_{p in Pos_i} log( exp(q_i.a_p / t) / sum_{a in A_i} exp(q_i.a / t) ),
    Pos_i = {k_i} + {queue_j : group_j = group_i}. Keys and queue are constants (no gradient).
    """
    q = q.float()
    k = k.detach().float()
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.detach().float().t()
    logits = torch.cat([positive, negative], dim=1) / temperature
    if groups is None:
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
    if queue_groups is None or groups.shape != (q.shape[0],) or queue_groups.shape != (queue.shape[0],):
        raise ValueError("position positives need groups (B,) and queue_groups (K,)")
    same = groups[:, None].to(queue_groups.device) == queue_groups[None, :]
    pos = torch.cat([torch.ones_like(same[:, :1]), same], dim=1).to(logits.dtype)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return (-(log_prob * pos).sum(1) / pos.sum(1)).mean()


def shuffled_forward(encode, x: Tensor, num_splits: int, generator: torch.Generator | None = None
                     ) -> Tensor:
    """Run ``encode`` on a shuffled batch in ``num_splits`` chunks, return rows in input order.

    BatchNorm then normalises each key with the statistics of a random sub-batch, unlike the
    query (computed on the whole batch in its original order): this emulates on one device
    MoCo's cross-GPU shuffle, which stops the model from cheating through batch statistics.
    The number of chunks is lowered so each has >= 2 samples. (Under DDP the training loop
    gathers, shuffles across ranks and scatters instead.)
    x: (B, ...); encode maps (b, ...) -> (b, P); returns (B, P).
    """
    batch = x.shape[0]
    splits = max(1, min(num_splits, batch // 2))
    gen_device = generator.device if generator is not None else x.device
    perm = torch.randperm(batch, generator=generator, device=gen_device).to(x.device)
    out = torch.cat([encode(chunk) for chunk in x[perm].chunk(splits)], dim=0)
    return out[torch.argsort(perm)]


class MoCoV2(nn.Module):
    """The symmetric MoCo v2 global loss: owns the momentum key encoder and the queue.

    Each view is the query for the other view's key:
    L = (InfoNCE(q1, k2, queue) + InfoNCE(q2, k1, queue)) / 2, then both k1 and k2 are
    enqueued, so 2B keys per step and K must be a multiple of 2B.

    Args:
        online: the online ``PretrainNetwork`` (unwrapped; deep-copied into ``key_encoder``,
            whose parameters never require gradients).
        queue_size: K, a multiple of 2 x the global batch (see ``default_queue_size``).
        temperature: t (0.2 for MoCo v2). momentum: m in [0, 1).
        shuffle_splits: sub-batches for shuffled BatchNorm of the keys (1 = no shuffle).
        generator: seeds the queue's initial random keys.
        grouped: position positives (``moco_infonce`` with groups): forward then needs
            ``groups`` (B,), the slices' position groups, which are also enqueued.

    forward(q1, q2, x1, x2, online, generator=None, key_forward=None, groups=None)
            -> (loss, stats):
        q1, q2: (B, P) unit-norm queries from the online network on views 1 and 2.
        x1, x2: (B, C, H, W) the two views, encoded by the key encoder (encoder + global head
            only, shuffled BatchNorm).
        online: the online network, for the momentum update done first (MoCo's order).
        generator: drives the BatchNorm shuffle.
        key_forward: ``key_forward(encode, x) -> keys`` replaces the one-device sub-batch
            shuffle (under DDP: the cross-rank shuffle).
    The loss uses the queue *before* this step's keys are enqueued. stats holds "moco_acc",
    the share of queries whose positive beats every queue key.
    """

    def __init__(self, online: PretrainNetwork, queue_size: int, temperature: float = 0.2,
                 momentum: float = 0.99, shuffle_splits: int = 2,
                 generator: torch.Generator | None = None, grouped: bool = False):
        super().__init__()
        if abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Illegal momentum {momentum}: need 0 <= m < 1")
        if shuffle_splits < 1:
            raise ValueError(f"Illegal shuffle_splits {shuffle_splits}: need >= 1")
        self.temperature = temperature
        self.momentum = momentum
        self.shuffle_splits = shuffle_splits
        self.key_encoder = copy.deepcopy(online)
        self.key_encoder.requires_grad_(False)
        self.queue = MoCoQueue(online.cfg.proj_dim, queue_size, generator=generator, grouped=grouped)

    def forward(self, q1: Tensor, q2: Tensor, x1: Tensor, x2: Tensor, online: nn.Module,
                generator: torch.Generator | None = None,
                key_forward: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor] | None = None,
                groups: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if key_forward is None:
            def key_forward(encode: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
                return shuffled_forward(encode, x, self.shuffle_splits, generator)
        momentum_update(online, self.key_encoder, self.momentum)
        with torch.no_grad():
            k1, k2 = (key_forward(self.key_encoder.encode_global, x) for x in (x1, x2))
        if self.queue.grouped != (groups is not None):
            raise ValueError("groups are needed exactly when the queue is grouped")
        queue = self.queue.keys.clone()
        queue_groups = self.queue.groups.clone() if groups is not None else None
        loss = (moco_infonce(q1, k2, queue, self.temperature, groups, queue_groups)
                + moco_infonce(q2, k1, queue, self.temperature, groups, queue_groups)) / 2
        with torch.no_grad():
            q = torch.cat([q1, q2]).float()
            positive = (q * torch.cat([k2, k1])).sum(dim=1)
            acc = (positive > (q @ queue.t()).max(dim=1).values).float().mean()
        self.queue.enqueue(torch.cat([k1, k2]),
                           None if groups is None else torch.cat([groups, groups]))
        return loss, {"moco_acc": acc}
