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
