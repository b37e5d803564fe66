"""Device choice and global seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lrcseg.errors import ConfigError
from lrcseg.runtime import cpu_model, resolve_device, seed_everything


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


def test_cpu_model_reads_the_model_name_and_falls_back(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                    "model name\t: AMD EPYC 9B14\nflags\t\t: fpu\n\nprocessor\t: 1\n"
                    "model name\t: AMD EPYC 9B14\n")
    assert cpu_model(info) == "AMD EPYC 9B14"
    fallback = cpu_model(tmp_path / "missing")  # not Linux: what platform knows
    assert fallback and fallback != "AMD EPYC 9B14"
    info.write_text("processor\t: 0\nmodel name\t:\n")  # an empty field is not a model
    assert cpu_model(info) == fallback
