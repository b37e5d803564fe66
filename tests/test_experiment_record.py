"""An experiment folder recorded before fine-tuning had intensity augmentation holds cells
fine-tuned without it: continuing it with the new default is refused, with it off accepted."""

from __future__ import annotations

import pytest
import yaml

from lrcseg.config import ExperimentConfig, PhantomSpec
from lrcseg.errors import ConfigError
from lrcseg.experiment.cells import Cell, finetune_config, register


def _cfg(**kw) -> ExperimentConfig:
    return ExperimentConfig(phantoms=PhantomSpec(cases=4), labeled=[1], draws=[0], seeds=[0], **kw)


def test_an_old_record_counts_as_fine_tuned_without_intensity_augmentation(tmp_path):
    register(_cfg(finetune_intensity=False), tmp_path)
    record = tmp_path / "experiment.yaml"
    old = yaml.safe_load(record.read_text())
    del old["finetune_intensity"]  # as written before the key existed
    record.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="finetune_intensity"):
        register(_cfg(), tmp_path)  # the new default (on) would mix two kinds of cells
    register(_cfg(finetune_intensity=False), tmp_path)


@pytest.mark.parametrize("enabled", [True, False])
def test_cells_fine_tune_with_the_experiment_setting(tmp_path, enabled):
    cfg = _cfg(finetune_intensity=enabled)
    cell = Cell(init="scratch", labeled=1, draw=0, seed=0)
    assert finetune_config(cfg, cell, tmp_path / "data", tmp_path).intensity.enabled is enabled

