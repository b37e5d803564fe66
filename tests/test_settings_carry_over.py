"""Settings carry over (issue 27 A.2, A.3): a pre-training run supplies what it fixes to a
fine-tuning from it, and run folders hold absolute paths, so ``--resume`` works from any
working directory. Through the CLI on tiny phantoms (real NIfTI files)."""

from __future__ import annotations

import os

import pytest
import yaml

from lrcseg.cli import main
from lrcseg.phantoms.generate import write_phantom_dataset

SPACING = 6.0
SMALL = ["--batch-size", "2", "--no-progress", "--device", "cpu", "--image-size", "32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A phantom dataset and a 2-step resnet10 pre-training at 6 mm, made with relative paths
    from the workspace folder (as a user types them)."""
    root = tmp_path_factory.mktemp("carry")
    write_phantom_dataset(root / "data", cases=3, seed=0, spacing_mm=(SPACING, SPACING, 12.0),
                          montage=False, pretrain_fraction=0.34, train_fraction=0.34)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["pretrain", "--data", "data", "--out", "pre", "--steps", "2",
                     "--backbone", "resnet10", "--spacing", str(SPACING), "--warmup-steps", "0",
                     "--cache-dir", "cache", *SMALL]) == 0
    finally:
        os.chdir(cwd)
    return root


def _config(run_dir) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_run_folders_record_absolute_paths(workspace):
    cfg = _config(workspace / "pre")
    assert cfg["data"] == [str(workspace / "data")]
    assert cfg["run"]["out"] == str(workspace / "pre")
    assert cfg["run"]["cache_dir"] == str(workspace / "cache")


def test_finetune_takes_backbone_and_spacing_from_the_initialising_run(workspace, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    out = tmp_path / "ft"
    rc = main(["finetune", "--dataset", "data", "--init", "pre", "--out", str(out),
               "--steps", "2", "--warmup-steps", "0", "--cache-dir", "cache", *SMALL])
    assert rc == 0, capsys.readouterr().err
    cfg = _config(out)
    assert cfg["model"]["backbone"] == "resnet10"  # not the default resnet50
    assert cfg["preprocess"]["spacing_mm"] == SPACING  # not the default 1.5
    assert cfg["init"] == str(workspace / "pre") and cfg["dataset"] == str(workspace / "data")


def test_an_explicit_conflict_with_the_initialising_run_is_refused(workspace, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    out = tmp_path / "ft"
    rc = main(["finetune", "--dataset", "data", "--init", "pre", "--out", str(out),
               "--steps", "2", "--backbone", "resnet18", "--cache-dir", "cache", *SMALL])
    err = capsys.readouterr().err
    assert rc == 1 and "resnet10" in err and "resnet18" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "final.pt").exists()


def test_print_config_shows_what_the_initialising_run_supplies(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    assert main(["finetune", "--dataset", "data", "--init", "pre", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["backbone"] == "resnet10" and cfg["preprocess"]["spacing_mm"] == SPACING


def test_resume_works_from_another_working_directory(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    assert main(["finetune", "--dataset", "data", "--init", "scratch", "--out", "ft_rel",
                 "--steps", "2", "--warmup-steps", "0", "--backbone", "resnet10", "--spacing",
                 str(SPACING), "--cache-dir", "cache", *SMALL]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    rc = main(["finetune", "--resume", "--out", str(workspace / "ft_rel"), "--steps", "3",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    steps = [yaml.safe_load(line)["step"]
             for line in (workspace / "ft_rel" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    assert not (elsewhere / "cache").exists()  # the recorded cache, not one under the new cwd
