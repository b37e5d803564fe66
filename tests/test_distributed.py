"""Data-parallel pieces on CPU with Gloo: gathered losses equal one process's loss over the
concatenated batch (values and gradients), the cross-rank key shuffle, gathered MoCo keys, and
a 2-process ``torchrun`` pre-training that completes and resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lrcseg.config import LRCConfig
from lrcseg.distributed import (
    concat_all_gather,
    gather_with_grad,
    shuffled_forward_across_ranks,
)
from lrcseg.losses.lrc import LRCLoss
from lrcseg.losses.simclr import nt_xent
from lrcseg.methods.moco import _GatheredQueue

B, D, H = 3, 8, 16  # per-rank batch, embedding width, region map side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_inputs():
    """The concatenated batch of 2 ranks: embeddings, local features, region maps."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = (F.normalize(torch.randn(2 * B, D, generator=g), dim=1) for _ in range(2))
    feat1, feat2 = (F.normalize(torch.randn(2 * B, D, 4, 4, generator=g), dim=1) for _ in range(2))
    regions = (torch.arange(H)[:, None] // 4 * 4 + torch.arange(H)[None] // 4 + 1).expand(2 * B, H, H)
    return z1, z2, feat1, feat2, regions.clone(), regions.flip(-1).clone()


def lrc_batch() -> LRCLoss:
    return LRCLoss(LRCConfig(temperature=0.1, num_regions=6, pixels_per_region=2, min_pixels=1,
                             negatives="batch", sampling="area"))


def _worker(rank: int, store: str, out_dir: str) -> None:
    # a file rendezvous: no port to pick (free_port()'s release-then-bind leaves a race)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mine = slice(rank * B, (rank + 1) * B)
        z1, z2, feat1, feat2, r1, r2 = global_inputs()
        z1, z2 = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
        simclr, _ = nt_xent(gather_with_grad(z1), gather_with_grad(z2), 0.2)
        simclr.backward()
        f1, f2 = feat1[mine].clone().requires_grad_(), feat2[mine].clone().requires_grad_()
        lrc, _ = lrc_batch()(gather_with_grad(f1), gather_with_grad(f2), concat_all_gather(r1[mine]),
                             concat_all_gather(r2[mine]), generator=torch.Generator().manual_seed(7))
        lrc.backward()
        # the cross-rank shuffle: BN-like encode (subtract the sub-batch mean)
        x = torch.arange(2 * B, dtype=torch.float32)[mine, None] * torch.ones(1, 2)
        keys = shuffled_forward_across_ranks(lambda t: t - t.mean(0), x, torch.Generator().manual_seed(3))
        identity = shuffled_forward_across_ranks(lambda t: t * 2, x, torch.Generator().manual_seed(3))
        queue = _GatheredQueue(dim=2, size=4 * B)
        queue.enqueue(torch.full((B, 2), float(rank)))
        torch.save({"simclr": simclr.detach(), "lrc": lrc.detach(), "z1_grad": z1.grad,
                    "f1_grad": f1.grad, "keys": keys, "identity": identity, "x": x,
                    "queue": queue.keys.clone(), "ptr": int(queue.ptr)},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results. On the 2-core CI VM, 2 of 4 full-suite runs (2026-12-02) had a rank
    abort during gloo's setup (SIGABRT, "terminate called without an active exception") with a
    TCP rendezvous on a free_port() port, while the file alone and the same suite again passed;
    the cause was not found. The ranks now meet through a file store (no port to race for), and
    a rank that dies by a signal still gets one more start with a fresh store. The results are
    asserted exactly below."""
    out = tmp_path_factory.mktemp("gloo")
    try:
        mp.spawn(_worker, args=(str(out / "store0"), str(out)), nprocs=2, join=True)
    except mp.ProcessExitedException:
        mp.spawn(_worker, args=(str(out / "store1"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_gathered_simclr_equals_single_process_loss_and_gradient(two_ranks):
    z1, z2, *_ = global_inputs()
    z1.requires_grad_()
    single, _ = nt_xent(z1, z2, 0.2)
    single.backward()
    for rank, res in enumerate(two_ranks):
        assert res["simclr"].item() == pytest.approx(single.item(), rel=1e-6)
        # all_gather's backward sums every rank's copy: x world size, undone by DDP's average
        assert torch.allclose(res["z1_grad"] / 2, z1.grad[rank * B:(rank + 1) * B], atol=1e-6)


def test_gathered_lrc_batch_negatives_equal_single_process_loss(two_ranks):
    _, _, feat1, feat2, r1, r2 = global_inputs()
    feat1.requires_grad_()
    single, _ = lrc_batch()(feat1, feat2, r1, r2, generator=torch.Generator().manual_seed(7))
    single.backward()
    assert single.item() > 0
    for rank, res in enumerate(two_ranks):
        assert res["lrc"].item() == pytest.approx(single.item(), rel=1e-6)
        assert torch.allclose(res["f1_grad"] / 2, feat1.grad[rank * B:(rank + 1) * B], atol=1e-6)


def test_cross_rank_shuffle_returns_own_rows_in_order(two_ranks):
    x_all = torch.cat([r["x"] for r in two_ranks])
    perm = torch.randperm(2 * B, generator=torch.Generator().manual_seed(3))
    shuffled = x_all[perm]
    encoded = torch.cat([shuffled[:B] - shuffled[:B].mean(0), shuffled[B:] - shuffled[B:].mean(0)])
    expected = encoded[torch.argsort(perm)]
    for rank, res in enumerate(two_ranks):
        assert torch.equal(res["identity"], 2 * res["x"])
        assert torch.allclose(res["keys"], expected[rank * B:(rank + 1) * B])


def test_gathered_queue_holds_every_ranks_keys(two_ranks):
    for res in two_ranks:
        assert res["queue"][:2 * B, 0].tolist() == [0.0] * B + [1.0] * B
        assert res["ptr"] == 2 * B


@pytest.mark.slow
def test_torchrun_two_cpu_processes_complete_and_resume(tmp_path):
    from lrcseg.phantoms.generate import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", cases=3, seed=0, spacing_mm=(4.0, 4.0, 8.0),
                                 montage=False)
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {backbone: resnet10, decoder_channels: [32, 16, 16, 8, 8], proj_dim: 16}\n"
        "moco: {queue_size: 32}\nrun: {log_every: 1, checkpoint_every: 100}\n"
        "optim: {warmup_steps: 0}\nlrc: {negatives: batch}\n")
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_port", str(free_port()), "-m", "lrcseg", "pretrain", "--out", str(out),
            "--no-progress", "--gather-negatives", "--device", "cpu"]
    first = base + ["--data", str(data), "--config", str(config), "--method", "moco",
                    "--steps", "2", "--batch-size", "2", "--image-size", "64", "--spacing", "4",
                    "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(first, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pre-training finished") == 1  # rank 0 only
    state = torch.load(out / "final.pt", weights_only=False)
    assert state["step"] == 2 and state["world_size"] == 2
    # gathered keys: 2 views x 2 per rank x 2 ranks = 8 keys per step, two steps
    assert int(state["global_objective"]["queue.ptr"]) == 16
    # resume: raise the step budget in the saved config and continue to step 3
    saved = (out / "config.yaml").read_text().replace("steps: 2", "steps: 3")
    (out / "config.yaml").write_text(saved)
    again = subprocess.run(base + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert torch.load(out / "final.pt", weights_only=False)["step"] == 3


def test_torchrun_two_cpu_processes_pretrain_in_3d(tmp_path):
    """3D as in 2D: two Gloo ranks pre-train MoCo + LRC on supervoxel boxes with gathered
    negatives; the queue holds every rank's keys."""
    from lrcseg.phantoms.generate import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", cases=3, seed=0, spacing_mm=(4.0, 4.0, 8.0),
                                 montage=False)
    out = tmp_path / "run3d"
    config = tmp_path / "tiny3d.yaml"
    config.write_text(
        "model: {backbone: resnet10, decoder_channels: [32, 16, 16, 8, 8], proj_dim: 16,"
        " spatial_dims: 3}\naugment: {patch_size: [32, 32, 32]}\nsuperpixels: {scale: 33.0}\n"
        "moco: {queue_size: 32}\nrun: {log_every: 1, checkpoint_every: 100}\n"
        "optim: {warmup_steps: 0}\nlrc: {enabled: true, negatives: batch}\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port", str(free_port()), "-m", "lrcseg", "pretrain", "--out", str(out),
               "--no-progress", "--gather-negatives", "--device", "cpu", "--data", str(data),
               "--config", str(config), "--method", "moco", "--steps", "2", "--batch-size", "2",
               "--spacing", "4", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(out / "final.pt", weights_only=False)
    assert state["step"] == 2 and state["world_size"] == 2
    assert state["config"]["model"]["spatial_dims"] == 3
    # gathered keys: 2 views x 2 per rank x 2 ranks = 8 keys per step, two steps
    assert int(state["global_objective"]["queue.ptr"]) == 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss/lrc"] > 0 for r in rows)
