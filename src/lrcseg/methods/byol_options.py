"""BYOL's options: the ``byol:`` section of a pre-training config (``PretrainConfig.byol``).

Kept apart from ``lrcseg.methods.byol`` because config validation and ``lrcseg --help`` must
not import torch; ``BYOL.options`` names this class and the registry lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrcseg.errors import ConfigError


@dataclass
class BYOLConfig:
    """BYOL (Grill et al. 2020): EMA target, momentum cosine-annealed from base_momentum to 1.

    base_momentum: tau_base in [0, 1). predictor_hidden: the predictor's hidden width (BYOL
    uses 4096 for P = 256; we keep 4 x P). Both are fixed on ``--resume``.
    """

    base_momentum: float = 0.99
    predictor_hidden: int = 512

    def __post_init__(self) -> None:
        if not 0 <= self.base_momentum < 1:
            raise ConfigError(f"Illegal base_momentum {self.base_momentum}")
        if self.predictor_hidden <= 0:
            raise ConfigError(f"Illegal predictor_hidden {self.predictor_hidden}")
