"""The experiment runner: configuration, derived run configs, and a tiny matrix end to end."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

import lrcseg.experiment.runner as runner_module
from lrcseg.config import ExperimentConfig, load_config, save_config
from lrcseg.data.layouts import load_dataset
from lrcseg.data.splits import choose_labelled
from lrcseg.errors import ConfigError
from lrcseg.experiment.cells import Cell, cells, finetune_config, pretrain_config
from lrcseg.experiment.runner import run_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_evidence_config_loads_with_the_fixed_matrix():
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_phantoms.yaml")
    names = [s.name for s in cfg.initialisations]
    assert names == ["scratch", "moco", "moco_lrc", "lrc_only", "moco_lrc_grid"]
    assert (cfg.labeled, len(cfg.draws), len(cfg.seeds)) == ([1, 2], 3, 5)
    assert len(cells(cfg)) == 5 * 2 * 3 * 5
    assert cfg.baselines == ["scratch", "moco"]
    sweep = load_config(ExperimentConfig, CONFIGS / "experiment_phantoms_sweep.yaml")
    assert sweep.eval_split == "pretrain"
    assert sweep.phantoms == cfg.phantoms  # the same phantoms, scored on the pool instead


def test_cpu_evidence_config_uses_the_sweeps_budgets_and_its_choice():
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_phantoms_cpu.yaml")
    sweep = load_config(ExperimentConfig, CONFIGS / "experiment_phantoms_cpu_sweep.yaml")
    assert (cfg.labeled, len(cfg.draws), len(cfg.seeds)) == ([1, 2], 3, 5)
    assert cfg.eval_split == "test" and sweep.eval_split == "pretrain"
    same = ("phantoms", "pretrain_steps", "finetune_steps", "backbone", "image_size",
            "spacing_mm", "batch_size", "finetune_batch_size", "pretrain_lr", "finetune_lr",
            "warmup_steps")
    assert all(getattr(cfg, key) == getattr(sweep, key) for key in same)
    chosen = cfg.init("moco_lrc")
    assert any((s.lrc_weight, s.lrc_temperature) == (chosen.lrc_weight, chosen.lrc_temperature)
               for s in sweep.initialisations if s.lrc)
    assert cfg.configurations_tried >= len(sweep.initialisations)


def test_derived_run_configs(tmp_path):
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_phantoms.yaml", {
        "initialisations": [
            {"name": "scratch"},
            {"name": "lrc_grid", "method": "none", "lrc": True, "regions": "grid",
             "lrc_weight": 0.5, "lrc_temperature": 0.3}], "baselines": ["scratch"]})
    data = tmp_path / "phantoms"
    pt = pretrain_config(cfg, cfg.init("lrc_grid"), 3, data, tmp_path)
    assert (pt.method, pt.lrc.enabled, pt.superpixels.method) == ("none", True, "grid")
    assert (pt.lrc.weight, pt.lrc.temperature) == (0.5, 0.3)
    assert (pt.run.steps, pt.run.seed, pt.run.batch_size) == (1500, 3, 64)
    assert Path(pt.run.out) == tmp_path / "runs" / "pretrain" / "lrc_grid_s3"
    a = finetune_config(cfg, Cell("scratch", 2, 1, 3), data, tmp_path)
    b = finetune_config(cfg, Cell("lrc_grid", 2, 1, 3), data, tmp_path)
    assert a.init == "scratch" and b.init == pt.run.out
    # Same labelled draw, budget and hyper-parameters whatever the initialisation.
    for field in ("labeled", "split_seed", "image_size"):
        assert getattr(a, field) == getattr(b, field)
    assert (a.split_seed, a.run.steps, a.run.seed) == (1, 400, 3)
    assert a.run.steps == b.run.steps and a.snapshots == b.snapshots == []
    assert a.optim == b.optim and a.preprocess == b.preprocess == pt.preprocess


def test_overrides_reach_the_pretraining_config_and_are_checked(tmp_path):
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_phantoms.yaml", {
        "pretrain_overrides": {"superpixels": {"scale": 25.0}, "lrc": {"num_regions": 32}},
        "initialisations": [
            {"name": "scratch"},
            {"name": "multi", "method": "moco", "lrc": True,
             "overrides": {"model": {"local_levels": [2, 3, 4]}, "lrc": {"num_regions": 24}}}],
        "baselines": ["scratch"], "learning_curve": ["scratch"]})
    pt = pretrain_config(cfg, cfg.init("multi"), 0, tmp_path / "phantoms", tmp_path)
    assert pt.superpixels.scale == 25.0 and pt.model.local_levels == (2, 3, 4)
    assert pt.lrc.num_regions == 24  # the initialisation's own override wins
    ft = finetune_config(cfg, Cell("scratch", 1, 0, 0), tmp_path / "phantoms", tmp_path)
    assert ft.snapshots == [100, 200] and ft.run.steps == 400  # 1/4 and 1/2 of the budget
    bad = load_config(ExperimentConfig, CONFIGS / "experiment_phantoms.yaml", {
        "initialisations": [{"name": "m", "method": "moco", "overrides": {"run": {"steps": 5}}}],
        "baselines": []})
    with pytest.raises(ConfigError, match="run.steps"):
        pretrain_config(bad, bad.init("m"), 0, tmp_path / "phantoms", tmp_path)


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": "x"}, "exactly one of dataset"),
    ({"initialisations": [{"name": "a"}, {"name": "a"}], "baselines": []}, "duplicate"),
    ({"baselines": ["nope"]}, "baselines"),
    ({"labeled": [1, 1]}, "Illegal labeled"),
    ({"eval_split": "train"}, "eval_split"),
    ({"initialisations": [{"name": "s", "method": "scratch", "lrc": True}], "baselines": []},
     "scratch has no pre-training"),
    ({"initialisations": [{"name": "sup", "method": "supervised"}], "baselines": []},
     "labels_dataset"),
    ({"backbone": "vgg"}, "backbone"),
])
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", overrides)


@pytest.mark.slow
def test_tiny_matrix_runs_and_resumes_without_recomputing(tmp_path, monkeypatch):
    calls: list[tuple[str, str, bool]] = []

    def counting(kind, real):
        def wrapped(cfg, resume=False, progress=True, stop_at=None):
            calls.append((kind, Path(cfg.run.out).name, resume))
            return real(cfg, resume=resume, progress=progress, stop_at=stop_at)
        return wrapped

    monkeypatch.setattr(runner_module, "pretrain", counting("pretrain", runner_module.pretrain))
    monkeypatch.setattr(runner_module, "finetune", counting("finetune", runner_module.finetune))
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml")
    out = tmp_path / "exp"
    results = run_experiment(cfg, out, progress=False)
    assert sorted(calls) == [("finetune", "K1_d0_s0", False), ("finetune", "K1_d0_s0", False),
                             ("pretrain", "moco_lrc_s0", False)]
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["init"], r["case"]) for r in rows] == [("scratch", "phantom_003"),
                                                      ("moco_lrc", "phantom_003")]  # test split
    assert all(0.0 <= float(r["mean"]) <= 1.0 for r in rows)
    report = (out / "report.md").read_text()
    assert "Configurations tried before this one: 0" in report
    assert "| 1 | moco_lrc | scratch | 1 |" in report
    assert "| moco_lrc | 1 | 1 |" in report  # the pooled HD95 row (1 cell)
    for name in ("dice_vs_k.png", "organ_bars.png", "qualitative.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    assert load_config(ExperimentConfig, out / "experiment.yaml") == cfg

    # A second call recomputes nothing; a cell interrupted after its checkpoint resumes.
    calls.clear()
    cell_dir = out / "runs" / "finetune" / "moco_lrc" / "K1_d0_s0"
    kept = (out / "runs" / "finetune" / "scratch" / "K1_d0_s0" / "metrics.json").stat().st_mtime_ns
    (cell_dir / "metrics.json").unlink()
    (cell_dir / "final.pt").unlink()
    run_experiment(cfg, out, progress=False)
    assert calls == [("finetune", "K1_d0_s0", True)]
    assert (cell_dir / "metrics.json").is_file()
    assert (out / "runs" / "finetune" / "scratch" / "K1_d0_s0" / "metrics.json").stat().st_mtime_ns == kept

    changed = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", {"finetune_steps": 5})
    with pytest.raises(ConfigError, match="finetune_steps"):
        run_experiment(changed, out, progress=False)


def test_time_budget_stops_before_new_cells(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("no training may start once the time budget is spent")

    monkeypatch.setattr(runner_module, "pretrain", forbidden)
    monkeypatch.setattr(runner_module, "finetune", forbidden)
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml")
    results = run_experiment(cfg, tmp_path / "exp", progress=False, max_seconds=0)
    assert results.read_text().startswith("init,K,draw,seed,case,")
    assert len(results.read_text().splitlines()) == 1
    assert not (tmp_path / "exp" / "report.md").exists()


def _fake_training(monkeypatch, calls: list[str]):
    """Replace training and evaluation by stand-ins that record the cells and write metrics."""
    def pretrain(cfg, resume=False, progress=True):
        calls.append("pretrain " + Path(cfg.run.out).name)
        Path(cfg.run.out).mkdir(parents=True)
        (Path(cfg.run.out) / "final.pt").write_bytes(b"x")

    def finetune(cfg, resume=False, progress=True):
        calls.append("finetune " + "/".join(Path(cfg.run.out).parts[-2:]))
        Path(cfg.run.out).mkdir(parents=True)
        # what a real run folder records of its config and labelled cases (Finetuning.describe)
        save_config(cfg, Path(cfg.run.out) / "config.yaml")
        split = choose_labelled(load_dataset(cfg.dataset), cfg.labeled, cfg.split_seed)
        (Path(cfg.run.out) / "split.json").write_text(json.dumps(split))
        (Path(cfg.run.out) / "final.pt").write_bytes(b"x")
        for step in cfg.snapshots:
            (Path(cfg.run.out) / f"snapshot_{step}.pt").write_bytes(b"x")

    def evaluate(run_dir, data, split, device, progress=True):
        calls.append("evaluate " + "/".join(Path(run_dir).parts[-2:]))
        score = 0.5 + 0.1 * ("lrc" in str(run_dir))
        if Path(run_dir).name.startswith("snapshot_"):  # a learning curve: 0.3 at 1, 0.4 at 2
            score -= 0.1 * (3 - int(Path(run_dir).stem.split("_")[1]))
        return {"organs": ["liver"],  # the shape of SegmentationMetrics.result()
                "cases": {"phantom_003": {"liver": {"dice": score, "hd95_mm": 10 * score}}},
                "counts": {"liver": {"absent_both": 0, "missed": 0, "false_positive": 0,
                                     "evaluated": 1}}}

    def probe(model, data, labeled, split_seed, split, seed, backbone, spacing_mm, pixels,
              levels, batchnorm, device, cache_dir, progress):
        calls.append(f"probe {Path(model).name} K{labeled}_d{split_seed}_s{seed}")
        score = 0.2 + 0.05 * ("lrc" in str(model))
        return {"organs": ["liver"], "cases": {"phantom_003": {"liver": {"dice": score}}}}

    def write_metrics(result, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result))

    # The runner's own references: it imports what it calls at its module top.
    monkeypatch.setattr(runner_module, "evaluate_probe", probe)
    monkeypatch.setattr(runner_module, "pretrain", pretrain)
    monkeypatch.setattr(runner_module, "finetune", finetune)
    monkeypatch.setattr(runner_module, "evaluate_model", evaluate)
    monkeypatch.setattr(runner_module, "write_metrics", write_metrics)


def _hold(path: Path, until, then=None):
    """Another "process": hold the flock on ``path`` in a thread until ``until()`` is true
    (at most 60 s), then run ``then`` and release. Returns the thread once the lock is held."""
    import threading

    from lrcseg.experiment.locks import exclusive_lock

    taken = threading.Event()

    def body():
        with exclusive_lock(path, wait=True):
            taken.set()
            deadline = time.time() + 60
            while not until() and time.time() < deadline:
                time.sleep(0.01)
            if then is not None:
                then()

    thread = threading.Thread(target=body)
    thread.start()
    taken.wait()
    return thread


def test_cells_held_by_another_process_are_skipped_then_finished(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_training(monkeypatch, calls)
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml",
                      {"seeds": [0, 1], "qualitative_figure": False})
    out = tmp_path / "exp"
    # Another process pre-trains moco_lrc_s0 for a moment: its cell is skipped first, the
    # rest of the matrix runs, then this process waits for the lock and does the cell itself.
    holder = _hold(out / "locks" / "pretrain_moco_lrc_s0.lock",
                   until=lambda: "evaluate moco_lrc/K1_d0_s1" in calls)
    run_experiment(cfg, out, progress=False)
    holder.join()
    assert [c for c in calls if not c.startswith("evaluate")] == [
        "finetune scratch/K1_d0_s0", "finetune scratch/K1_d0_s1",
        "pretrain moco_lrc_s1", "finetune moco_lrc/K1_d0_s1",
        "pretrain moco_lrc_s0", "finetune moco_lrc/K1_d0_s0"]  # seed 0's moco_lrc waited for
    # A cell that another process is fine-tuning, and finishes: waited for, never redone here.
    cell = out / "runs" / "finetune" / "scratch" / "K1_d0_s1"
    done = (cell / "metrics.json").read_text()
    (cell / "metrics.json").unlink()
    calls.clear()
    holder = _hold(out / "locks" / "finetune_scratch_K1_d0_s1.lock",
                   until=lambda: time.sleep(1.0) is None,  # this process arrives meanwhile
                   then=lambda: (cell / "metrics.json").write_text(done))
    run_experiment(cfg, out, progress=False)
    holder.join()
    assert calls == []
    rows = list(csv.DictReader(open(out / "results.csv", newline="")))
    assert len(rows) == 4 and {r["init"] for r in rows} == {"scratch", "moco_lrc"}
    assert len(json.loads((out / "timings.json").read_text())["invocations"]) == 2


def test_a_finished_experiment_can_gain_initialisations_but_not_redefine_them(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_training(monkeypatch, calls)
    out = tmp_path / "exp"
    first = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", {
        "initialisations": [{"name": "scratch"}], "baselines": ["scratch"],
        "qualitative_figure": False})
    run_experiment(first, out, progress=False)
    calls.clear()
    extended = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml",
                           {"draws": [0, 1], "qualitative_figure": False})
    run_experiment(extended, out, progress=False)
    assert [c for c in calls if not c.startswith("evaluate")] == [
        "finetune scratch/K1_d1_s0", "pretrain moco_lrc_s0",
        "finetune moco_lrc/K1_d0_s0", "finetune moco_lrc/K1_d1_s0"]
    report = (out / "report.md").read_text()
    assert "| 1 | moco_lrc | scratch |" in report
    # A narrower invocation afterwards neither hides moco_lrc from the report nor lets a
    # later one redefine it.
    run_experiment(first, out, progress=False)
    assert "| 1 | moco_lrc | scratch |" in (out / "report.md").read_text()
    redefined = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", {
        "initialisations": [{"name": "scratch"},
                            {"name": "moco_lrc", "method": "moco", "lrc": True, "lrc_weight": 2.0}]})
    with pytest.raises(ConfigError, match="moco_lrc are defined differently"):
        run_experiment(redefined, out, progress=False)
    with pytest.raises(ConfigError, match="changed: pretrain_steps"):
        run_experiment(load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml",
                                   {"pretrain_steps": 7}), out, progress=False)


def test_blocks_probe_first_record_a_learning_curve_and_release_their_weights(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_training(monkeypatch, calls)
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", {
        "qualitative_figure": False, "probe": True, "learning_curve": ["scratch"],
        "keep_checkpoints": False})
    out = tmp_path / "exp"
    run_experiment(cfg, out, progress=False)
    # Block by block: the probe (scratch = a random network) before the fine-tunes.
    assert [c for c in calls if not c.startswith("evaluate")] == [
        "probe scratch K1_d0_s0", "finetune scratch/K1_d0_s0",
        "pretrain moco_lrc_s0", "probe moco_lrc_s0 K1_d0_s0", "finetune moco_lrc/K1_d0_s0"]
    scratch_cell = out / "runs" / "finetune" / "scratch" / "K1_d0_s0"
    assert [c for c in calls if c.startswith("evaluate")][:3] == [
        "evaluate K1_d0_s0/snapshot_1.pt", "evaluate K1_d0_s0/snapshot_2.pt",
        "evaluate scratch/K1_d0_s0"]
    assert (scratch_cell / "metrics_step1.json").is_file() and (scratch_cell / "metrics_step2.json").is_file()
    # Every weight file of a finished block is gone; its metrics stay.
    assert not list((out / "runs").rglob("*.pt"))
    assert (out / "runs" / "probe" / "moco_lrc" / "K1_d0_s0" / "metrics.json").is_file()
    rows = list(csv.DictReader(open(out / "probe_results.csv", newline="")))
    assert [(r["init"], r["mean"]) for r in rows] == [("scratch", "0.200000"), ("moco_lrc", "0.250000")]
    report = (out / "report.md").read_text()
    assert "## Frozen-feature probe" in report
    assert "| scratch | 1 | 1 | 0.300 | 0.400 | 0.500 | +0.100 |" in report  # the learning curve
    assert "| 1 | moco_lrc | scratch | s0: +0.050 | yes |" in report  # probe sign per seed
    assert (out / "runs" / "pretrain" / "moco_lrc_s0" / "weights_released.txt").is_file()
    # A grown matrix needs the deleted pre-training again: refused, never silently retrained.
    grown = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", {
        "qualitative_figure": False, "probe": True, "learning_curve": ["scratch"],
        "keep_checkpoints": False, "draws": [0, 1]})
    with pytest.raises(ConfigError, match="weights were deleted"):
        run_experiment(grown, out, progress=False)


def test_probes_only_keep_the_weights_the_fine_tunes_will_need(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_training(monkeypatch, calls)
    overrides = {"qualitative_figure": False, "probe": True, "keep_checkpoints": False}
    out = tmp_path / "exp"
    run_experiment(load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml",
                               {**overrides, "finetune": False}), out, progress=False)
    assert (out / "runs" / "pretrain" / "moco_lrc_s0" / "final.pt").is_file()
    calls.clear()
    run_experiment(load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", overrides),
                   out, progress=False)
    assert [c for c in calls if not c.startswith("evaluate")] == [
        "finetune scratch/K1_d0_s0", "finetune moco_lrc/K1_d0_s0"]  # no second pre-training
    assert not (out / "runs" / "pretrain" / "moco_lrc_s0" / "final.pt").exists()
