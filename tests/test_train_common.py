"""The shared training pieces: resumable sampler, per-step generators, schedule, run folders."""

from __future__ import annotations

import itertools

import pytest
import torch

from lrcseg.errors import ConfigError
from lrcseg.train.common import (
    ResumableSampler,
    prepare_run_dir,
    resolve_device,
    step_generator,
    warmup_cosine,
)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_epochs_are_permutations():
    stream = take(ResumableSampler(7, seed=3), 21)
    for e in range(3):
        assert sorted(stream[7 * e:7 * (e + 1)]) == list(range(7))
    assert stream[:7] != stream[7:14]  # epochs are reshuffled


def test_sampler_resumes_mid_epoch():
    full = take(ResumableSampler(5, seed=1), 23)
    for start in (0, 3, 5, 12):
        assert take(ResumableSampler(5, seed=1, start=start), 23 - start) == full[start:]


def test_sampler_replicas_partition_the_stream_and_resume():
    a = take(ResumableSampler(6, seed=0, rank=0, num_replicas=2), 6)
    b = take(ResumableSampler(6, seed=0, rank=1, num_replicas=2), 6)
    full = take(ResumableSampler(6, seed=0), 12)
    assert a == full[0::2] and b == full[1::2]
    assert take(ResumableSampler(6, seed=0, start=2, rank=1, num_replicas=2), 4) == b[2:]


def test_sampler_rejects_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        ResumableSampler(0, seed=0)


def test_step_generator_is_pure_function_of_seed_and_step():
    a = torch.rand(5, generator=step_generator(0, 10))
    b = torch.rand(5, generator=step_generator(0, 10))
    c = torch.rand(5, generator=step_generator(0, 11))
    d = torch.rand(5, generator=step_generator(1, 10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)


def test_prepare_run_dir_refuses_to_overwrite(tmp_path):
    run = prepare_run_dir(tmp_path / "run", resume=False)
    (run / "config.yaml").write_text("x: 1\n")
    with pytest.raises(ConfigError, match="--resume"):
        prepare_run_dir(run, resume=False)
    assert prepare_run_dir(run, resume=True) == run
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_run_dir(tmp_path / "missing", resume=True)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_final_state_is_stored_once_and_later_checkpoints_leave_it_alone(tmp_path):
    from lrcseg.train.checkpoint import load_checkpoint, save_checkpoint

    w = torch.arange(1000, dtype=torch.float32)
    save_checkpoint(tmp_path, {"step": 5, "w": w}, final=True)
    final, latest = tmp_path / "final.pt", tmp_path / "checkpoint.pt"
    assert final.stat().st_ino == latest.stat().st_ino  # one file, two names
    assert load_checkpoint(latest)["step"] == 5
    assert torch.equal(load_checkpoint(final)["w"], w)
    save_checkpoint(tmp_path, {"step": 7, "w": w + 1})  # e.g. a resumed, longer run
    assert load_checkpoint(latest)["step"] == 7 and load_checkpoint(final)["step"] == 5
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
