"""The experiment's design options: one fine-tuning strategy for every pre-trained arm, learning
curves for every arm at chosen steps, distinct (phase-stratified) labelled sets, and the
labelled set and test phase of every results.csv row. Training and scoring are the stand-ins of
``test_experiment._fake_training``, except in the one slow end-to-end run."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_experiment import _fake_training

import lrcseg.experiment.runner as runner_module
from lrcseg.config import ExperimentConfig, FinetuneStrategyConfig, load_config
from lrcseg.data.layouts import load_dataset
from lrcseg.data.splits import choose_labelled
from lrcseg.errors import ConfigError
from lrcseg.experiment.results import learning_curves
from lrcseg.experiment.runner import run_experiment
from lrcseg.phantoms.generate import write_phantom_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STRATEGY = {"encoder_lr_scale": 0.25, "decoder_lr_scale": 0.5, "head_first_steps": 2,
            "freeze_encoder": False}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """10 phantoms: pool 000-001, candidates 002-007 (4 portal-venous, 2 unenhanced), test
    008 (unenhanced) and 009 (portal-venous)."""
    data = write_phantom_dataset(tmp_path_factory.mktemp("design") / "phantoms", cases=10,
                                 seed=4, spacing_mm=(6.0, 6.0, 12.0), montage=False,
                                 pretrain_fraction=0.2, train_fraction=0.6)
    phases = json.loads((data / "dataset.json").read_text())["phantoms"]["phases"]
    candidates = choose_labelled(load_dataset(data), 1, 0)["candidates"]
    assert Counter(phases[c] for c in candidates) == {"portal_venous": 4, "unenhanced": 2}
    assert (phases["phantom_008"], phases["phantom_009"]) == ("unenhanced", "portal_venous")
    return data


def _cfg(data: Path, **overrides) -> ExperimentConfig:
    return load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", {
        "phantoms": None, "dataset": str(data), "qualitative_figure": False, **overrides})


def _cell_config(out: Path, init: str, cell: str) -> dict:
    return yaml.safe_load((out / "runs" / "finetune" / init / cell / "config.yaml").read_text())


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_strategy_reaches_every_pretrained_cell_and_scratch_keeps_the_default(
        dataset, tmp_path, monkeypatch):
    _fake_training(monkeypatch, [])
    cfg = _cfg(dataset, finetune_strategy=STRATEGY, initialisations=[
        {"name": "scratch"}, {"name": "moco", "method": "moco"},
        {"name": "moco_lrc", "method": "moco", "lrc": True}], draws=[0, 1])
    out = tmp_path / "exp"
    run_experiment(cfg, out, progress=False)
    for draw in (0, 1):
        for init in ("moco", "moco_lrc"):
            assert _cell_config(out, init, f"K1_d{draw}_s0")["strategy"] == STRATEGY
        assert _cell_config(out, "scratch", f"K1_d{draw}_s0")["strategy"] == \
            {**STRATEGY, "encoder_lr_scale": 1.0, "decoder_lr_scale": 1.0, "head_first_steps": 0}
    assert yaml.safe_load((out / "experiment.yaml").read_text())["finetune_strategy"] == STRATEGY
    # It changes what a cell computes: a rerun with another strategy is refused.
    with pytest.raises(ConfigError, match="changed: finetune_strategy"):
        run_experiment(_cfg(dataset, initialisations=cfg.initialisations, draws=[0, 1]), out,
                       progress=False)


def test_all_curves_snapshot_every_arm_at_the_chosen_steps(dataset, tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_training(monkeypatch, calls)
    out = tmp_path / "exp"
    run_experiment(_cfg(dataset, learning_curve="all", curve_steps=[2, 1]), out, progress=False)
    for init in ("scratch", "moco_lrc"):
        cell = out / "runs" / "finetune" / init / "K1_d0_s0"
        assert sorted(p.name for p in cell.glob("metrics*.json")) == [
            "metrics.json", "metrics_step1.json", "metrics_step2.json"]
        assert _cell_config(out, init, "K1_d0_s0")["snapshots"] == [1, 2]
    # The stand-in scores 0.5 (+0.1 with LRC) at the budget, 0.2 and 0.1 less at steps 1, 2.
    curves = {r["init"]: r for r in learning_curves(_cfg(dataset, learning_curve="all",
                                                         curve_steps=[1, 2]), out)}
    assert [(s, round(d, 6)) for s, d in curves["scratch"]["points"]] == [(1, 0.3), (2, 0.4), (4, 0.5)]
    assert [(s, round(d, 6)) for s, d in curves["moco_lrc"]["points"]] == [(1, 0.4), (2, 0.5), (4, 0.6)]
    # "all" covers an initialisation a later invocation adds, and the whole folder's curves.
    grown = _cfg(dataset, learning_curve="all", curve_steps=[1, 2], initialisations=[
        {"name": "scratch"}, {"name": "moco_lrc", "method": "moco", "lrc": True},
        {"name": "moco", "method": "moco"}])
    run_experiment(grown, out, progress=False)
    assert (out / "runs" / "finetune" / "moco" / "K1_d0_s0" / "metrics_step1.json").is_file()
    assert [r["init"] for r in learning_curves(grown, out)] == ["scratch", "moco_lrc", "moco"]
    assert [r["init"] for r in learning_curves(_cfg(dataset, learning_curve=["moco_lrc"]), out)] \
        == ["moco_lrc"]  # the default steps (1 and 2 of 4) are also what was recorded


def test_distinct_draws_by_phase_give_different_sets_in_proportion(dataset, tmp_path, monkeypatch):
    _fake_training(monkeypatch, [])
    draws = list(range(6))
    out = tmp_path / "exp"
    results = run_experiment(_cfg(dataset, labeled=[1, 2], draws=draws,
                                  draw_mode="distinct_by_phase",
                                  initialisations=[{"name": "scratch"}]), out, progress=False)
    phases = json.loads((dataset / "dataset.json").read_text())["phantoms"]["phases"]
    rows = _rows(results)
    # (the stand-in scores one case, phantom_003, which the dataset records as unenhanced)
    assert {(r["case"], r["phase"]) for r in rows} == {("phantom_003", "unenhanced")}
    for k, unenhanced in ((1, 2), (2, 4)):  # of 6 and 12 labelled cases: 2/6 of the candidates
        sets = {int(r["draw"]): r["labelled_set"] for r in rows if r["K"] == str(k)}
        assert sorted(sets) == draws and len(set(sets.values())) == 6
        labelled = [c for s in sets.values() for c in s.split("+")]
        assert all(len(s.split("+")) == k for s in sets.values())
        assert Counter(phases[c] for c in labelled)["unenhanced"] == unenhanced
        for draw, cases in sets.items():  # the run fine-tuned on the set its row names
            cell = _cell_config(out, "scratch", f"K{k}_d{draw}_s0")
            chosen = choose_labelled(load_dataset(dataset), k, cell["split_seed"])["labeled"]
            assert "+".join(chosen) == cases
    # The seeded draws of the same dataset repeat a case at K = 1: the reason for the option.
    seeded = {tuple(choose_labelled(load_dataset(dataset), 1, d)["labeled"]) for d in draws}
    assert len(seeded) < 6


def test_draw_modes_the_dataset_cannot_serve_are_refused_before_training(dataset, tmp_path,
                                                                         monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may train when the draws cannot be made")

    monkeypatch.setattr(runner_module, "pretrain", forbidden)
    monkeypatch.setattr(runner_module, "finetune", forbidden)
    with pytest.raises(ConfigError, match="7 draws need as many different sets of K = 1 "
                                          "labelled cases, but 6 candidates give only 6"):
        run_experiment(_cfg(dataset, draws=list(range(7)), draw_mode="distinct"),
                       tmp_path / "a", progress=False)
    no_phases = shutil.copytree(dataset, tmp_path / "no_phases")
    record = json.loads((no_phases / "dataset.json").read_text())
    del record["phantoms"]
    (no_phases / "dataset.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="distinct_by_phase needs each case's contrast phase"):
        run_experiment(_cfg(no_phases, draw_mode="distinct_by_phase"), tmp_path / "b",
                       progress=False)


@pytest.mark.parametrize("overrides, message", [
    ({"curve_steps": [0, 2]}, "Illegal curve_steps"),
    ({"curve_steps": [4]}, "Illegal curve_steps"),  # the budget is always the last point
    ({"curve_steps": [1, 1]}, "Illegal curve_steps"),
    ({"learning_curve": "every"}, "Illegal learning_curve 'every'"),
    ({"learning_curve": ["moco"]}, "are not initialisations"),
    ({"draw_mode": "random"}, "Illegal draw_mode 'random'"),
    ({"draw_mode": "distinct", "draws": [-1, 0]}, "Illegal draws"),
    ({"finetune_strategy": {"head_first_steps": 4}}, "finetune_strategy.head_first_steps 4"),
    ({"finetune_strategy": {"decoder_lr_scale": 0}}, "strategy.decoder_lr_scale 0"),
    ({"finetune_with": "nnunet", "finetune_steps": 250, "finetune_strategy": {"freeze_encoder": True}},
     "finetune_with nnunet: finetune_strategy"),
])
def test_bad_design_options_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml", overrides)


def test_design_options_load_and_default_to_the_earlier_behaviour():
    cfg = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml",
                      {"curve_steps": [3, 1], "learning_curve": "all"})
    assert cfg.curve_steps == [1, 3] and cfg.curve_inits() == ["scratch", "moco_lrc"]
    default = load_config(ExperimentConfig, CONFIGS / "experiment_tiny.yaml")
    assert default.finetune_strategy == FinetuneStrategyConfig() and default.draw_mode == "seeded"
    assert default.curve_steps == [] and default.curve_inits() == []


@pytest.mark.slow
def test_a_real_tiny_matrix_with_strategy_curves_for_all_and_distinct_draws(dataset, tmp_path):
    out = tmp_path / "exp"
    cfg = _cfg(dataset, draws=[0, 1], draw_mode="distinct", learning_curve="all",
               curve_steps=[2], finetune_strategy=STRATEGY)
    results = run_experiment(cfg, out, progress=False)
    splits = {}
    for init in ("scratch", "moco_lrc"):
        for draw in (0, 1):
            cell = out / "runs" / "finetune" / init / f"K1_d{draw}_s0"
            assert (cell / "metrics_step2.json").is_file()
            strategy = _cell_config(out, init, cell.name)["strategy"]
            assert (strategy == STRATEGY) is (init == "moco_lrc")
            splits[init, draw] = json.loads((cell / "split.json").read_text())["labeled"]
    assert splits["scratch", 0] == splits["moco_lrc", 0] != splits["scratch", 1]
    rows = _rows(results)
    assert {r["labelled_set"] for r in rows} == {"+".join(s) for s in splits.values()}
    assert {r["phase"] for r in rows} == {"unenhanced", "portal_venous"}
    assert {r["init"] for r in learning_curves(cfg, out)} == {"scratch", "moco_lrc"}
