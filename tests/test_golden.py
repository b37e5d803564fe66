"""Refactoring guard: a short MoCo + LRC pre-training and a fine-tune initialised from it end
with the weights recorded on the code before the issue-16 restructuring (values below were
produced by commit 5e25990 on a 2-core Intel Xeon VM). A change of behaviour anywhere on the
path (data, superpixels, augmentation, sampling, losses, optimiser, schedule, checkpoint
loading) moves these sums by far more than the tolerance.

Another CPU's float kernels move them too: on a 2-core AMD EPYC VM the same code gives sums
0.03% (pre-training) and 0.5% (fine-tuning) away from the Intel record, bit-identically on
every run. So each stage keeps one record per CPU kind seen; the AMD EPYC one was measured on
276c4d9 (after the restructuring, so on that CPU it guards later changes only)."""

from __future__ import annotations

import pytest
import torch

from lrcseg.config import (
    AugmentConfig,
    FinetuneConfig,
    LRCConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
)
from lrcseg.models.load import load_checkpoint, resolve_checkpoint
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train.finetune import finetune
from lrcseg.train.pretrain import pretrain

RECORDED = {  # one record per CPU kind: Intel Xeon (5e25990), AMD EPYC (276c4d9; its MoCo-state
    # sums equal the Intel ones within the tolerance, so those two entries repeat them)
    # network (sum, squares), MoCo state (sum, squares)
    "pretrain": [(5436.966345587754, 9879.878992210615, 5191.658784398345, 9594.714730172842),
                 (5438.838991391046, 9880.861696759279, 5191.658784398345, 9594.714730172842)],
    "finetune": [(5657.841697029466, 10998.85126945385),
                 (5632.013231857807, 10925.5720021694)],
}


def fingerprint(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(sum, sum of squares) over every floating tensor, in float64, keys in sorted order."""
    total = squares = 0.0
    for key in sorted(state):
        value = state[key]
        if torch.is_floating_point(value):
            value = value.double()
            total += float(value.sum())
            squares += float((value * value).sum())
    return total, squares


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("golden")
    data = write_phantom_dataset(root / "ph", cases=4, seed=1, spacing_mm=(4.0, 4.0, 8.0),
                                 pretrain_fraction=0.25, train_fraction=0.5, montage=False)
    cache = str(root / "cache")
    model = ModelConfig(backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8), proj_dim=16)
    pre = pretrain(PretrainConfig(
        data=[str(data)], method="moco",
        run=RunConfig(steps=6, batch_size=4, device="cpu", log_every=1, checkpoint_every=100,
                      cache_dir=cache, out=str(root / "pre"), seed=3),
        preprocess=PreprocessConfig(spacing_mm=4.0), augment=AugmentConfig(image_size=64),
        model=model, moco=MocoConfig(queue_size=16), optim=OptimConfig(lr=1e-3, warmup_steps=2),
        lrc=LRCConfig(enabled=True)), progress=False)
    fine = finetune(FinetuneConfig(
        dataset=str(data), init=str(pre), labeled=1,
        run=RunConfig(out=str(root / "ft"), steps=10, batch_size=4, seed=2, device="cpu",
                      cache_dir=cache, checkpoint_every=1000, log_every=5),
        preprocess=PreprocessConfig(spacing_mm=4.0), model=model, image_size=64,
        optim=OptimConfig(lr=1e-3, warmup_steps=3)), progress=False)
    yield {"pretrain": pre, "finetune": fine}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_weights_match_the_values_recorded_before_the_restructuring(runs, stage):
    state = load_checkpoint(resolve_checkpoint(runs[stage], stage))
    if stage == "pretrain":  # the network and MoCo's key encoder and queue
        got = fingerprint(state["network"]) + fingerprint(state["global_objective"])
    else:
        got = fingerprint(state["model"])
    assert any(got == pytest.approx(record, rel=1e-5, abs=1e-6) for record in RECORDED[stage]), (
        f"{stage} weights {got} match none of the records {RECORDED[stage]}")
