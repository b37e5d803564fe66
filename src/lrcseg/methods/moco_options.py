"""MoCo v2's options: the ``moco:`` section of a pre-training config (``PretrainConfig.moco``).

Kept apart from ``lrcseg.methods.moco`` because config validation and ``lrcseg --help`` must
not import torch; ``MoCo.options`` names this class and the registry lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrcseg.errors import ConfigError


@dataclass
class MocoConfig:
    """MoCo v2 global loss. queue_size None = auto (see docs/METHOD.md section 5).

    position_partitions: 0 = instance discrimination (MoCo v2). P > 0: each volume's body
        slices are cut into P equal bands of relative z, and the queue keys of slices in the
        query's band (of any volume) are positives too (Chaitanya et al. 2020, "global"
        strategy): neighbouring and same-level slices of other scans stop being negatives.
        Assumes the volumes cover similar anatomical ranges.
    Every option is fixed on ``--resume`` (each changes the objective).
    """

    temperature: float = 0.2
    momentum: float = 0.99
    queue_size: int | None = None
    shuffle_bn: bool = True
    position_partitions: int = 0

    def __post_init__(self) -> None:
        if self.position_partitions < 0:
            raise ConfigError(f"Illegal position_partitions {self.position_partitions}: need >= 0")
        if abs(self.temperature) < 1e-8:
            raise ConfigError(f"Illegal temperature: abs({self.temperature}) < 1e-8")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"Illegal momentum {self.momentum}: need 0 <= m < 1")
        if self.queue_size is not None and self.queue_size <= 0:
            raise ConfigError(f"Illegal queue_size {self.queue_size}")
