"""What a run folder records beyond scalars: the clock continues across --resume
(metrics.jsonl, TensorBoard, run card), image summaries and the hparams table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrcseg.config import (
    AugmentConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
)
from lrcseg.models.load import load_checkpoint
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.runtime import cpu_model
from lrcseg.train import runlog
from lrcseg.train.pretrain import pretrain
from lrcseg.train.runlog import RunLogger, read_metrics


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def events(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0,
                                                               "tensors": 0})
    acc.Reload()
    return acc


def test_resumed_logger_continues_the_clock(tmp_path, monkeypatch):
    clock = FakeClock(1000.0)
    monkeypatch.setattr(runlog.time, "time", clock)
    (tmp_path / "run_card.json").write_text("{}")
    first = RunLogger(tmp_path)
    clock.now = 1010.0
    first.log(10, {"loss": 1.0})
    saved = first.clock()  # what the checkpoint at step 10 stores
    clock.now = 1012.5
    first.log(12, {"loss": 0.9})  # after the checkpoint: dropped on resume
    first.close()
    clock.now = 5000.0  # the run was down for an hour
    second = RunLogger(tmp_path, start_step=10, clock=saved)
    clock.now = 5004.0
    second.log(14, {"loss": 0.8})
    second.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["time"]) for r in rows] == [(10, 10.0), (14, 14.0)]
    scalars = events(tmp_path).Scalars("loss")
    assert [(s.step, s.wall_time - 1000.0) for s in scalars] == [(10, 10.0), (14, 14.0)]
    assert json.loads((tmp_path / "run_card.json").read_text())["wall_seconds"] == 14.0


def test_checkpoint_without_a_clock_continues_from_the_last_row(tmp_path, monkeypatch):
    clock = FakeClock(0.0)
    monkeypatch.setattr(runlog.time, "time", clock)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "time": 42.0}\n{"step": 9, "time": 80.0}\n')
    clock.now = 100.0
    logger = RunLogger(tmp_path, start_step=5)
    clock.now = 103.0
    logger.log(6, {"loss": 1.0})
    logger.close()
    assert [(r["step"], r["time"]) for r in read_metrics(tmp_path)] == [(5, 42.0), (6, 45.0)]


def test_images_and_hparams_reach_the_event_file(tmp_path):
    logger = RunLogger(tmp_path)
    logger.log_hparams({"optim": {"lr": 1e-3}, "model": {"backbone": "resnet18"},
                        "labels": None}, ["loss/total"])
    view = torch.rand(3, 1, 32, 32)
    regions = torch.arange(32 * 32).reshape(1, 32, 32).repeat(3, 1, 1) // 128 + 1
    logger.log_view_pairs(0, view, regions, view.flip(-1), regions.flip(-1), pairs=2)
    logits = torch.zeros(2, 3, 32, 32)
    logits[:, 2, :16] = 1.0
    logger.log_prediction(7, view[:2], torch.ones(2, 32, 32, dtype=torch.long), logits)
    logger.close()
    acc = events(tmp_path)
    assert sorted(acc.Tags()["images"]) == ["finetune/prediction", "pretrain/views"]
    views = acc.Images("pretrain/views")
    assert [(e.step, e.height, e.width) for e in views] == [(0, 2 * 32 + 2, 4 * 32 + 3 * 2)]
    prediction = acc.Images("finetune/prediction")
    assert [(e.step, e.height, e.width) for e in prediction] == [(7, 32, 3 * 32 + 2 * 2)]
    content = acc.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info",
                            "_hparams_/session_end_info"}
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["optim/lr"].number_value == pytest.approx(1e-3)
    assert hparams["model/backbone"].string_value == "resnet18"
    assert hparams["labels"].string_value == "none"


def test_regions_picture_marks_boundaries_in_yellow():
    from lrcseg.viz import regions_rgb

    regions = np.zeros((8, 8), dtype=np.int64)
    regions[:4], regions[4:] = 1, 2  # (X, Y): a boundary between x = 3 and x = 4
    rgb = regions_rgb(np.full((8, 8), 0.5), regions)
    # radiological display: columns run along x reversed (x = 4 -> column 3, x = 3 -> 4); the
    # edge is drawn on the left pixel of each differing pair
    yellow = np.all(rgb == (255, 217, 0), axis=-1)
    assert yellow.any(axis=0).nonzero()[0].tolist() == [3]
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("runlog_phantoms")
    data = write_phantom_dataset(root / "ph", cases=3, seed=0, spacing_mm=(4.0, 4.0, 8.0),
                                 montage=False)
    return {"data": str(data), "cache": str(root / "cache")}


def tiny_pretrain(phantoms, out, steps: int) -> PretrainConfig:
    return PretrainConfig(
        data=[phantoms["data"]], method="moco",
        run=RunConfig(out=str(out), steps=steps, batch_size=4, device="cpu", log_every=1,
                      checkpoint_every=100, image_every=2, cache_dir=phantoms["cache"]),
        preprocess=PreprocessConfig(spacing_mm=4.0), augment=AugmentConfig(image_size=64),
        model=ModelConfig(backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8), proj_dim=16),
        moco=MocoConfig(queue_size=16), optim=OptimConfig(lr=1e-3, warmup_steps=0))


def test_pretraining_logs_view_pairs_and_a_resume_keeps_its_time(phantoms, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_pretrain(phantoms, tmp_path / "run", steps=4)
    pretrain(cfg, progress=False, stop_at=2)
    stopped = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert stopped["clock"]["elapsed_s"] > 0
    pretrain(cfg, resume=True, progress=False)
    times = [r["time"] for r in read_metrics(tmp_path / "run")]
    assert len(times) == 4 and times == sorted(times) and times[2] > stopped["clock"]["elapsed_s"]
    acc = events(tmp_path / "run")
    assert [e.step for e in acc.Images("pretrain/views")] == [0, 2]  # at start, every 2 steps
    assert [s.step for s in acc.Scalars("loss/total")] == [1, 2, 3, 4]
    card = json.loads((tmp_path / "run" / "run_card.json").read_text())
    assert card["wall_seconds"] >= times[-1]
    assert card["machine"]["processor"] == cpu_model() != ""  # the CPU kind, for reproducibility
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
