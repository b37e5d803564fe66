"""Where and how reproducibly a run executes: the device and the global seeds.

Shared by training, inference and the commands; nothing here knows about training.
"""

from __future__ import annotations

import random

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


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
