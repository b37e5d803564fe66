"""Issue 15, environment faults and unsafe outputs: one line and exit 2 at the CLI, nothing
half-written, outputs readable under the umask, masks not silently replaced.

A full disk is made real with RLIMIT_FSIZE: past the limit every write fails with EFBIG, as it
fails with ENOSPC on a full disk (same code paths: a short write inside torch or numpy).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_finetuned_run

from lrcseg.cli import main
from lrcseg.config import ModelConfig, PretrainConfig, to_dict
from lrcseg.data.readers import write_nifti
from lrcseg.io_utils import atomic_dir, atomic_save, atomic_write_json, atomic_write_text
from lrcseg.train.checkpoint import save_checkpoint
from lrcseg.train.runlog import RunLogger, read_metrics

TINY = ModelConfig(backbone="resnet10", decoder_channels=(16, 8, 8, 8, 8), proj_dim=8)
LABELS = {"background": 0, "liver": 1}


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG (SIGXFSZ ignored) inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def pretrain_run(tmp_path) -> Path:
    """A finished pre-training run folder of a tiny network (no training)."""
    from lrcseg.models.pretrain_net import PretrainNetwork

    cfg = PretrainConfig(data=["unused"], model=TINY)
    net = PretrainNetwork(cfg.model, cfg.preprocess.in_channels)
    run = tmp_path / "pre"
    run.mkdir()
    save_checkpoint(run, {"step": 3, "kind": "pretrain", "config": to_dict(cfg),
                          "network": net.state_dict()}, final=True)
    return run


@pytest.fixture
def finetuned(tmp_path) -> Path:
    """A fine-tuning run folder with a tiny untrained U-Net (final.pt as finetune writes it)."""
    return write_finetuned_run(tmp_path / "ft", TINY, LABELS, spacing_mm=4.0)


@pytest.fixture
def ct(tmp_path) -> Path:
    hu = np.full((16, 12, 3), -1000.0, np.float32)
    hu[4:12, 3:9] = 40.0
    path = tmp_path / "scans" / "ct.nii.gz"
    write_nifti(path, hu, np.diag([4.0, 4.0, 8.0, 1.0]))
    return path


# --------------------------------------------------------------------------- the CLI boundary


def test_full_disk_during_export_is_one_line_exit_2_and_leaves_nothing(pretrain_run, tmp_path,
                                                                      capsys):
    out = tmp_path / "exp" / "unet.pt"
    out.parent.mkdir()
    with file_size_limit(64 * 1024):  # torch.save to a path: RuntimeError "unexpected pos"
        assert main(["export", str(pretrain_run), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert err == f"lrcseg export: error: {out}: File too large (EFBIG)"
    assert list(out.parent.iterdir()) == []


def test_full_disk_during_checkpoint_names_the_file_and_leaves_no_temporary(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with file_size_limit(64 * 1024), pytest.raises(OSError) as exc:
        save_checkpoint(run, {"w": torch.zeros(100_000)})
    assert exc.value.errno == 27 and exc.value.filename == str(run / "checkpoint.pt")
    assert list(run.iterdir()) == []


def test_full_disk_during_predict_is_one_line_exit_2(finetuned, ct, tmp_path, capsys):
    out = tmp_path / "masks" / "ct.nii.gz"
    out.parent.mkdir()
    with file_size_limit(16):  # smaller than any NIfTI file
        assert main(["predict", "--model", str(finetuned), "--input", str(ct), "--output",
                     str(out), "--no-progress", "--device", "cpu"]) == 2
    assert one_error_line(capsys) == f"lrcseg predict: error: {out}: File too large (EFBIG)"
    assert list(out.parent.iterdir()) == []


def test_not_a_directory_is_one_line_exit_2(pretrain_run, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    out = blocker / "sub" / "unet.pt"
    assert main(["export", str(pretrain_run), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert err.startswith("lrcseg export: error: ") and str(blocker / "sub") in err
    assert err.endswith("Not a directory (ENOTDIR)")


def test_pretrain_out_naming_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a run")
    assert main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(blocker),
                 "--no-progress"]) == 1
    assert "--out names a file, not a run folder" in one_error_line(capsys)
    assert blocker.read_text() == "not a run"


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_resume_without_a_checkpoint_says_so(tmp_path, capsys, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([command, "--out", str(empty), "--resume", "--no-progress"]) == 1
    err = one_error_line(capsys)
    assert "no checkpoint to resume" in err and "cannot read config" not in err
    crashed = tmp_path / "crashed"  # disk full at the first checkpoint
    crashed.mkdir()
    (crashed / "config.yaml").write_text("run: {steps: 10}\n")
    (crashed / "run_card.json").write_text("{}")
    (crashed / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    assert main([command, "--out", str(crashed), "--resume", "--no-progress"]) == 1
    assert "stopped before its first checkpoint; run it again without --resume" in \
        one_error_line(capsys)


# --------------------------------------------------------------------------- predict outputs


def test_predict_does_not_replace_an_existing_mask_without_overwrite(finetuned, ct, tmp_path,
                                                                     capsys):
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"somebody's mask")
    args = ["predict", "--model", str(finetuned), "--input", str(ct), "--output", str(out),
            "--no-progress", "--device", "cpu"]
    assert main(args) == 1
    assert f"{out}: already exists; pass --overwrite" in one_error_line(capsys)
    assert out.read_bytes() == b"somebody's mask"
    assert main([*args, "--overwrite"]) == 0
    assert nib.load(out).shape == (16, 12, 3)
    folder = tmp_path / "masks"
    assert main([*args[:6], str(folder), *args[7:]]) == 0
    assert main([*args[:6], str(folder), *args[7:]]) == 1  # masks/ct.nii.gz is there now
    assert f"{folder / 'ct.nii.gz'}: already exists" in capsys.readouterr().err


def test_predict_prints_data_warnings_as_one_line_each(finetuned, tmp_path, capsys):
    affine = np.diag([4.0, 4.0, 8.0, 1.0])
    angle = np.radians(25)
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                               [0, np.sin(angle), np.cos(angle)]]) @ np.diag([4.0, 4.0, 8.0])
    hu = np.full((16, 12, 3), -1000.0, np.float32)
    hu[4:12, 3:9] = 40.0
    scan = tmp_path / "oblique.nii.gz"
    write_nifti(scan, hu, affine)
    assert main(["predict", "--model", str(finetuned), "--input", str(scan), "--output",
                 str(tmp_path / "m.nii.gz"), "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lrcseg predict: warning: {scan}: oblique grid: voxel axes up to 25.0 deg off "
                   "the scanner axes; slices are taken along the voxel grid (not resampled to "
                   "axial), so the 2D model sees tilted slices"]


# --------------------------------------------------------------------------- umask


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "x: 1\n")
        atomic_write_json(tmp_path / "labels.json", LABELS)
        write_nifti(tmp_path / "mask.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))
        save_checkpoint(tmp_path / "run", {"step": 1}, final=True)
        atomic_save(tmp_path / "figure.png", lambda tmp: tmp.write_bytes(b"png"))
        with atomic_dir(tmp_path / "cache") as tmp:
            np.save(tmp / "image.npy", np.zeros(3))
    finally:
        os.umask(previous)
    files = ["config.yaml", "labels.json", "mask.nii.gz", "run/final.pt", "run/checkpoint.pt",
             "figure.png", "cache/image.npy"]
    for name in files:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    for name in ["run", "cache"]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o777 & ~umask, name
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


# --------------------------------------------------------------------------- metrics.jsonl


def test_torn_last_metrics_line_is_skipped_and_dropped_on_resume(tmp_path):
    rows = [{"step": s, "time": 0.1 * s, "loss": 1.0 / s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "time": 0.4, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_metrics(tmp_path) == rows
    logger = RunLogger(tmp_path, start_step=2)  # --resume from the checkpoint at step 2
    logger.log(3, {"loss": 0.25})
    logger.close()
    got = read_metrics(tmp_path)
    assert got[:2] == rows[:2] and [r["step"] for r in got] == [1, 2, 3] and got[2]["loss"] == 0.25
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_disk_full_at_the_first_checkpoint_leaves_a_folder_a_rerun_reuses(tmp_path, capsys):
    from lrcseg.phantoms.generate import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", cases=2, seed=0, spacing_mm=(6.0, 6.0, 12.0),
                                 montage=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "run: {steps: 2, batch_size: 4, device: cpu, log_every: 1, checkpoint_every: 1}\n"
        "preprocess: {spacing_mm: 6.0}\naugment: {image_size: 64}\nsuperpixels: {method: grid}\n"
        "model: {backbone: resnet10, decoder_channels: [16, 8, 8, 8, 8], proj_dim: 8}\n"
        "moco: {queue_size: 8}\noptim: {warmup_steps: 0}\n")
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(config), "--data", str(data), "--out", str(run),
            "--no-progress"]
    with file_size_limit(4 * 2**20):  # caches and logs fit, a checkpoint does not
        assert main(args) == 2
    assert one_error_line(capsys) == \
        f"lrcseg pretrain: error: {run / 'checkpoint.pt'}: File too large (EFBIG)"
    assert not (run / "checkpoint.pt").exists() and (run / "config.yaml").is_file()
    assert main([*args, "--resume"]) == 1
    assert "stopped before its first checkpoint" in one_error_line(capsys)
    assert main(args) == 0  # the rerun reuses the folder
    assert (run / "final.pt").is_file()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
