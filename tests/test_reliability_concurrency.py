"""Issue 27 B: a run folder belongs to one process while it is written, SIGTERM is a Ctrl-C,
an interrupted checkpoint write says so, an interrupted prediction continues when rerun, and an
unknown device is one line. Real processes, real signals, real files."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import write_finetuned_run

import lrcseg
import lrcseg.evaluate.predict as predict_module
import lrcseg.io_utils as io_utils
from lrcseg.cli import main
from lrcseg.commands.predict import UNFINISHED
from lrcseg.config import ModelConfig
from lrcseg.data.readers import write_nifti
from lrcseg.errors import ConfigError
from lrcseg.evaluate.predict import is_complete_prediction
from lrcseg.locking import LOCK_NAME, own_folder
from lrcseg.models.load import load_checkpoint
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train.checkpoint import save_checkpoint
from lrcseg.train.loop import TrainingInterrupted, TrainingLoop
from lrcseg.train.runlog import read_metrics

TINY = ModelConfig(backbone="resnet10", decoder_channels=(16, 8, 8, 8, 8), proj_dim=8)
LABELS = {"background": 0, "liver": 1}
TINY_YAML = (
    "run: {batch_size: 4, device: cpu, log_every: 1, checkpoint_every: 1000}\n"
    "preprocess: {spacing_mm: 6.0}\naugment: {image_size: 64}\nsuperpixels: {method: grid}\n"
    "model: {backbone: resnet10, decoder_channels: [16, 8, 8, 8, 8], proj_dim: 8}\n"
    "moco: {queue_size: 8}\noptim: {warmup_steps: 0}\n")
# A child process runs the real CLI; with SLOW each training step first sleeps, so the test
# can reach it while it trains (the numerics are untouched).
CHILD = "import sys\n{patch}from lrcseg.cli import main\nsys.exit(main(sys.argv[1:]))\n"
SLOW = ("import time\nfrom lrcseg.train import pretrain as _p\n_step = _p.Pretraining.step\n"
        "def _slow(self, step):\n    time.sleep(0.5)\n    return _step(self, step)\n"
        "_p.Pretraining.step = _slow\n")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    data = write_phantom_dataset(root / "ph", cases=2, seed=0, spacing_mm=(6.0, 6.0, 12.0),
                                 montage=False)
    config = root / "tiny.yaml"
    config.write_text(TINY_YAML)
    return {"data": str(data), "config": str(config), "cache": str(root / "cache")}


@pytest.fixture
def one_thread():
    """The in-process runs use the child processes' single thread (same float kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pretrain_args(phantoms, out: Path, steps: int) -> list[str]:
    return ["pretrain", "--config", phantoms["config"], "--data", phantoms["data"], "--out",
            str(out), "--steps", str(steps), "--cache-dir", phantoms["cache"], "--no-progress"]


def child(args: list[str], patch: str = "") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(lrcseg.__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", CHILD.format(patch=patch), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def network_state(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run / "final.pt")
    return {**{f"network.{k}": v for k, v in state["network"].items()},
            **{f"objective.{k}": v for k, v in state["global_objective"].items()}}


# --------------------------------------------------------------------------- one owner per folder


def test_two_pretrainings_on_one_out_one_runs_the_other_is_refused(phantoms, tmp_path):
    run, steps = tmp_path / "run", 4
    started = {seed: child([*pretrain_args(phantoms, run, steps), "--seed", str(seed)], SLOW)
               for seed in (1, 2)}  # started together
    wait_for(lambda: any(p.poll() is not None for p in started.values()))
    loser = next(seed for seed, p in started.items() if p.poll() is not None)
    winner = 3 - loser
    owner = started[winner]
    refusal = (f"{run}: this folder is being written by another lrcseg process "
               f"(pid {owner.pid}); wait for it to finish or choose another --out")
    _, err = started[loser].communicate()
    assert started[loser].returncode == 1, err
    assert err.strip() == f"lrcseg pretrain: error: {refusal}"
    # --resume while it runs is refused too (before its config.yaml is even read)
    assert owner.poll() is None, "the first run ended before the test could reach it"
    again = child([*pretrain_args(phantoms, run, steps), "--resume"])
    _, err = again.communicate(timeout=120)
    assert again.returncode == 1 and err.strip() == f"lrcseg pretrain: error: {refusal}"
    assert owner.poll() is None
    _, err = owner.communicate(timeout=300)
    assert owner.returncode == 0, err
    # the folder describes the one run that wrote it
    config = yaml.safe_load((run / "config.yaml").read_text())
    final = load_checkpoint(run / "final.pt")
    card = json.loads((run / "run_card.json").read_text())
    assert config["run"]["seed"] == final["config"]["run"]["seed"] == winner
    assert card["command"][-2:] == ["--seed", str(winner)]
    assert [row["step"] for row in read_metrics(run)] == list(range(1, steps + 1))
    assert not (run / LOCK_NAME).exists()


def test_finetune_on_a_folder_another_process_owns_is_refused_and_touches_nothing(tmp_path,
                                                                                 capsys):
    run = tmp_path / "ft"
    args = ["finetune", "--dataset", str(tmp_path / "none"), "--out", str(run), "--no-progress"]
    with own_folder(run, create=True, hint="-"):
        for extra in ([], ["--resume"]):
            assert main([*args, *extra]) == 1
            assert one_error_line(capsys) == (
                f"lrcseg finetune: error: {run}: this folder is being written by another lrcseg "
                f"process (pid {os.getpid()}); wait for it to finish or choose another --out")
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
    assert not run.exists()  # made for the lock, removed with it


def test_a_killed_owner_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = child([], patch=(f"from lrcseg.locking import own_folder\nimport time\n"
                              f"with own_folder({str(run)!r}, create=True, hint='-'):\n"
                              "    print('held', flush=True)\n    time.sleep(120)\n"))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        with own_folder(run, create=True, hint="-"):
            pass
    holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
    holder.wait()
    assert (run / LOCK_NAME).read_text().strip() == str(holder.pid)
    with own_folder(run, create=False, hint="-"):
        assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert list(run.iterdir()) == []


def test_a_refused_new_run_leaves_no_folder_behind(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    assert main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(run),
                 "--device", "gpu", "--no-progress"]) == 1
    assert one_error_line(capsys) == ("lrcseg pretrain: error: --device gpu: unknown device; "
                                      "use auto, cpu, cuda, cuda:N or mps")
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- signals


def test_sigterm_checkpoints_at_a_step_boundary_and_resume_is_exact(phantoms, tmp_path,
                                                                    one_thread):
    run, steps = tmp_path / "run", 6
    proc = child(pretrain_args(phantoms, run, steps), SLOW)
    wait_for(lambda: len(read_metrics(run)) >= 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 2 <= step < steps and not (run / "final.pt").exists()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"lrcseg pretrain: interrupted: SIGTERM at step {step} of {steps}: the checkpoint of "
        f"step {step} is saved in {run}; continue with: lrcseg pretrain --out {run} --resume")
    assert [row["step"] for row in read_metrics(run)] == list(range(1, step + 1))
    assert main([*pretrain_args(phantoms, run, steps), "--resume"]) == 0
    assert main(pretrain_args(phantoms, tmp_path / "straight", steps)) == 0
    a, b = network_state(tmp_path / "straight"), network_state(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("to_group", [True, False])
def test_sigterm_with_loader_workers_checkpoints_and_exits(phantoms, tmp_path, to_group):
    """SIGTERM to the whole process group (a terminal, some schedulers) or to the main process
    only: with a DataLoader worker the main process stops at a step boundary with its
    checkpoint, and exits (a worker that ignored SIGTERM once hung the exit)."""
    run, steps = tmp_path / "run", 6
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(lrcseg.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(patch=SLOW),
                             *pretrain_args(phantoms, run, steps), "--workers", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: len(read_metrics(run)) >= 2 or proc.poll() is not None)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "DataLoader worker" not in err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 2 <= step < steps and err.strip().splitlines()[-1].startswith(
        f"lrcseg pretrain: interrupted: SIGTERM at step {step} of {steps}")


def test_a_second_signal_during_a_checkpoint_write_abandons_it_and_says_so(tmp_path,
                                                                           monkeypatch):
    """SIGTERM, then Ctrl-C while torch writes the checkpoint: the signal lands inside torch's
    C++ writer, which reported it as a failed write (EIO) before."""
    armed = {"write": False}

    class SignalledFile(io.FileIO):
        def write(self, data):
            if armed["write"]:
                armed["write"] = False
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(data)

    def opener(path, mode="r", *args, **kwargs):
        return SignalledFile(path, mode) if mode == "wb" else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(io_utils, "open", opener, raising=False)  # atomic_torch_save's open
    weights = {"w": torch.zeros(200_000)}
    saved = []

    def save(step: int, final: bool) -> None:
        save_checkpoint(tmp_path, {"step": step, **weights}, final=final)
        saved.append(step)

    def step_fn(step: int):
        if step == 2:  # SIGTERM during step 3 (1-based), a second signal in the next write
            os.kill(os.getpid(), signal.SIGTERM)
            armed["write"] = True
        return torch.tensor(1.0), 1

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    loop = TrainingLoop(tmp_path, 10, 0, save, log_every=100, checkpoint_every=2,
                        device=torch.device("cpu"), progress=False)
    with pytest.raises(TrainingInterrupted) as caught:
        loop.run(step_fn, lambda step, rate: 1.0)
    assert not armed["write"], "the second signal was not sent inside the write"
    assert saved == [2]
    assert str(caught.value) == (
        "SIGTERM, then a second signal while the checkpoint of step 3 was written: that write "
        f"was abandoned, nothing half-written is left; the checkpoint of step 2 in {tmp_path} "
        "stands")
    assert caught.value.signum == signal.SIGTERM and caught.value.checkpoint_step == 2
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous


# --------------------------------------------------------------------------- predict


@pytest.fixture
def finetuned(tmp_path) -> Path:
    """A fine-tuning run folder with a tiny untrained U-Net (final.pt as finetune writes it)."""
    return write_finetuned_run(tmp_path / "ft", TINY, LABELS, spacing_mm=4.0)


@pytest.fixture
def scans(tmp_path) -> Path:
    folder = tmp_path / "scans"
    for i in range(4):
        hu = np.full((16, 12 + i, 3), -1000.0, np.float32)
        hu[4:12, 3:9] = 40.0
        write_nifti(folder / f"ct{i}.nii.gz", hu, np.diag([4.0, 4.0, 8.0, 1.0]))
    return folder


def predict_args(model: Path, scans: Path, out: Path) -> list[str]:
    return ["predict", "--model", str(model), "--input", str(scans), "--output", str(out),
            "--no-progress", "--device", "cpu"]


def test_an_interrupted_prediction_continues_when_rerun(finetuned, scans, tmp_path, capsys,
                                                        monkeypatch, default_sigint):
    out = tmp_path / "masks"
    real = predict_module.predict_labels
    calls = []

    def ctrl_c_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the second mask is predicted
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_labels", ctrl_c_in_the_second)
    assert main(predict_args(finetuned, scans, out)) == 130
    assert capsys.readouterr().err.strip() == (
        f"lrcseg predict: interrupted: 1 of 4 masks in {out} are written; run the same command "
        "again to predict the rest")
    first = out / "ct0.nii.gz"
    assert sorted(p.name for p in out.iterdir()) == sorted([UNFINISHED, "ct0.nii.gz",
                                                            "labels.json"])
    assert json.loads((out / "labels.json").read_text()) == LABELS
    kept = first.stat().st_ino, first.stat().st_mtime_ns
    monkeypatch.setattr(predict_module, "predict_labels", real)
    assert main(predict_args(finetuned, scans, out)) == 0
    assert f"{out}: 1 of 4 masks already written, kept" in capsys.readouterr().out
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept
    assert sorted(p.name for p in out.iterdir()) == [*(f"ct{i}.nii.gz" for i in range(4)),
                                                     "labels.json"]
    for i in range(4):
        assert nib.load(out / f"ct{i}.nii.gz").shape == (16, 12 + i, 3)
    assert main(predict_args(finetuned, scans, out)) == 1  # finished: masks are not replaced
    assert f"{out / 'ct0.nii.gz'}: already exists (and 3 more); pass --overwrite" in \
        one_error_line(capsys)
    # --overwrite with another model, interrupted, then continued: no mask of the first model
    # is kept as if it were the second's
    other = tmp_path / "ft2"
    other.mkdir()
    (other / "final.pt").write_bytes((finetuned / "final.pt").read_bytes())
    before = {i: (out / f"ct{i}.nii.gz").stat().st_mtime_ns for i in range(4)}
    calls.clear()
    monkeypatch.setattr(predict_module, "predict_labels", ctrl_c_in_the_second)
    assert main([*predict_args(other, scans, out), "--overwrite"]) == 130
    capsys.readouterr()
    monkeypatch.setattr(predict_module, "predict_labels", real)
    assert main(predict_args(other, scans, out)) == 0
    assert f"{out}: 1 of 4 masks already written, kept" in capsys.readouterr().out
    assert all((out / f"ct{i}.nii.gz").stat().st_mtime_ns > before[i] for i in range(4))
    assert not (out / UNFINISHED).exists()


def test_an_unfinished_prediction_of_another_model_is_refused(finetuned, scans, tmp_path,
                                                             capsys):
    out = tmp_path / "masks"
    out.mkdir()
    (out / UNFINISHED).write_text(json.dumps({"model": {"path": "/elsewhere/final.pt"}}))
    (out / "ct0.nii.gz").write_bytes(b"a mask of another model")
    assert main(predict_args(finetuned, scans, out)) == 1
    assert one_error_line(capsys) == (
        f"lrcseg predict: error: {out}: holds an unfinished prediction by /elsewhere/final.pt "
        "(another model, or that model changed since); run it again with that --model to "
        "finish it, pass --overwrite to replace it, or choose another --output")
    assert (out / "ct0.nii.gz").read_bytes() == b"a mask of another model"
    assert main([*predict_args(finetuned, scans, out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [*(f"ct{i}.nii.gz" for i in range(4)),
                                                     "labels.json"]


def test_a_damaged_mask_of_an_unfinished_prediction_is_predicted_again(tmp_path):
    source = tmp_path / "ct.nii.gz"
    write_nifti(source, np.zeros((8, 6, 3), np.float32) - 1000, np.diag([4.0, 4.0, 8.0, 1.0]))
    mask = tmp_path / "mask.nii.gz"
    assert not is_complete_prediction(mask, source)
    write_nifti(mask, np.zeros((8, 6, 3), np.uint8), np.diag([4.0, 4.0, 8.0, 1.0]))
    assert is_complete_prediction(mask, source)
    whole = mask.read_bytes()
    mask.write_bytes(whole[: len(whole) - 12])  # a truncated gzip stream
    assert not is_complete_prediction(mask, source)
    write_nifti(mask, np.zeros((8, 5, 3), np.uint8), np.diag([4.0, 4.0, 8.0, 1.0]))
    assert not is_complete_prediction(mask, source)  # another grid


def test_predict_into_a_folder_another_process_owns_is_refused(finetuned, scans, tmp_path,
                                                              capsys):
    out = tmp_path / "masks"
    with own_folder(out, create=True, hint="-"):
        assert main(predict_args(finetuned, scans, out)) == 1
        assert one_error_line(capsys) == (
            f"lrcseg predict: error: {out}: this folder is being written by another lrcseg "
            f"process (pid {os.getpid()}); wait for it to finish or choose another --output")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize(("device", "message"), [
    ("gpu", "unknown device; use auto, cpu, cuda, cuda:N or mps"),
    ("xpu", "lrcseg does not run on 'xpu'; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:99", None),  # no CUDA here, or fewer devices
])
def test_an_unknown_or_missing_device_is_one_line(finetuned, scans, tmp_path, capsys, device,
                                                  message):
    args = predict_args(finetuned, scans, tmp_path / "masks")
    assert main([*args[:-1], device]) == 1
    err = one_error_line(capsys)
    assert err.startswith(f"lrcseg predict: error: --device {device}: ")
    if message is not None:
        assert err.endswith(message)
    assert not (tmp_path / "masks").exists()
