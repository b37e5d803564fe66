"""DevicePrefetcher: the same batches as the plain loop (values, dtypes, order, structure),
the same pre-training losses with and without it, and the CUDA side-stream path."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lrcseg.config import (
    AugmentConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
)
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train import pretrain as pretrain_module
from lrcseg.train.common import ResumableSampler
from lrcseg.train.prefetch import DevicePrefetcher, batch_to_device


class _CompactItems(Dataset):
    """Items shaped like the slice datasets', plus nesting: float16 image, int32 regions,
    int16 labels, a float32 scalar, a list and a tuple of tensors, a plain number."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(1, 8, 8, generator=g).half(),
                "regions": torch.randint(0, 9, (8, 8), generator=g, dtype=torch.int32),
                "organs": torch.randint(-1, 4, (8, 8), generator=g).to(torch.int16),
                "position": torch.tensor(i / 10, dtype=torch.float32),
                "extra": [torch.full((2,), i, dtype=torch.float16), (torch.tensor(i), i)],
                "index": i}


def _loader(workers: int = 0) -> DataLoader:
    return DataLoader(_CompactItems(), batch_size=3, num_workers=workers,
                      sampler=ResumableSampler(10, seed=4))


def _plain(batch):
    """What the loops did before: every tensor to the device, float16 ones to float32."""
    if isinstance(batch, torch.Tensor):
        return batch.float() if batch.dtype == torch.float16 else batch
    if isinstance(batch, dict):
        return {k: _plain(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_plain(v) for v in batch)
    return batch


def _assert_identical(got, expected, device):
    assert type(got) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert got.device.type == device.type and got.dtype == expected.dtype
        assert torch.equal(got.cpu(), expected)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            _assert_identical(got[k], expected[k], device)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_identical(a, b, device)
    else:
        assert got == expected


def _check_batches(device: torch.device, workers: int = 0, steps: int = 7):
    expected = iter(_loader(workers))
    got = DevicePrefetcher(iter(_loader(workers)), device)
    for _ in range(steps):  # 7 batches of 3 over 10 items: crosses epochs of the sampler
        batch = next(got)
        _assert_identical(batch, _plain(next(expected)), device)
        assert batch["image"].dtype == torch.float32 and batch["regions"].dtype == torch.int32


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_identical_to_the_plain_loop_on_cpu(workers):
    _check_batches(torch.device("cpu"), workers)


def test_batch_to_device_keeps_structure_and_converts_only_float16():
    batch = {"a": torch.ones(2, dtype=torch.float16), "b": [torch.ones(1, dtype=torch.bfloat16)],
             "c": (torch.ones(1, dtype=torch.int16), "name")}
    out = batch_to_device(batch, torch.device("cpu"))
    assert out["a"].dtype == torch.float32 and out["b"][0].dtype == torch.bfloat16
    assert isinstance(out["b"], list) and isinstance(out["c"], tuple) and out["c"][1] == "name"
    assert out["c"][0].dtype == torch.int16


def test_stops_with_the_underlying_iterator():
    items = [torch.zeros(1, dtype=torch.float16), torch.ones(1, dtype=torch.float16)]
    got = list(DevicePrefetcher(iter(items), torch.device("cpu")))
    assert [t.tolist() for t in got] == [[0.0], [1.0]] and got[0].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side-stream path)")
def test_batches_identical_to_the_plain_loop_on_cuda():
    device = torch.device("cuda")
    _check_batches(device)
    # the loader pins memory on CUDA (make_loader): the non_blocking copies come from there
    pinned = DataLoader(_CompactItems(), batch_size=3, pin_memory=True,
                        sampler=ResumableSampler(10, seed=4))
    reference = iter(_loader())
    prefetched = DevicePrefetcher(iter(pinned), device)
    for _ in range(5):
        batch = next(prefetched)
        # a step that reads the batch while the next copy runs on the side stream
        total = (batch["image"] * 2).sum() + batch["regions"].sum()
        expected = _plain(next(reference))
        _assert_identical(batch, expected, device)
        assert total.item() == pytest.approx(float((expected["image"] * 2).sum()
                                                   + expected["regions"].sum()), rel=1e-6)


def _cfg(root, out, workers):
    return PretrainConfig(
        data=[str(root / "ph")], method="moco",
        run=RunConfig(steps=3, batch_size=4, device="cpu", log_every=1, checkpoint_every=100,
                      workers=workers, cache_dir=str(root / "cache"), out=str(out)),
        preprocess=PreprocessConfig(spacing_mm=4.0), augment=AugmentConfig(image_size=64),
        model=ModelConfig(backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8), proj_dim=16),
        moco=MocoConfig(queue_size=16), optim=OptimConfig(lr=1e-3, warmup_steps=0))


def _plain_batches(batches, device):
    """The loop without a prefetcher: each batch moved and converted when it is needed."""
    for batch in batches:
        yield {k: v.to(device).float() if v.dtype == torch.float16 else v.to(device)
               for k, v in batch.items()}


def test_pretraining_losses_identical_with_and_without_the_prefetcher(tmp_path, monkeypatch):
    write_phantom_dataset(tmp_path / "ph", cases=2, seed=0, spacing_mm=(4.0, 4.0, 8.0),
                          montage=False)

    def losses(name):
        run_dir = pretrain_module.pretrain(_cfg(tmp_path, tmp_path / name, workers=0), progress=False)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith(("loss", "lrc", "grad"))} for r in rows]

    with_prefetcher = losses("prefetched")
    monkeypatch.setattr(pretrain_module, "DevicePrefetcher", _plain_batches)
    without = losses("plain")
    assert len(with_prefetcher) == 3 and "loss/lrc" in with_prefetcher[0]
    assert with_prefetcher == without
