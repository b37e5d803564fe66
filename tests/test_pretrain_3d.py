"""3D pre-training (issue 30 item 3): boxes of phantom volumes, supervoxels, two overlapping
3D views, MoCo + LRC on a 3D U-Net, exact resume; and the checks of a 3D config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lrcseg.config import (
    AugmentConfig,
    LRCConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
    SuperpixelConfig,
)
from lrcseg.data.boxes import PretrainBoxes
from lrcseg.errors import ConfigError
from lrcseg.models.load import load_checkpoint
from lrcseg.train.pretrain import pretrain
from lrcseg.train.pretrain_data import box_size, build_pretrain_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(pretrain_phantoms, out, steps=3, lrc=True, **run) -> PretrainConfig:
    run = {"steps": steps, "batch_size": 2, "device": "cpu", "log_every": 1,
           "checkpoint_every": 100, "cache_dir": pretrain_phantoms["cache"], "out": str(out), **run}
    return PretrainConfig(
        data=[pretrain_phantoms["data"]], method="moco", run=RunConfig(**run),
        preprocess=PreprocessConfig(spacing_mm=4.0),
        augment=AugmentConfig(patch_size=(32, 32, 32)),
        model=ModelConfig(backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8), proj_dim=16,
                          spatial_dims=3),
        moco=MocoConfig(queue_size=16), optim=OptimConfig(lr=1e-3, warmup_steps=0),
        superpixels=SuperpixelConfig(scale=33.0), lrc=LRCConfig(enabled=lrc))


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_3d_data_are_boxes_of_whole_volumes_with_their_supervoxels(pretrain_phantoms, tmp_path):
    cfg = make_cfg(pretrain_phantoms, tmp_path / "run")
    data = build_pretrain_data(cfg, progress=False)
    assert isinstance(data.dataset, PretrainBoxes)
    assert data.dataset.box == box_size(cfg) == (48, 48, 48)
    item = data.dataset[0]
    assert item["image"].shape == (1, 48, 48, 48) and item["regions"].shape == (48, 48, 48)
    assert item["spacing"].tolist() == [8.0, 4.0, 4.0]  # d, h, w in mm
    ids = np.unique(item["regions"].numpy())
    assert ids[0] == 0 and len(ids) > 20  # supervoxels inside the body, 0 outside
    assert data.dataset.max_region_id >= int(ids[-1])


def test_3d_moco_lrc_trains_and_resumes_exactly(pretrain_phantoms, tmp_path):
    whole = pretrain(make_cfg(pretrain_phantoms, tmp_path / "whole", steps=3), progress=False)
    logged = rows(whole)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for r in logged:
        assert math.isfinite(r["loss/total"]) and r["loss/lrc"] > 0 and r["loss/global"] > 0
    card = json.loads((whole / "run_card.json").read_text())
    assert card["spatial_dims"] == 3

    part = make_cfg(pretrain_phantoms, tmp_path / "part", steps=3)
    pretrain(part, progress=False, stop_at=1)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["step"] == 1
    pretrain(part, resume=True, progress=False)
    a = load_checkpoint(whole / "final.pt")["network"]
    b = load_checkpoint(tmp_path / "part" / "final.pt")["network"]
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert [r["loss/total"] for r in logged] == [r["loss/total"] for r in rows(tmp_path / "part")]


def test_3d_config_checks_say_what_is_wrong(pretrain_phantoms, tmp_path):
    base = make_cfg(pretrain_phantoms, tmp_path / "x")
    model3d = base.model
    with pytest.raises(ConfigError, match="patch_size"):
        PretrainConfig(data=base.data, model=model3d, run=base.run)
    with pytest.raises(ConfigError, match="multiple of 32"):
        PretrainConfig(data=base.data, model=model3d, run=base.run,
                       augment=AugmentConfig(patch_size=(16, 32, 32)))
    with pytest.raises(ConfigError, match="context_slices"):
        PretrainConfig(data=base.data, model=model3d, run=base.run, augment=base.augment,
                       preprocess=PreprocessConfig(context_slices=3))
    with pytest.raises(ConfigError, match="box_scale"):
        PretrainConfig(data=base.data, model=model3d, run=base.run,
                       augment=AugmentConfig(patch_size=(32, 32, 32), zoom=(0.5, 1.0)))


def test_lrcseg_finetune_refuses_a_3d_pretraining_and_names_the_nnunet_route(pretrain_phantoms,
                                                                              tmp_path):
    from lrcseg.config import FinetuneConfig
    from lrcseg.train.finetune import finetune

    run = pretrain(make_cfg(pretrain_phantoms, tmp_path / "run3d", steps=1), progress=False)
    cfg = FinetuneConfig(dataset=pretrain_phantoms["data"], init=str(run),
                         preprocess=PreprocessConfig(spacing_mm=4.0),
                         model=ModelConfig(backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8)),
                         run=RunConfig(steps=2, batch_size=2, device="cpu",
                                       out=str(tmp_path / "ft"), cache_dir=pretrain_phantoms["cache"]))
    with pytest.raises(ConfigError, match="3D pre-training initialises nnU-Net's 3d_fullres"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "ft").exists()


def test_the_3d_cpu_preset_loads_and_a_coarse_3d_scale_is_warned_about(pretrain_phantoms,
                                                                        tmp_path):
    from pathlib import Path

    from lrcseg.config import load_config
    from lrcseg.errors import DataWarning

    preset = Path(__file__).resolve().parents[1] / "configs" / "pretrain_3d_cpu.yaml"
    cfg = load_config(PretrainConfig, preset, {"data": [pretrain_phantoms["data"]]})
    assert cfg.model.spatial_dims == 3 and cfg.superpixels.scale <= 60
    assert all(side % 32 == 0 for side in cfg.augment.patch_size)
    coarse = make_cfg(pretrain_phantoms, tmp_path / "coarse")
    coarse = PretrainConfig(**{**coarse.__dict__, "superpixels": SuperpixelConfig(scale=100.0)})
    with pytest.warns(DataWarning, match="coarse supervoxels"):
        build_pretrain_data(coarse, progress=False)
