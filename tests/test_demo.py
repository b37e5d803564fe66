"""`lrcseg demo --fast`: the README's main job, end to end (the suite's slow test)."""

from __future__ import annotations

import json

import pytest

from lrcseg.cli import main


@pytest.mark.slow
def test_demo_fast_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "not evidence" in printed and "| **mean Dice** |" in printed
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"scratch", "moco", "moco_lrc"}
    for result in results.values():
        assert 0.0 <= result["mean_dice"] <= 1.0 and "liver" in result["organs"]
    report = (out / "report.md").read_text()
    assert "smoke run, not evidence" in report and "docs/results/" in report
    assert (out / "figures" / "superpixels.png").stat().st_size > 0
    assert len(list((out / "figures").rglob("*.png"))) >= 4
    for run in ("moco", "moco_lrc", "ft_scratch", "ft_moco", "ft_moco_lrc"):
        assert (out / "runs" / run / "final.pt").is_file()
    mtime = (out / "runs" / "moco_lrc" / "final.pt").stat().st_mtime_ns
    # a rerun skips finished training stages and only re-evaluates
    assert main(["demo", "--fast", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert "done already" in capsys.readouterr().out
    assert (out / "runs" / "moco_lrc" / "final.pt").stat().st_mtime_ns == mtime
    timings = json.loads((out / "timings.json").read_text())
    assert len(timings["invocations"]) == 2
    assert timings["total_seconds"] == pytest.approx(sum(r["seconds"] for r in timings["invocations"]))
    assert "over the folder's 2 invocations" in (out / "report.md").read_text()
