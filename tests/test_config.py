"""Typed configs: validation, YAML round trip, overrides, stable keys, the methods' option
sections; atomic writes."""

from __future__ import annotations

import pytest

from lrcseg.config import (
    BYOLConfig,
    FinetuneConfig,
    LRCConfig,
    MocoConfig,
    PreprocessConfig,
    PretrainConfig,
    SimCLRConfig,
    SuperpixelConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from lrcseg.errors import ConfigError
from lrcseg.io_utils import atomic_path, atomic_write_text


def test_yaml_round_trip(tmp_path):
    cfg = PretrainConfig(data=["a", "b"], preprocess=PreprocessConfig(extra_windows_hu=[(-1000, 400)]),
                         lrc=LRCConfig(weight=0.5, variant="region"))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(PretrainConfig, tmp_path / "c.yaml") == cfg


def test_overrides_win_over_file(tmp_path):
    (tmp_path / "c.yaml").write_text("run:\n  steps: 7\n  batch_size: 3\nlrc:\n  weight: 2.0\n")
    cfg = load_config(PretrainConfig, tmp_path / "c.yaml", {"run": {"steps": 9}})
    assert (cfg.run.steps, cfg.run.batch_size, cfg.lrc.weight) == (9, 3, 2.0)


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("lrc:\n  wieght: 2.0\n")
    with pytest.raises(ConfigError, match="wieght"):
        load_config(PretrainConfig, tmp_path / "c.yaml")
    for cls in (PretrainConfig, FinetuneConfig):  # top level: not a key, not a method's section
        with pytest.raises(ConfigError, match="unknown key.*optm"):
            from_dict(cls, {"optm": {"lr": 0.1}})


# config.yaml of a MoCo run as lrcseg wrote it before the methods declared their own options
_OLD_METHOD_SECTIONS = """\
method: simclr
moco: {temperature: 0.2, momentum: 0.9, queue_size: 64, shuffle_bn: true, position_partitions: 0}
simclr: {temperature: 0.1}
byol: {base_momentum: 0.99, predictor_hidden: 512}
"""


def test_the_method_sections_of_older_config_files_load_and_are_written_as_before(tmp_path):
    (tmp_path / "old.yaml").write_text(_OLD_METHOD_SECTIONS)
    cfg = load_config(PretrainConfig, tmp_path / "old.yaml")
    assert cfg.moco == MocoConfig(momentum=0.9, queue_size=64)
    assert cfg.options() == SimCLRConfig(temperature=0.1) and cfg.byol == BYOLConfig()
    assert cfg.method_sections == {}
    keys = list(to_dict(cfg))  # the same sections in the same place, nothing added
    assert keys[keys.index("lrc"):keys.index("lrc") + 5] == ["lrc", "moco", "simclr", "byol",
                                                             "distributed"]
    assert "method_sections" not in keys


def test_non_mapping_yaml_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PretrainConfig, tmp_path / "c.yaml")


@pytest.mark.parametrize("build, message", [
    (lambda: LRCConfig(temperature=0.0), "temperature"),
    (lambda: LRCConfig(variant="pixels"), "variant"),
    (lambda: PreprocessConfig(window_hu=(250, -175)), "window"),
    (lambda: PreprocessConfig(context_slices=2), "context_slices"),
    (lambda: PretrainConfig(method="mocov9"), "method"),
    (lambda: PretrainConfig(method="none", lrc=LRCConfig(enabled=False)), "no loss"),
    (lambda: MocoConfig(momentum=1.0), "momentum"),
    (lambda: MocoConfig(queue_size=0), "queue_size"),
    (lambda: SimCLRConfig(temperature=0.0), "temperature"),
    (lambda: BYOLConfig(predictor_hidden=0), "predictor_hidden"),
    (lambda: from_dict(PretrainConfig, {"byol": {"base_momentum": 1.5}}), "base_momentum"),
    (lambda: FinetuneConfig(labeled=1.5), "labeled"),
])
def test_validation_names_the_field(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_keys_change_with_settings_only():
    assert PreprocessConfig().key() == PreprocessConfig().key()
    assert PreprocessConfig().key() != PreprocessConfig(spacing_mm=2.0).key()
    # both superpixel implementations give the same regions, so they share a cache key
    assert SuperpixelConfig(implementation="skimage").key() == SuperpixelConfig().key()
    assert SuperpixelConfig(scale=200).key() != SuperpixelConfig().key()
    assert PreprocessConfig().in_channels == 1
    assert PreprocessConfig(extra_windows_hu=[(-1000, 400)], context_slices=3).in_channels == 6


def test_atomic_write_leaves_target_untouched_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
