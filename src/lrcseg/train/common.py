"""Pieces every training loop shares: device choice, LR schedule, a resumable sampler, seeds,
the data loader, autocast, and loading the checkpoint to resume from."""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lrcseg.errors import ConfigError
from lrcseg.train.checkpoint import find_checkpoint, load_checkpoint


class GracefulInterrupt:
    """Turn the first Ctrl-C (SIGINT) into a flag that the loop checks between steps.

    The loop then saves a checkpoint at a step boundary (never mid-step, when the weights,
    optimiser or MoCo queue may already hold part of the next step) and raises
    KeyboardInterrupt; ``--resume`` continues exactly. A second Ctrl-C stops at once, and the
    last periodic checkpoint stands. Outside the main thread it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def resolve_device(name: str | None) -> torch.device:
    """'auto'/None -> cuda if available else cpu; 'cuda' without a GPU is a ConfigError."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, stream).

    All per-step randomness (augmentation, region sampling, key shuffles) draws from it, so a
    resumed run replays exactly the randomness an uninterrupted run would have used.
    """
    mixed = np.random.SeedSequence([seed, step, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & (2**63 - 1))


def make_optimizer(params, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW from an ``OptimConfig``: the fused kernel on CUDA, multi-tensor (foreach) on CPU.

    Both give the same update as the plain loop; on CPU foreach measured ~1.5x faster for a
    ResNet-18 U-Net step of AdamW (65 -> 44 ms).
    """
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up from 1/warmup to 1, then cosine decay to 0 at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ResumableSampler(Sampler[int]):
    """An endless stream of indices: epoch e is a permutation seeded by (seed, e).

    ``start`` skips the first ``start`` indices of the stream, so resuming at step s with batch
    size B continues with exactly the samples an uninterrupted run would have drawn. With
    ``num_replicas > 1`` each rank takes every num_replicas-th index (a distributed sampler).
    """

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, num_replicas: int = 1):
        if size < 1:
            raise ValueError(f"Illegal size {size}: the dataset is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Illegal rank {rank} for {num_replicas} replicas")
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.num_replicas = rank, num_replicas

    def __iter__(self) -> Iterator[int]:
        position = self.start * self.num_replicas + self.rank
        while True:
            epoch, offset = divmod(position, self.size)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.size, generator=g).tolist()
            while offset < self.size:
                yield perm[offset]
                offset += self.num_replicas
                position += self.num_replicas
            position = (epoch + 1) * self.size + (offset - self.size)

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress estimates
        return 2**62


def prepare_run_dir(out: str | Path, resume: bool, create: bool = True) -> Path:
    """Check (and with ``create``, make) the run folder.

    Refuses to overwrite an existing non-empty run unless resuming. Call it once with
    ``create=False`` before reading data, so bad input leaves no empty run folder behind.
    """
    run_dir = Path(out)
    if resume:
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: --resume given but the run folder does not exist")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: run folder exists and is not empty; use --resume to "
                          "continue it or choose another --out")
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler, workers: int,
                device: torch.device, drop_last: bool = False) -> DataLoader:
    """The training DataLoader over an endless ``ResumableSampler`` (workers persist)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      drop_last=drop_last)


def autocast_context(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; a no-op context otherwise (CPU runs in float32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_resume_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The latest checkpoint of ``run_dir`` (for --resume); ConfigError if there is none.

    Loaded on the CPU: ``load_state_dict`` moves weights and optimiser state to their
    parameters' device, and the RNG state must stay a CPU ByteTensor.
    """
    ckpt_path = find_checkpoint(run_dir, prefer_final=False)
    if ckpt_path is None:
        raise ConfigError(f"{run_dir}: --resume given but no checkpoint.pt in it")
    return load_checkpoint(ckpt_path, map_location="cpu")
