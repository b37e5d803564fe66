"""SimCLR's options: the ``simclr:`` section of a pre-training config (``PretrainConfig.simclr``).

Kept apart from ``lrcseg.methods.simclr`` because config validation and ``lrcseg --help`` must
not import torch; ``SimCLR.options`` names this class and the registry lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrcseg.errors import ConfigError


@dataclass
class SimCLRConfig:
    """SimCLR's NT-Xent over the 2B embeddings of a batch (Chen et al. 2020).

    Fixed on ``--resume`` (the temperature changes the objective).
    """

    temperature: float = 0.2

    def __post_init__(self) -> None:
        if abs(self.temperature) < 1e-8:
            raise ConfigError(f"Illegal temperature: abs({self.temperature}) < 1e-8")
