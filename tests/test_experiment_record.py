"""An experiment folder recorded before fine-tuning had intensity augmentation (or before the
probe read enc32 and re-estimated BatchNorm) holds cells made the old way: continuing it with
the new defaults is refused, with the old settings accepted."""

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



def test_an_old_record_counts_as_probed_the_legacy_way(tmp_path):
    legacy = {"probe": True, "probe_levels": "enc4,enc8,enc16,dec4,dec2,dec1",
              "probe_batchnorm": "stored", "finetune_intensity": False}
    register(_cfg(**legacy), tmp_path)
    record = tmp_path / "experiment.yaml"
    old = yaml.safe_load(record.read_text())
    for key in ("probe_levels", "probe_batchnorm", "finetune_intensity"):
        del old[key]
    record.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="probe_batchnorm, probe_levels"):
        register(_cfg(probe=True, finetune_intensity=False), tmp_path)
    register(_cfg(**legacy), tmp_path)


def test_probe_settings_are_validated_against_the_probes_own_tables():
    from lrcseg.config import PROBE_LEVEL_SETS, PROBE_LEVELS
    from lrcseg.evaluate.probe import LEVEL_SETS, LEVELS

    assert set(PROBE_LEVEL_SETS) == set(LEVEL_SETS)
    assert set(PROBE_LEVELS) == {v for levels in LEVEL_SETS.values() for v in levels}
    assert set(PROBE_LEVELS) <= set(LEVELS)
    with pytest.raises(ConfigError, match="probe_levels"):
        _cfg(probe_levels="enc4,dec3")
    with pytest.raises(ConfigError, match="probe_batchnorm"):
        _cfg(probe_batchnorm="frozen")


def test_an_old_record_counts_as_one_rate_seeded_draws_and_the_default_curve(tmp_path):
    register(_cfg(finetune_intensity=False), tmp_path)
    record = tmp_path / "experiment.yaml"
    old = yaml.safe_load(record.read_text())
    for key in ("finetune_strategy", "draw_mode", "curve_steps"):
        del old[key]  # as written before the keys existed
    record.write_text(yaml.safe_dump(old))
    register(_cfg(finetune_intensity=False), tmp_path)  # the defaults are what it did
    record.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="changed: draw_mode, finetune_strategy"):
        register(_cfg(finetune_intensity=False, draw_mode="distinct",
                      finetune_strategy={"head_first_steps": 1}), tmp_path)
    # The learning-curve steps choose which evaluations exist, not what a cell computes.
    register(_cfg(finetune_intensity=False, curve_steps=[100], learning_curve="all"), tmp_path)


def test_scratch_cells_keep_the_default_strategy(tmp_path):
    from lrcseg.config import FinetuneStrategyConfig, InitSpec

    cfg = _cfg(finetune_strategy={"freeze_encoder": True, "decoder_lr_scale": 0.1},
               initialisations=[InitSpec("scratch"), InitSpec("moco", "moco")])
    strategies = {init: finetune_config(cfg, Cell(init, 1, 0, 0), tmp_path / "data",
                                        tmp_path).strategy for init in ("scratch", "moco")}
    assert strategies == {"scratch": FinetuneStrategyConfig(),
                          "moco": FinetuneStrategyConfig(freeze_encoder=True, decoder_lr_scale=0.1)}
