"""The report's primary endpoint and its companions (lrcseg.experiment.statistics, report):
per-run t intervals, exact sign-flip p, TOST, the interval over seeds, de-duplication by
labelled set, Dice per contrast phase and compute-to-reach, against hand computations and
scipy."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lrcseg.config import ExperimentConfig, InitSpec, load_config
from lrcseg.experiment.report import read_results_csv, write_report
from lrcseg.experiment.results import recorded_labelled_sets, run_curves
from lrcseg.experiment.statistics import (
    compute_to_reach,
    drop_draws,
    duplicate_draws,
    labelled_sets,
    mean_curves,
    phases,
    run_comparisons,
    seed_means,
    sign_flip_p,
    steps_to_reach,
    t_interval,
    tost,
)

EVIDENCE = Path(__file__).resolve().parents[1] / "docs" / "results" / "evidence_cpu"


def test_t_interval_by_hand_and_against_scipy():
    # d = 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302652729911275 (Student's t table).
    low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (low, high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    d = np.random.default_rng(2).normal(0.01, 0.03, 9)
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.9)
    assert t_interval(d, 0.9) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert all(math.isnan(v) for v in t_interval([0.3]))
    with pytest.raises(ValueError, match="confidence"):
        t_interval(d, 1.0)


def test_sign_flip_p_exact_by_hand():
    # +-1 +-2 +-3: the sums are 6, 4, 2, 0, 0, -2, -4, -6, so P(|T| >= 6) = 2 / 8.
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # 1 - 2 + 3 + 4 = 6 = 10 - 2 S with S the sum of the flipped magnitudes: |T| >= 6 needs
    # S <= 2 ({}, {1}, {2}) or S >= 8 ({1,3,4}, {2,3,4}, {1,2,3,4}): 6 of 16.
    assert sign_flip_p([1.0, -2.0, 3.0, 4.0]) == 6 / 16
    assert sign_flip_p([0.0, 0.0]) == 1.0
    assert math.isnan(sign_flip_p([]))


def test_sign_flip_p_matches_scipy_and_monte_carlo_approximates_it():
    d = np.random.default_rng(1).normal(0.01, 0.03, 12)
    ref = stats.permutation_test((d,), np.mean, permutation_type="samples",
                                 n_resamples=np.inf, vectorized=True)
    exact = sign_flip_p(d)
    assert exact == pytest.approx(ref.pvalue, rel=1e-12)
    sampled = sign_flip_p(d, flips=20000, seed=3, exact_max_n=5)
    assert sampled != exact  # it sampled rather than enumerated
    assert sampled == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20000))
    assert sign_flip_p(d, flips=20000, seed=3, exact_max_n=5) == sampled  # seeded
    # Even an extreme sample keeps p > 0: the observed assignment counts once.
    assert sign_flip_p(np.full(30, 0.01), flips=1000) == pytest.approx(1 / 1001)
    with pytest.raises(ValueError, match="flips"):
        sign_flip_p(d, flips=0)


def test_tost_against_two_scipy_one_sided_tests_and_its_bound():
    d = np.array([0.004, -0.006, 0.010, 0.002, -0.003, 0.007, 0.001, 0.005])
    r = tost(d, 0.02)
    p_low = stats.ttest_1samp(d, -0.02, alternative="greater").pvalue
    p_high = stats.ttest_1samp(d, 0.02, alternative="less").pvalue
    assert r["p_tost"] == pytest.approx(max(p_low, p_high)) and r["equivalent"]
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.9)
    assert r["bound"] == pytest.approx(max(abs(ci.low), abs(ci.high)))
    # The bound is where the verdict turns: just above it equivalent, just below it not.
    assert tost(d, r["bound"] * 1.001)["equivalent"]
    assert not tost(d, r["bound"] * 0.999)["equivalent"]
    assert tost(d, r["bound"] * 1.001)["p_tost"] < 0.05 < tost(d, r["bound"] * 0.999)["p_tost"]
    assert not tost(d + 0.03, 0.02)["equivalent"]
    assert math.isnan(tost([0.01], 0.02)["p_tost"])
    with pytest.raises(ValueError, match="margin"):
        tost(d, 0.0)


def _row(init, k, draw, seed, case, value, labelled=None, phase=None):
    return {"init": init, "K": k, "draw": draw, "seed": seed, "case": case, "liver": value,
            "mean": value, "labelled_set": labelled, "phase": phase}


#: per-run differences A - B at K = 1, by (draw, seed)
RUN_D = {(0, 0): 0.02, (0, 1): 0.04, (1, 0): -0.01, (1, 1): 0.03}


def _paired_rows():
    """A and B at K = 1, draws 0/1, seeds 0/1, cases c1 (0.5 for B) and c2 (0.7 for B): each
    A run is its B run + RUN_D on both cases; draw 2 repeats draw 0's labelled set with A far
    below B (a duplicate that must not count)."""
    sets = {0: "p1", 1: "p2", 2: "p1"}
    rows = []
    for (draw, seed), d in [*RUN_D.items(), ((2, 0), -0.5), ((2, 1), -0.5)]:
        for case, phase, base in (("c1", "portal_venous", 0.5), ("c2", "unenhanced", 0.7)):
            rows += [_row("B", 1, draw, seed, case, base, sets[draw], phase),
                     _row("A", 1, draw, seed, case, base + d, sets[draw], phase)]
    return rows


def test_duplicate_labelled_sets_are_found_and_dropped():
    sets = {(1, 0): "p1", (1, 1): "p2", (1, 2): "p1", (2, 0): "p1+p2", (2, 1): "p1+p2"}
    assert duplicate_draws(sets) == {(1, 2): 0, (2, 1): 0}
    rows = _paired_rows()
    assert labelled_sets(rows) == {(1, 0): "p1", (1, 1): "p2", (1, 2): "p1"}
    kept = drop_draws(rows, duplicate_draws(labelled_sets(rows)))
    assert len(kept) == len(rows) - 8 and {r["draw"] for r in kept} == {0, 1}
    assert labelled_sets([_row("A", 1, 0, 0, "c1", 0.5)]) == {}  # no column: nothing known
    assert phases(rows) == ["portal_venous", "unenhanced"]


def test_run_comparisons_per_run_t_interval_sign_flip_seeds_and_tost():
    rows = drop_draws(_paired_rows(), {(1, 2): 0})
    (r,) = run_comparisons(rows, ["A", "B"], ["B"], [1], margin=0.05, resamples=500)
    d = np.array([RUN_D[k] for k in sorted(RUN_D)])
    assert (r["init"], r["baseline"], r["n"]) == ("A", "B", 4)
    assert r["mean_diff"] == pytest.approx(0.02)
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert (r["t_low"], r["t_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    # d proportional to 2, 4, -1, 3 (sum 8 of 10): |T| >= 8 needs flipped magnitudes summing
    # to <= 1 ({}, {1}) or >= 9 ({2,3,4}, {1,2,3,4}): 4 of 16.
    assert r["p_sign_flip"] == pytest.approx(4 / 16)
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue)
    # Seeds: s0 = (0.02 - 0.01) / 2, s1 = (0.04 + 0.03) / 2; t interval over the two.
    assert seed_means(RUN_D) == {0: pytest.approx(0.005), 1: pytest.approx(0.035)}
    seed_ci = stats.ttest_1samp([0.005, 0.035], 0.0).confidence_interval(0.95)
    assert r["seeds"] == 2
    assert (r["seed_low"], r["seed_high"]) == (pytest.approx(seed_ci.low), pytest.approx(seed_ci.high))
    assert r["p_tost"] == pytest.approx(tost(d, 0.05)["p_tost"]) and r["margin"] == 0.05
    # Without de-duplication the repeated draw enters as two more runs at -0.5.
    (dup,) = run_comparisons(_paired_rows(), ["A", "B"], ["B"], [1], resamples=500)
    assert dup["n"] == 6 and dup["mean_diff"] == pytest.approx((0.08 - 1.0) / 6)


def test_steps_to_reach_interpolates_between_snapshots():
    points = [(50, 0.1), (100, 0.3), (250, 0.5), (500, 0.6)]
    assert steps_to_reach(points, 0.4) == pytest.approx(100 + 0.1 * 150 / 0.2)
    assert steps_to_reach(points, 0.5) == 250
    assert steps_to_reach(points, 0.05) == 50  # at the first snapshot: an upper bound
    assert steps_to_reach(points, 0.7) is None
    assert steps_to_reach(list(reversed(points)), 0.4) == pytest.approx(175)


def _curve(init, draw, seed, points, k=1):
    return {"init": init, "K": k, "draw": draw, "seed": seed, "points": points}


def test_compute_to_reach_against_scratch_final_dice():
    curves = [_curve("scratch", 0, 0, [(100, 0.2), (200, 0.5), (400, 0.6)]),
              _curve("scratch", 0, 1, [(100, 0.3), (200, 0.35), (400, 0.4)]),
              _curve("moco", 0, 0, [(100, 0.5), (200, 0.6), (400, 0.7)]),
              _curve("moco", 0, 1, [(100, 0.1), (200, 0.3), (400, 0.5)])]
    reach = compute_to_reach(curves, 400, "scratch", 0.9)
    assert reach["targets"] == {1: pytest.approx(0.9 * (0.6 + 0.4) / 2)}  # 0.45
    steps = {(r["init"], r["seed"]): (r["steps"], r["upper_bound"]) for r in reach["runs"]}
    assert steps[("scratch", 0)] == (pytest.approx(100 + 0.25 * 100 / 0.3), False)
    assert steps[("scratch", 1)] == (None, False)  # never reaches 0.45
    assert steps[("moco", 0)] == (100, True)
    assert steps[("moco", 1)] == (pytest.approx(200 + 0.15 * 200 / 0.2), False)  # 350
    moco = next(s for s in reach["summary"] if s["init"] == "moco")
    ci = stats.ttest_1samp([100, 350], 0.0).confidence_interval(0.95)
    assert (moco["runs"], moco["reached"], moco["mean_steps"]) == (2, 2, pytest.approx(225))
    assert (moco["low"], moco["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    # Paired with scratch where both reached: seed 0 only, one pair, no interval.
    assert moco["pairs"] == 1 and moco["diff"] == pytest.approx(100 - 550 / 3)
    assert math.isnan(moco["diff_low"])
    assert compute_to_reach(curves, 400, "none_such")["summary"] == []
    with pytest.raises(ValueError, match="fraction"):
        compute_to_reach(curves, 400, fraction=0.0)


def test_mean_curves_on_the_steps_every_run_has():
    curves = [_curve("moco", 0, 0, [(100, 0.2), (200, 0.4), (400, 0.6)]),
              _curve("moco", 1, 0, [(100, 0.4), (400, 0.8)])]
    (c,) = mean_curves(curves)
    assert (c["runs"], c["points"]) == (2, [(100, pytest.approx(0.3)), (400, pytest.approx(0.7))])
    assert c["last_doubling"] == pytest.approx(0.7 - 0.3)  # 200 (half of 400) not shared


def _write_rows(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["init", "K", "draw", "seed", "case", "liver", "mean", "labelled_set",
                         "phase"])
        for r in rows:
            writer.writerow([r["init"], r["K"], r["draw"], r["seed"], r["case"], r["liver"],
                             r["mean"], r["labelled_set"] or "", r["phase"] or ""])


def test_read_results_csv_keeps_phase_and_labelled_set_as_text(tmp_path):
    path = tmp_path / "results.csv"
    _write_rows(path, [_row("A", 1, 0, 0, "c1", 0.5, "p1+p3", "unenhanced"),
                       _row("A", 1, 0, 0, "c2", 0.6)])
    rows, organs = read_results_csv(path)
    assert organs == ["liver"]
    assert rows[0]["labelled_set"] == "p1+p3" and rows[0]["phase"] == "unenhanced"
    assert rows[1]["labelled_set"] is None and rows[1]["phase"] is None


def test_report_deduplicates_gives_phases_equivalence_and_dice_against_steps(tmp_path):
    cfg = ExperimentConfig(dataset=str(tmp_path), labeled=[1], draws=[0, 1, 2], seeds=[0, 1],
                           bootstrap_resamples=200, baselines=["B"], finetune_steps=400,
                           initialisations=[InitSpec("B"), InitSpec("A", "moco")])
    _write_rows(tmp_path / "results.csv", _paired_rows())
    curves = [_curve("B", 0, 0, [(100, 0.3), (400, 0.6)]), _curve("B", 1, 0, [(100, 0.3), (400, 0.6)]),
              _curve("A", 0, 0, [(100, 0.6), (400, 0.7)]), _curve("A", 1, 0, [(100, 0.2), (400, 0.6)]),
              _curve("A", 2, 0, [(100, 0.0), (400, 0.0)])]  # the duplicate draw: left out
    text = write_report(cfg, tmp_path, tmp_path / "results.csv", {}, {}, per_run_curves=curves,
                        recorded_sets={}).read_text()
    assert "Labelled sets: 1 draw(s) repeat" in text
    assert "K = 1 draw 2 (= draw 0: p1);\n4 fine-tuned run(s) and 0 probe(s) dropped." in text
    d = np.array([RUN_D[k] for k in sorted(RUN_D)])
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert (f"| 1 | A | B | 4 | +0.020 | [{ci.low:+.3f}, {ci.high:+.3f}] | 0.25 |" in text)
    bound = tost(d, 0.02)["bound"]
    assert f"| no | ±{bound:.3f} | 2 |" in text
    # Summary over the kept rows: A at K = 1 has 8 cases (2 draws x 2 seeds x 2 cases).
    assert "| A | 1 | 8 | " in text
    # Per phase: B is 0.5 on c1 (portal venous) and 0.7 on c2 (unenhanced), A adds RUN_D.
    assert "## Dice per contrast phase" in text
    assert "| 1 | A | portal_venous | 4 | 0.520 ± 0.022 |" in text
    assert "| 1 | unenhanced | A | B | 4 | +0.020 |" in text
    # Dice against steps: target 0.9 x B's final 0.6 = 0.54, A's seed-0 draws reach it at
    # <= 100 and at 100 + (0.54 - 0.2) / (0.4 / 300) = 355.
    assert "## Dice against steps" in text
    assert (tmp_path / "figures" / "dice_vs_steps_K1.png").is_file()
    assert "| 1 | A | d0/s0: ≤ 100, d1/s0: 355 |" in text
    assert "| 1 | A | 0.540 | 2 / 2 | 228 [" in text


def test_report_of_a_committed_folder_without_the_new_columns(tmp_path):
    # docs/results/evidence_cpu predates "labelled_set" and "phase": the report still builds,
    # says that it could not de-duplicate, and its primary table is the per-run t interval.
    shutil.copy(EVIDENCE / "results.csv", tmp_path / "results.csv")
    cfg = load_config(ExperimentConfig, EVIDENCE / "experiment.yaml")
    text = write_report(cfg, tmp_path, tmp_path / "results.csv", {}, {}).read_text()
    assert "Labelled sets: not recorded" in text and "## Dice per contrast phase" not in text
    runs: dict[tuple, dict[str, list[float]]] = {}
    with open(EVIDENCE / "results.csv") as f:
        for r in csv.DictReader(f):
            if r["K"] == "2" and r["init"] in ("moco_lrc", "moco"):
                runs.setdefault((r["draw"], r["seed"]), {}).setdefault(r["init"], []).append(
                    float(r["mean"]))
    d = np.array([np.mean(v["moco_lrc"]) - np.mean(v["moco"]) for v in runs.values()])
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert (f"| 2 | moco_lrc | moco | {d.size} | {d.mean():+.3f} | "
            f"[{ci.low:+.3f}, {ci.high:+.3f}] |") in text


def _write_metrics(path, per_case, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"organs": ["liver", "spleen"], **extra, "cases": {
        case: {organ: {"dice": v} for organ, v in dice.items()} for case, dice in per_case.items()}}))


def test_run_curves_and_recorded_labelled_sets_from_run_folders(tmp_path):
    cfg = ExperimentConfig(dataset=str(tmp_path / "data"), labeled=[1], draws=[0, 1], seeds=[0],
                           finetune_steps=200, initialisations=[InitSpec("scratch")],
                           baselines=["scratch"])
    runs = tmp_path / "runs" / "finetune" / "scratch"
    # draw 0: a snapshot at 100 steps and the final metrics; its cases recorded in split.json.
    _write_metrics(runs / "K1_d0_s0" / "metrics.json",
                   {"c1": {"liver": 0.6, "spleen": 0.4}, "c2": {"liver": 0.8, "spleen": None}})
    _write_metrics(runs / "K1_d0_s0" / "metrics_step100.json",
                   {"c1": {"liver": 0.2, "spleen": 0.2}, "c2": {"liver": 0.4, "spleen": 0.4}})
    (runs / "K1_d0_s0" / "split.json").write_text(json.dumps({"labeled": ["p3"]}))
    # draw 1: no snapshot, the same labelled case recorded in its metrics.
    _write_metrics(runs / "K1_d1_s0" / "metrics.json", {"c1": {"liver": 0.5, "spleen": 0.5}},
                   labelled_cases=["p3"])
    (curve,) = run_curves(cfg, tmp_path)
    assert (curve["init"], curve["K"], curve["draw"], curve["seed"]) == ("scratch", 1, 0, 0)
    # per run: mean over cases of the per-case mean over organs with a Dice
    assert curve["points"] == [(100, pytest.approx((0.2 + 0.4) / 2)),
                               (200, pytest.approx((0.5 + 0.8) / 2))]
    sets = recorded_labelled_sets(cfg, tmp_path)
    assert sets == {(1, 0): "p3", (1, 1): "p3"}
    assert duplicate_draws(sets) == {(1, 1): 0}
