"""bench/throughput.py: synthetic inputs, the floor arithmetic and the CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "throughput.py"
CONFIGS = ("supervised", "key_forward", "floor", "moco", "moco_lrc_pixel", "moco_lrc_region",
           "augment", "e2e")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_throughput"] = module
    spec.loader.exec_module(module)
    return module


def test_synthetic_regions_are_voronoi_cells_inside_the_body(bench):
    g = torch.Generator().manual_seed(0)
    maps = bench.synthetic_regions(3, 96, 20, g)
    assert maps.shape == (3, 96, 96) and maps.dtype == torch.long
    # Outside the ellipse (corners) is 0; inside, ids 1..20, most of them present.
    assert (maps[:, 0, 0] == 0).all() and (maps[:, 48, 48] > 0).all()
    assert int(maps.max()) <= 20
    for m in maps:
        ids = m.unique()
        assert len(ids[ids > 0]) >= 15
    # Each cell is one connected-ish blob: its pixels' centroid is nearer its own seed region.
    assert not torch.equal(maps[0], maps[1])  # fresh seeds per image


def test_inputs_views_and_regions_correspond_after_the_shift(bench):
    setting = bench.Setting("resnet10", 64, 2, regions=8)
    inputs = bench.make_inputs(setting, torch.device("cpu"), channels_last=False)
    assert inputs.view1.shape == (2, 1, 64, 64) and inputs.regions2.shape == (2, 64, 64)
    assert torch.equal(torch.roll(inputs.regions1, (4, 4), (1, 2)), inputs.regions2)
    assert inputs.labels.max() < bench.NUM_CLASSES


def test_floor_is_two_supervised_plus_two_key_forwards(bench):
    floors = {("eager", "supervised"): 0.3, ("eager", "key_forward"): 0.05}
    assert bench.floor_seconds(floors, "eager") == pytest.approx(0.7)
    # Compiled mode without a compiled key forward falls back to the eager key (as the loop).
    floors[("compile", "supervised")] = 0.2
    assert bench.floor_seconds(floors, "compile") == pytest.approx(0.5)
    assert bench.floor_seconds({("eager", "supervised"): 0.3}, "eager") is None
    row = bench._finish_row({"batch": 8, "step_s_mean": 0.5}, 0.4)
    assert row["pairs_per_s"] == pytest.approx(16.0) and row["floor_ratio"] == pytest.approx(1.25)


def test_targets_marked_met_or_not(bench):
    size = {"backbone": "resnet50", "image_size": 224}
    rows = [{"setting": "s", "config": "moco_lrc_pixel", "mode": "eager", "status": "ok",
             "floor_ratio": 1.3, "pairs_per_s": 900.0, **size},
            {"setting": "s", "config": "moco_lrc_pixel", "mode": "compile", "status": "ok",
             "floor_ratio": 1.1, "pairs_per_s": 1100.0, **size},
            {"setting": "s", "config": "e2e", "mode": "eager", "status": "ok",
             "pairs_per_s": 850.0}]
    got = {t["target"]: (t["value"], t["met"]) for t in bench.targets(rows)}
    assert got["MoCo+LRC step <= 1.15 x floor"] == (1.1, True)
    assert got[">= 1000 pairs/s (resnet50, 224px)"] == (1100.0, True)
    assert got["end-to-end >= 90% of synthetic (eager)"] == (round(850 / 900, 4), True)
    # The pairs/s target is for ResNet-50 at 224 px only.
    small = [dict(r, backbone="resnet18") for r in rows]
    assert ">= 1000 pairs/s (resnet50, 224px)" not in {t["target"] for t in bench.targets(small)}


def test_time_steps_stops_at_the_step_count(bench):
    calls = []
    stats = bench.time_steps(calls.append, torch.device("cpu"), warmup=2, steps=3,
                             warmup_s=10.0, max_s=10.0)
    assert calls == [0, 1, 2, 3, 4]
    assert stats["warmup_steps"] == 2 and stats["timed_steps"] == 3
    assert stats["step_s_min"] <= stats["step_s_median"] <= max(stats["step_s_mean"] * 3, 1e-3)


@pytest.mark.slow
def test_cpu_preset_writes_every_configuration(tmp_path):
    out = tmp_path / "tp.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--preset", "cpu", "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["environment"]["device"] == "cpu"
    rows = {(r["config"], r["mode"]): r for r in report["results"]}
    for config in CONFIGS:
        row = rows[(config, "eager")]
        assert row["status"] == "ok", row.get("error")
        assert row["pairs_per_s"] > 0 and row["floor_ratio"] > 0
    floor = rows[("floor", "eager")]
    sup, key = rows[("supervised", "eager")], rows[("key_forward", "eager")]
    assert floor["step_s_mean"] == pytest.approx(2 * sup["step_s_mean"] + 2 * key["step_s_mean"])
    assert floor["floor_ratio"] == pytest.approx(1.0)
    assert rows[("e2e", "eager")]["timed_steps"] == 3
    assert "floor" in result.stdout and "moco_lrc_region" in result.stdout


# ----------------------------------------------------------------------------- bench/throughput_3d.py

SCRIPT_3D = ROOT / "bench" / "throughput_3d.py"


@pytest.fixture(scope="module")
def bench3d():
    spec = importlib.util.spec_from_file_location("bench_throughput_3d", SCRIPT_3D)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_throughput_3d"] = module
    spec.loader.exec_module(module)
    return module


def test_synthetic_supervoxels_are_3d_cells_inside_an_elliptic_cylinder(bench3d):
    g = torch.Generator().manual_seed(0)
    maps = bench3d.synthetic_supervoxels(2, (12, 40, 48), 30, g)
    assert maps.shape == (2, 12, 40, 48) and maps.dtype == torch.long
    assert (maps[:, :, 0, 0] == 0).all() and (maps[:, :, 20, 24] > 0).all()  # corner / centre
    assert int(maps.max()) <= 30
    for m in maps:
        assert len(m.unique()) - 1 >= 20
        # cells are 3D: the top and bottom slices of the body hold different cells
        assert set(m[0].unique().tolist()) != set(m[-1].unique().tolist())
    assert not torch.equal(maps[0], maps[1])
    with pytest.raises(ValueError, match="regions=0"):
        bench3d.synthetic_supervoxels(1, (4, 8, 8), 0, g)


def test_arms_are_the_2d_cpu_config_and_its_3d_counterpart(bench3d):
    preset = bench3d.PRESETS["cpu"]
    two = bench3d.build_arm("2d", preset, torch.device("cpu"))
    # configs/pretrain_cpu.yaml: ResNet-18, 128 px, batch 16, LRC at 1/2 resolution
    assert (two.cfg.model.backbone, two.cfg.augment.image_size, two.batch) == ("resnet18", 128, 16)
    assert two.cfg.model.local_levels == (3,) and two.cfg.lrc.temperature == 0.5
    assert two.canvas == (160, 160) and two.view_voxels == 128 * 128
    three = bench3d.build_arm("3d_flexible", preset, torch.device("cpu"))
    assert three.cfg.model.spatial_dims == 3 and three.view == (64, 64, 64)
    assert three.canvas == (96, 96, 96)  # augment.box_scale 1.5 x the patch
    assert three.cfg.lrc == two.cfg.lrc and three.cfg.model.local_levels == (3,)
    assert three.cfg.moco.queue_size % (2 * three.batch) == 0
    with pytest.raises(ValueError, match="needs nnU-Net plans"):
        bench3d.build_arm("3d_nnunet", preset, torch.device("cpu"))


def test_step_statistics_shares_and_ratios(bench3d):
    stats = bench3d.summarise([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats["step_s_median"], stats["step_s_q1"], stats["step_s_q3"]) == (3.0, 2.0, 4.0)
    assert stats["step_s_iqr"] == 2.0 and stats["step_s_min"] == 1.0
    assert bench3d.summarise([0.5])["step_s_iqr"] == 0.0
    with pytest.raises(ValueError):
        bench3d.summarise([])

    parts = [{"augment": 0.1, "forward": 0.3, "backward": 0.5}, {"augment": 0.1, "forward": 0.4,
                                                                  "backward": 0.4}]
    shares = bench3d.part_shares(parts, [1.0, 1.0])
    assert shares["dominant"] == "backward"
    assert shares["parts"]["other"]["s_mean"] == pytest.approx(0.1)
    assert shares["parts"]["backward"]["s_mean"] == pytest.approx(0.45)
    assert shares["parts"]["lrc"]["s_mean"] == 0.0
    assert sum(p["share"] for p in shares["parts"].values()) == pytest.approx(1.0)

    rows = [{"arm": "2d", "status": "ok", "step_s_median": 2.0, "step_s_iqr": 0.1,
             "voxels_per_s": 1000.0, "rss_peak_mib": 800.0, "rss_steps_added_mib": 100.0,
             "network": "n2", "view": [128, 128], "batch": 16, "profile": shares},
            {"arm": "3d_flexible", "status": "ok", "step_s_median": 6.0, "step_s_iqr": 0.2,
             "voxels_per_s": 500.0, "rss_peak_mib": 2000.0, "rss_steps_added_mib": 900.0,
             "network": "n3", "view": [64, 64, 64], "batch": 2},
            {"arm": "3d_nnunet", "status": "skipped", "error": "nnunetv2 is not installed"}]
    got = bench3d.ratios(rows)
    assert got == [{"arm": "3d_flexible", "step_time_3d_over_2d": 3.0,
                    "voxels_per_s_3d_over_2d": 0.5, "rss_peak_mib_3d_over_2d": 2.5}]
    table = bench3d.markdown({"results": rows, "ratios": got})
    assert "| 3d_flexible | n3 | 64x64x64 | 2 | 6.000 | 0.200 | 500 | 3.00 | 0.50 | 2000 (+900) |" in table
    assert "| 3d_nnunet |" in table and "skipped: nnunetv2 is not installed" in table
    assert "backward 45 %" in table  # the 2D row's dominant part


def test_3d_step_runs_and_its_parts_add_up(bench3d, one_torch_thread):
    preset = bench3d.PRESETS["cpu"]
    preset = type(preset)(**{**preset.__dict__, "patch": (32, 32, 32), "backbone_3d": "resnet10",
                             "regions_3d": 40})
    arm = bench3d.build_arm("3d_flexible", preset, torch.device("cpu"))
    row = bench3d.run_arm(arm, torch.device("cpu"), warmup=1, steps=2, max_s=60.0, op_steps=1)
    assert row["timed_steps"] == 2 and len(row["step_s"]) == 2
    assert row["voxels_per_s"] == pytest.approx(2 * 32**3 / row["step_s_median"])
    parts = row["profile"]["parts"]
    for name in ("augment", "forward", "global", "lrc", "backward", "optimizer"):
        assert parts[name]["s_mean"] > 0, name
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0)
    assert parts["other"]["share"] < 0.05  # the parts cover the step
    assert row["rss_peak_mib"] >= row["rss_setup_mib"] > 0
    assert any("convolution" in op["op"] for op in row["top_ops"])


@pytest.mark.slow
def test_3d_cli_writes_json_and_prints_the_table(tmp_path):
    out = tmp_path / "t3d.json"
    cmd = [sys.executable, str(SCRIPT_3D), "--arms", "2d,3d_flexible", "--out", str(out),
           "--backbone-2d", "resnet10", "--image-size", "64", "--batch-2d", "4",
           "--backbone-3d", "resnet10", "--patch", "32,32,32", "--warmup", "1", "--steps", "2",
           "--op-profile", "0", "--threads", "1"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True
    rows = {r["arm"]: r for r in report["results"]}
    assert rows["2d"]["status"] == "ok" and rows["3d_flexible"]["status"] == "ok", report
    assert rows["2d"]["view"] == [64, 64] and rows["3d_flexible"]["view"] == [32, 32, 32]
    ratio = report["ratios"][0]
    assert ratio["step_time_3d_over_2d"] == pytest.approx(
        rows["3d_flexible"]["step_s_median"] / rows["2d"]["step_s_median"])
    assert "| 3d_flexible |" in result.stdout and "dominant part" in result.stdout
