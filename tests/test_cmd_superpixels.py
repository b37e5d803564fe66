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


# --------------------------------------------------------------------------- --supervoxels


def test_supervoxels_command_writes_three_planes_and_a_summary(tiny_dataset, tmp_path, capsys):
    import numpy as np

    from lrcseg.config import PreprocessConfig, SuperpixelConfig
    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.slice_cache import SliceCache
    from lrcseg.superpixels.supervoxels import compute_supervoxels

    out, cache = tmp_path / "sv", tmp_path / "cache"
    argv = ["superpixels", "--data", str(tiny_dataset), "--out", str(out), "--supervoxels",
            "--spacing", "3", "--workers", "1", "--overlays", "1", "--no-progress",
            "--cache-dir", str(cache)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.txt").read_text() == printed
    # 400 x 300 x 90 mm at 3 x 3 x 15 mm: (X, Y, Z) = (133, 100, 6), planes through the centre
    names = ["supervoxels_phantom_000_axial_z003.png", "supervoxels_phantom_000_coronal_y050.png",
             "supervoxels_phantom_000_sagittal_x066.png"]
    assert summary["overlays"] == names
    for name in names:
        assert (out / name).stat().st_size > 2_000
    assert summary["superpixels"]["scale"] == 33.0  # the 3D default scale, not the 2D 100
    assert summary["cases"] == 2 and summary["computed_volumes"] == 2
    assert summary["voxels"] == 2 * 133 * 100 * 6 and summary["voxels_per_s"] > 0

    slices = SliceCache(PreprocessConfig(spacing_mm=3.0), cache)
    counts, body_ml = [], 0.0
    for case in load_dataset(tiny_dataset).cases:
        vol = slices.get(case)
        regions = compute_supervoxels(np.asarray(vol.image[:, 0], np.float32), vol.body,
                                      vol.spacing_mm, SuperpixelConfig(scale=33.0))
        counts.append(int(regions.max()))
        body_ml += int(np.count_nonzero(vol.body)) * 3.0 * 3.0 * 15.0 / 1000.0
    assert summary["regions_min"] == min(counts) and summary["regions_max"] == max(counts) > 50
    assert summary["region_volume_mean_ml"] == pytest.approx(body_ml / sum(counts), abs=1e-4)
    assert f"mean region volume {summary['region_volume_mean_ml']:.3f} mL" in printed
    assert f"min {min(counts)}," in printed and "2 computed now" in printed

    assert main(argv) == 0  # the cache: nothing computed again, the same numbers
    again = json.loads((out / "summary.json").read_text())
    assert again["computed_volumes"] == 0 and again["voxels_per_s"] is None
    assert again["region_volume_mean_ml"] == summary["region_volume_mean_ml"]
    assert "0 computed now" in capsys.readouterr().out


def test_plane_sections_are_radiological_and_drawn_to_scale(tmp_path):
    import numpy as np

    from lrcseg.viz import plane_boundaries, plane_section

    z, x, y = np.meshgrid(np.arange(4), np.arange(5), np.arange(6), indexing="ij")
    coords = np.stack([x, y, z], axis=-1)  # (Z, X, Y, 3): each voxel's own (x, y, z)
    voxel = (1, 2, 3)
    sections = {plane: np.stack([plane_section(coords[..., i], plane, voxel) for i in range(3)],
                                axis=-1) for plane in ("axial", "coronal", "sagittal")}
    # axial z=3: rows anterior (y max) first, columns patient right (x max) first
    assert sections["axial"].shape == (6, 5, 3) and tuple(sections["axial"][0, 0]) == (4, 5, 3)
    assert tuple(sections["axial"][-1, -1]) == (0, 0, 3)
    # coronal y=2: rows superior (z max) first, columns patient right first
    assert sections["coronal"].shape == (4, 5, 3) and tuple(sections["coronal"][0, 0]) == (4, 2, 3)
    # sagittal x=1: rows superior first, columns anterior (y max) first
    assert sections["sagittal"].shape == (4, 6, 3) and tuple(sections["sagittal"][0, 0]) == (1, 5, 3)
    with pytest.raises(ValueError, match="outside"):
        plane_section(coords[..., 0], "axial", (5, 0, 0))
    with pytest.raises(ValueError, match="plane"):
        plane_section(coords[..., 0], "oblique", voxel)

    image = np.random.default_rng(0).random((4, 5, 6))
    regions = 1 + (np.arange(6) >= 3)[None, None, :] + 2 * (np.arange(4) >= 2)[:, None, None]
    regions = np.broadcast_to(regions, image.shape)
    for plane, extent in (("axial", (0, 5 * 1.5, 6 * 1.5, 0)), ("coronal", (0, 5 * 1.5, 4 * 5.0, 0)),
                          ("sagittal", (0, 6 * 1.5, 4 * 5.0, 0))):
        path = tmp_path / f"{plane}.png"
        fig = plane_boundaries(image, regions, (1.5, 1.5, 5.0), voxel, plane, path)
        (shown,) = fig.axes[0].get_images()
        assert shown.get_extent() == pytest.approx(extent)  # mm: 5 mm slices 3.3x as tall
        rgb = shown.get_array()
        yellow = (rgb[..., 0] > 0.9) & (rgb[..., 2] < 0.1)
        assert yellow.any() and path.stat().st_size > 1_000  # the region boundaries are drawn
        assert fig.axes[0].get_aspect() == 1.0


@pytest.mark.parametrize("problem", ["missing", "not_nifti"])
def test_supervoxels_on_a_bad_volume_is_one_line(tmp_path, capsys, problem):
    volume = tmp_path / "scan.nii.gz"
    if problem == "not_nifti":
        volume.write_bytes(b"this is not a NIfTI volume" * 40)
    out = tmp_path / "sv"
    rc = main(["superpixels", "--data", str(volume), "--out", str(out), "--supervoxels",
               "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and str(volume) in err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (out / "summary.json").exists()


def test_supervoxels_voxel_outside_the_volume_and_voxel_without_supervoxels_are_one_line(
        tmp_path, capsys):
    import numpy as np

    from lrcseg.data.readers import write_nifti

    hu = np.full((20, 16, 4), -1000.0, np.float32)
    hu[3:17, 3:13] = np.random.default_rng(0).uniform(-100, 200, (14, 10, 4))
    write_nifti(tmp_path / "scan.nii.gz", hu, np.diag([1.5, 1.5, 3.0, 1.0]))
    common = ["superpixels", "--data", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "o"),
              "--workers", "1", "--no-progress"]
    for extra, says in ((["--supervoxels", "--voxel", "5", "5", "4"], "outside case scan's"),
                        (["--voxel", "5", "5", "1"], "give --supervoxels too")):
        assert main([*common, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert says in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert main([*common, "--supervoxels", "--voxel", "5", "5", "3"]) == 0
    assert "supervoxels_scan_axial_z003.png" in capsys.readouterr().out
