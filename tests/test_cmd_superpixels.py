"""`lrcseg superpixels` end to end on a tiny labelled phantom dataset (real NIfTI files)."""

from __future__ import annotations

import json

import pytest

from lrcseg.cli import main
from lrcseg.phantoms.generate import write_phantom_dataset

SHAPE = (100, 75, 6)  # 400 x 300 x 75 mm: dome down through the upper abdomen
SPACING = (4.0, 4.0, 15.0)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "Dataset901_Tiny"
    write_phantom_dataset(out, 2, seed=4, spacing_mm=SPACING, shape=SHAPE, montage=False)
    return out


@pytest.mark.slow
def test_superpixels_command_writes_summary_and_overlays(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "sp_out"
    rc = main(["superpixels", "--data", str(tiny_dataset), "--out", str(out), "--spacing", "3",
               "--workers", "1", "--overlays", "3"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    for key in ("slices", "regions_min", "regions_median", "regions_max", "asa", "boundary_recall",
                "seconds", "slices_per_s", "overlays", "cache_key", "region_size_median_mm2"):
        assert key in summary, key
    assert summary["cases"] == 2 and summary["slices"] == 2 * SHAPE[2]
    # 400 x 300 mm at 3 mm with min_size 110 mm^2 (about 12 px): tens of regions, not thousands
    assert 1 <= summary["regions_min"] <= summary["regions_median"] <= summary["regions_max"] <= 400
    assert summary["regions_median"] >= 5
    assert summary["labelled_slices"] >= 2
    assert 0.5 <= summary["asa"] <= 1.0  # regions mostly inside one organ
    assert 0.0 <= summary["boundary_recall"] <= 1.0
    assert summary["slices_per_s"] > 0
    assert len(summary["overlays"]) == 3
    for name in summary["overlays"]:
        assert name.endswith(".png") and (out / name).stat().st_size > 2_000


def test_superpixels_command_on_empty_folder_fails_naming_the_path(tmp_path, capsys):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    out = tmp_path / "never_written"
    rc = main(["superpixels", "--data", str(empty), "--out", str(out), "--workers", "1"])
    assert rc == 1
    assert str(empty) in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_superpixels_takes_its_settings_from_a_pretraining_config_and_flags_win(
        tiny_dataset, tmp_path, capsys):
    """--config configs/pretrain_cpu.yaml previews the regions training uses (its scale, min
    size and spacing, not the command's defaults); a flag given beside it overrides it."""
    from pathlib import Path

    import yaml

    preset = Path(__file__).resolve().parents[1] / "configs" / "pretrain_cpu.yaml"
    want = yaml.safe_load(preset.read_text())
    out = tmp_path / "sp_cfg"
    rc = main(["superpixels", "--data", str(tiny_dataset), "--out", str(out), "--config",
               str(preset), "--sigma", "0.5", "--workers", "1", "--overlays", "1",
               "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "superpixels" not in captured.err  # --no-progress: no tqdm bar
    summary = json.loads((out / "summary.json").read_text())
    assert summary["superpixels"]["scale"] == want["superpixels"]["scale"] != 100.0
    assert summary["superpixels"]["min_size_mm2"] == want["superpixels"]["min_size_mm2"]
    assert summary["preprocess"]["spacing_mm"] == want["preprocess"]["spacing_mm"]
    assert summary["superpixels"]["sigma"] == 0.5  # the flag
    text = (out / "summary.txt").read_text()
    assert text == captured.out  # what it printed is what it wrote
    assert f"scale {want['superpixels']['scale']:g}" in text and "sigma 0.5" in text
    assert f"median {summary['regions_median']:g}" in text and "ASA " in text
    assert "{" not in text  # lines, not JSON


def test_superpixels_config_with_an_invalid_value_names_the_file(tiny_dataset, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("superpixels:\n  scale: -3\n")
    rc = main(["superpixels", "--data", str(tiny_dataset), "--out", str(tmp_path / "o"),
               "--config", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err and "scale" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
