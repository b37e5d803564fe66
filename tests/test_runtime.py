"""Device choice and global seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lrcseg.errors import ConfigError
from lrcseg.runtime import resolve_device, seed_everything


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_seed_everything_repeats_all_three_generators():
    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
