"""The pre-training loop on tiny phantoms: every method runs with and without LRC, a short run
lowers the loss, resume is bit-identical (0 and 2 workers), NaN stops cleanly, supervised + LRC
reads labels, grid regions work."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lrcseg.config import (
    AugmentConfig,
    DistributedConfig,
    LRCConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
    SuperpixelConfig,
)
from lrcseg.errors import ConfigError, TrainingDiverged
from lrcseg.losses.lrc import LRCLoss
from lrcseg.models.load import load_checkpoint
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train import pretrain as pretrain_module
from lrcseg.train.pretrain import pretrain
from lrcseg.train.pretrain_data import build_pretrain_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(pretrain_phantoms, out, method="moco", lrc=True, steps=4, **run) -> PretrainConfig:
    run = {"steps": steps, "batch_size": 4, "device": "cpu", "log_every": 1,
           "checkpoint_every": 100, "cache_dir": pretrain_phantoms["cache"], "out": str(out), **run}
    return PretrainConfig(
        data=[] if method == "supervised" else [pretrain_phantoms["data"]],
        labels=pretrain_phantoms["data"] if method == "supervised" else None,
        method=method, run=RunConfig(**run),
        preprocess=PreprocessConfig(spacing_mm=4.0),
        augment=AugmentConfig(image_size=64),
        model=ModelConfig(backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8), proj_dim=16),
        moco=MocoConfig(queue_size=16),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        lrc=LRCConfig(enabled=lrc),
    )


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,lrc", [
    ("moco", False), ("simclr", True), ("simclr", False), ("byol", True), ("byol", False),
    ("none", True), ("supervised", False),
])
def test_each_method_runs_with_and_without_lrc(pretrain_phantoms, tmp_path, method, lrc):
    run_dir = pretrain(make_cfg(pretrain_phantoms, tmp_path / "run", method, lrc, steps=2), progress=False)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss/total"])
        assert ("loss/lrc" in row) == lrc
        assert ("loss/global" in row) == (method != "none")
    state = load_checkpoint(run_dir / "final.pt")
    assert state["step"] == 2 and state["config"]["method"] == method


def test_supervised_plus_lrc_reads_labels_and_logs_both_terms(pretrain_phantoms, tmp_path):
    cfg = make_cfg(pretrain_phantoms, tmp_path / "run", "supervised", True, steps=3)
    run_dir = pretrain(cfg, progress=False)
    rows = metrics(run_dir)
    for row in rows:
        # L = L_seg + lambda L_LRC, each logged
        assert row["loss/total"] == pytest.approx(row["loss/global"] + row["loss/lrc"], rel=1e-5)
        assert row["loss/global"] > 0 and row["loss/lrc"] > 0
        # organ labels reached the views
        assert 0 <= row["lrc/neg_same_organ"] <= row["lrc/neg_same_organ"] + row["lrc/neg_background"] <= 1
    card = json.loads((run_dir / "run_card.json").read_text())
    source = card["data_sources"][0]
    assert source["cases"] == ["phantom_001"]  # the labelled "train" split, never test
    state = load_checkpoint(run_dir / "final.pt")
    head = state["global_objective"]["head.0.weight"]
    assert head.shape[0] == 10  # phantom label ids 0..9 from dataset.json


def test_supervised_needs_labels_and_labels_need_supervised(pretrain_phantoms, tmp_path):
    cfg = make_cfg(pretrain_phantoms, tmp_path / "a", "supervised")
    cfg.labels = None
    with pytest.raises(ConfigError, match="--labels"):
        pretrain(cfg, progress=False)
    cfg = make_cfg(pretrain_phantoms, tmp_path / "b", "moco")
    cfg.labels = pretrain_phantoms["data"]
    with pytest.raises(ConfigError, match="only used by --method supervised"):
        pretrain(cfg, progress=False)


def test_sync_bn_is_refused_on_cpu(pretrain_phantoms, tmp_path):
    cfg = make_cfg(pretrain_phantoms, tmp_path / "run")
    cfg.distributed = DistributedConfig(sync_bn=True)
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA"):
        pretrain(cfg, progress=False)


def test_grid_regions_run(pretrain_phantoms, tmp_path):
    cfg = make_cfg(pretrain_phantoms, tmp_path / "run", "none", True, steps=2)
    cfg.superpixels = SuperpixelConfig(method="grid", grid_cell_mm=64.0)
    rows = metrics(pretrain(cfg, progress=False))
    assert all(row["lrc/valid_regions"] >= 2 for row in rows)  # 16 px cells, >= 4 px each at 1/4


@pytest.mark.slow
def test_short_run_lowers_simclr_and_lrc_losses(pretrain_phantoms, tmp_path):
    cfg = make_cfg(pretrain_phantoms, tmp_path / "run", "simclr", True, steps=24)
    cfg.optim = OptimConfig(lr=2e-3, warmup_steps=0)
    rows = metrics(pretrain(cfg, progress=False))
    for key in ("loss/lrc", "loss/global"):
        values = [r[key] for r in rows]
        first, last = sum(values[:6]) / 6, sum(values[-6:]) / 6
        assert last < first, (key, values)


def final_state(run_dir):
    state = load_checkpoint(run_dir / "final.pt")
    return {**{f"network.{k}": v for k, v in state["network"].items()},
            **{f"objective.{k}": v for k, v in state["global_objective"].items()}}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(pretrain_phantoms, tmp_path, workers):
    whole = pretrain(make_cfg(pretrain_phantoms, tmp_path / "whole", steps=4, workers=workers), progress=False)
    cfg = make_cfg(pretrain_phantoms, tmp_path / "split", steps=4, workers=workers)
    pretrain(cfg, progress=False, stop_at=2)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 2
    pretrain(cfg, resume=True, progress=False)
    a, b = final_state(whole), final_state(tmp_path / "split")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different
    # the logged losses agree too (same batches, same randomness)
    assert [r["loss/total"] for r in metrics(whole)] == [r["loss/total"] for r in metrics(tmp_path / "split")]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(pretrain_phantoms, tmp_path, monkeypatch):
    cfg = make_cfg(pretrain_phantoms, tmp_path / "run", steps=4)
    pretrain(cfg, progress=False, stop_at=2)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    original = LRCLoss.forward

    def nan_lrc(self, *args, **kwargs):
        loss, stats = original(self, *args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(pretrain_module.LRCLoss, "forward", nan_lrc)
    with pytest.raises(TrainingDiverged, match="non-finite loss between steps 2 and 3"):
        pretrain(cfg, resume=True, progress=False)
    assert ckpt.read_bytes() == before
    assert not (tmp_path / "run" / "final.pt").exists()


def test_moco_position_positives_train_and_fill_the_queue_groups(pretrain_phantoms, tmp_path):
    cfg = make_cfg(pretrain_phantoms, tmp_path / "run", "moco", False, steps=2)
    cfg.moco.position_partitions = 4
    run_dir = pretrain(cfg, progress=False)
    state = load_checkpoint(run_dir / "final.pt")
    groups = state["global_objective"]["queue.groups"]
    assert groups.shape == (16,) and groups.min() >= 0 and groups.max() <= 3  # 2 steps x 8 keys
    assert all(math.isfinite(row["loss/global"]) for row in metrics(run_dir))


def test_slices_know_their_relative_position(pretrain_phantoms):
    from lrcseg.data.slices import PretrainSlices

    data = build_pretrain_data(make_cfg(pretrain_phantoms, "unused"), progress=False).dataset
    assert isinstance(data, PretrainSlices)
    positions = [float(data[i]["position"]) for i in range(len(data))]
    assert min(positions) == 0.0 and max(positions) == 1.0
    first_volume = [p for (v, _), p in zip(data.index, positions, strict=True) if v == 0]
    assert first_volume == sorted(first_volume)  # increasing with z inside one volume


def test_supervised_lrc_also_draws_lrc_slices_from_unlabelled_data(pretrain_phantoms, tmp_path):
    other = write_phantom_dataset(tmp_path / "other", cases=3, seed=5, spacing_mm=(4.0, 4.0, 8.0),
                                  montage=False)
    cfg = make_cfg(pretrain_phantoms, tmp_path / "run", "supervised", True, steps=3)
    cfg.data = [str(other)]
    data = build_pretrain_data(cfg, progress=False)
    assert data.mixed_pool
    sources = [s["cases"] for s in data.sources]
    assert sources[0] == ["phantom_001"]  # the labelled train split of --labels
    assert len(sources[1]) >= 1  # the other dataset's pool, used without its labels
    labelled = [bool((data.dataset[i]["organs"] >= 0).any()) for i in range(len(data.dataset))]
    assert any(labelled) and not all(labelled)
    run_dir = pretrain(cfg, progress=False)
    assert all(math.isfinite(row["loss/global"]) and row["loss/lrc"] > 0 for row in metrics(run_dir))
    cfg.lrc.enabled = False
    with pytest.raises(ConfigError, match="only the LRC loss uses"):
        build_pretrain_data(cfg, progress=False)


def test_online_probe_is_logged_and_leaves_training_bit_identical(pretrain_phantoms, tmp_path):
    probe_data = write_phantom_dataset(tmp_path / "probe_ph", cases=4, seed=2,
                                       spacing_mm=(4.0, 4.0, 8.0), pretrain_fraction=0.25,
                                       train_fraction=0.5, montage=False)
    plain = pretrain(make_cfg(pretrain_phantoms, tmp_path / "plain", "moco", True, steps=4), progress=False)
    cfg = make_cfg(pretrain_phantoms, tmp_path / "probed", "moco", True, steps=4)
    cfg.probe.dataset, cfg.probe.every, cfg.probe.pixels = str(probe_data), 2, 500
    probed = pretrain(cfg, progress=False)
    rows = metrics(probed)
    scored = [r for r in rows if "probe/mean_dice" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert all(0.0 <= r["probe/mean_dice"] <= 1.0 for r in scored)
    assert [r["loss/total"] for r in metrics(plain)] == [r["loss/total"] for r in rows]
    a, b = load_checkpoint(plain / "final.pt"), load_checkpoint(probed / "final.pt")
    assert all(torch.equal(a["network"][k], b["network"][k]) for k in a["network"])


def test_resume_refuses_a_different_network_and_records_a_longer_budget(pretrain_phantoms, tmp_path):
    import yaml

    from lrcseg.errors import DataWarning

    cfg = make_cfg(pretrain_phantoms, tmp_path / "run", "moco", False, steps=4)
    run_dir = pretrain(cfg, progress=False, stop_at=2)
    other = make_cfg(pretrain_phantoms, tmp_path / "run", "moco", False, steps=4)
    other.model.backbone = "resnet18"
    with pytest.raises(ConfigError, match="model.backbone 'resnet10' -> 'resnet18'"):
        pretrain(other, resume=True, progress=False)
    longer = make_cfg(pretrain_phantoms, tmp_path / "run", "moco", False, steps=5)
    with pytest.warns(DataWarning, match="run.steps 4 -> 5"):
        pretrain(longer, resume=True, progress=False)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["steps"] == 5
    assert load_checkpoint(run_dir / "final.pt")["step"] == 5
