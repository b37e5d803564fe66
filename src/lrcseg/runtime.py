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


def resolve_device(name: str | None) -> torch.device:
    """'auto'/None -> cuda if available else cpu; 'cuda' without a GPU is a ConfigError."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
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
