"""Data-parallel training with ``torchrun``: process group, rank helpers, gathers, shuffled BN.

``torchrun --nproc_per_node=G [--nnodes N --rdzv-endpoint HOST:PORT] -m lrcseg pretrain ...``
starts one process per GPU (or CPU process) with RANK, LOCAL_RANK and WORLD_SIZE set; with
WORLD_SIZE > 1 ``init_distributed`` joins the process group (NCCL on CUDA, Gloo on CPU).
Without torchrun everything here degrades to the single-process identity.

Two gathers, on purpose:
- ``gather_with_grad`` (``torch.distributed.nn.functional.all_gather``): the backward sums the
  gradients of every rank's copy into the owner, so a loss computed identically on every rank
  from gathered embeddings has, after DDP's gradient averaging, exactly the gradient of the
  same loss computed by one process on the concatenated batch.
- ``concat_all_gather``: no gradient (MoCo keys, region maps, inputs for the key shuffle).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lrcseg.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank in [0, world_size), its device, whether it leads."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group if WORLD_SIZE > 1, else a single-process context.

    device: the run's device (from ``resolve_device``); on CUDA each process takes
    ``cuda:LOCAL_RANK`` and NCCL, on CPU Gloo. An already initialised group (tests spawning
    their own processes) is reused and left to its owner.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not is_distributed():
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: "
                              "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, device=device, owns_group=owns)


def teardown(ctx: DistContext) -> None:
    """Leave the process group if ``init_distributed`` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's x (B, ...) along dim 0 -> (W*B, ...), rank order, with grad."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """Concatenate every rank's x (B, ...) along dim 0 -> (W*B, ...), rank order, no grad."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(values: Tensor) -> Tensor:
    """Element-wise mean of ``values`` over ranks (a copy; the input is unchanged)."""
    out = values.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (e.g. "my loss is finite")."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


@torch.no_grad()
def shuffled_forward_across_ranks(encode: Callable[[Tensor], Tensor], x: Tensor,
                                  generator: torch.Generator) -> Tensor:
    """MoCo's shuffled BatchNorm under DDP: gather, shuffle globally, encode, unshuffle.

    x: this rank's (B, ...) inputs. All ranks gather the global batch (W*B, ...), permute it
    with ``generator`` (which must be the same on every rank), encode their B-row share of the
    permuted batch (so BatchNorm sees a random sub-batch drawn from all ranks), gather the
    (W*B, P) outputs, undo the permutation and return their own rows (B, P) in input order.
    """
    rank = get_rank()
    batch = x.shape[0]
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], generator=generator).to(x.device)
    mine = x_all[perm[rank * batch:(rank + 1) * batch]]
    out_all = concat_all_gather(encode(mine))
    restored = out_all[torch.argsort(perm)]
    return restored[rank * batch:(rank + 1) * batch]
