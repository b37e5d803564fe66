"""Where and how reproducibly a run executes: the device and the global seeds.

Shared by training, inference and the commands; nothing here knows about training.
"""

from __future__ import annotations

import platform
import random
from pathlib import Path

import numpy as np
import torch

from lrcseg.errors import ConfigError

#: The device types lrcseg runs on (``--device``, ``run.device``).
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str | None) -> torch.device:
    """'auto'/None -> cuda if available else cpu; else 'cpu', 'cuda', 'cuda:N' or 'mps'.

    A name torch does not know ('gpu'), another device type, or a device this machine lacks
    ('cuda' without a GPU, 'cuda:3' with two) is a ConfigError: one line for the CLI.
    """
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {name}: unknown device; use {choices}") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"--device {name}: lrcseg does not run on {device.type!r}; use {choices}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS (Apple GPU) is not available on this machine")
    return device


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux: /proc/cpuinfo's first "model name"), else what
    ``platform`` knows ("x86_64" at worst). Run cards and reports record it because the same
    code, seed and data give numerically different training on different CPU kinds (float
    kernels differ), so a result recomputed on another machine is a new realisation."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
