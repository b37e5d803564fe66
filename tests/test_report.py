"""The experiment report's tables and markdown: formatting of the statistics
(tests/test_statistics.py checks the numbers) and the sections of report.md in order."""

from __future__ import annotations

from conftest import paired_result_rows

from lrcseg.config import ExperimentConfig
from lrcseg.experiment.report import (
    comparisons_markdown,
    hd95_markdown,
    read_results_csv,
    seed_agreement_markdown,
    summary_markdown,
    write_report,
)
from lrcseg.experiment.statistics import comparisons, pooled_hd95, seed_agreement, summary


def _rows():
    return paired_result_rows()


def test_summary_markdown_shows_mean_and_sample_std():
    md = summary_markdown(summary(_rows(), ["liver", "mean"]), ["A", "B"], [1], ["liver", "mean"])
    assert "| A | 1 | 3 | 0.700 ± 0.200 | 0.700 ± 0.200 |" in md


def test_comparisons_markdown_stars_intervals_excluding_zero_and_not_single_pairs():
    (r,) = comparisons(_rows(), ["A", "B"], ["B"], [1], ["mean"], resamples=1000)
    line = comparisons_markdown([r], "mean").splitlines()[-1]
    assert line.startswith("| 1 | A | B | 3 | +0.167 * | [")  # every difference is > 0
    # A single pair has no interval: shown as such, never starred as "excluding 0".
    one = comparisons([x for x in _rows() if x["draw"] == 0], ["A", "B"], ["B"], [1], ["mean"],
                      resamples=1000, per_run=True)
    assert "| 1 | A | B | 1 | +0.100 | — | — |" in comparisons_markdown(one, "mean")
    assert comparisons_markdown([r], "liver").count("\n") == 1  # header only


def test_seed_agreement_markdown():
    md = seed_agreement_markdown(seed_agreement(_rows(), ["A", "B"], ["B"], [1]))
    assert md.splitlines()[-1] == "| 1 | A | B | s0: +0.167 | yes |"


def test_read_results_csv_types_and_missing(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("init,K,draw,seed,case,liver,spleen,mean\n"
                    "scratch,2,1,4,p7,0.5,,0.5\n")
    rows, organs = read_results_csv(path)
    assert organs == ["liver", "spleen"]
    assert rows == [{"init": "scratch", "K": 2, "draw": 1, "seed": 4, "case": "p7",
                     "liver": 0.5, "spleen": None, "mean": 0.5}]


def test_hd95_markdown_of_pooled_rows():
    result = {"organs": ["liver", "spleen"],
              "cases": {"a": {"liver": {"hd95_mm": 2.0}, "spleen": {"hd95_mm": 500.0}}},
              "counts": {"liver": {"missed": 0, "false_positive": 0},
                         "spleen": {"missed": 1, "false_positive": 0}}}
    pooled = pooled_hd95([result, result])
    table = hd95_markdown([{"init": "moco", "K": 1, "cells": 2, **pooled}])
    assert "| moco | 1 | 2 | 251.0 | 251.0 | 2 / 4 |" in table


def _write_csv(path, rows):
    lines = ["init,K,draw,seed,case,liver,mean"]
    lines += [f"{r['init']},{r['K']},{r['draw']},{r['seed']},{r['case']},"
              f"{'' if r['liver'] is None else r['liver']},{'' if r['mean'] is None else r['mean']}"
              for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _headings(text):
    return [line for line in text.splitlines() if line.startswith("#")]


def test_write_report_composes_the_sections_in_order(tmp_path):
    cfg = ExperimentConfig(dataset=str(tmp_path), labeled=[1], draws=[0, 1], seeds=[0],
                           bootstrap_resamples=200)
    rows = [{**r, "init": {"A": "moco_lrc", "B": "scratch"}[r["init"]]} for r in _rows()]
    _write_csv(tmp_path / "results.csv", rows)
    _write_csv(tmp_path / "probe_results.csv", rows)
    curves = [{"init": "scratch", "K": 1, "runs": 2, "points": [(10, 0.5), (20, 0.6)],
               "last_doubling": 0.1}]
    hd95 = [{"init": "scratch", "K": 1, "cells": 2, "mean": 3.0, "median": 2.0, "capped": 0,
             "n": 3}]
    path = write_report(cfg, tmp_path, tmp_path / "results.csv", {"platform": "p", "cpu": "c"},
                        {"total_seconds": 90.0, "invocations": [{}, {}]},
                        probe_path=tmp_path / "probe_results.csv", curves=curves, hd95=hd95)
    text = path.read_text()
    assert _headings(text) == [
        "# Experiment report", "## Primary endpoint: per-run paired differences",
        "### Equivalence and the interval over pre-training seeds",
        "## Fine-tuning convergence", "## Frozen-feature probe",
        "## Dice per initialisation and K", "## Paired differences against the baselines",
        "### Per fine-tuned run (the conservative view)",
        "### Per organ: Δ Dice [bootstrap 95% CI]", "## Figures", "## Configuration"]
    assert text.startswith("# Experiment report\n\n4 of 6 cells finished (3 initialisations")
    assert "| scratch | 1 | 2 | 0.500 | 0.600 | +0.100 |" in text
    assert "Time: 90 s summed over 2\ninvocation(s)" in text
    assert "![Dice vs K](figures/dice_vs_k.png)" in text
    assert (tmp_path / "figures" / "organ_bars.png").is_file()
    assert text.endswith("| scratch | 1 | 2 | 3.0 | 2.0 | 0 / 3 |\n")


def test_write_report_before_any_cell_finished(tmp_path):
    cfg = ExperimentConfig(dataset=str(tmp_path), labeled=[1], draws=[0], seeds=[0])
    _write_csv(tmp_path / "results.csv", [])
    text = write_report(cfg, tmp_path, tmp_path / "results.csv", {}, {}).read_text()
    assert "No learning curve recorded.\n\n\nMachine:" in text  # no probe section
    assert "## Fine-tuning\n\nNo fine-tuning cell finished yet.\n\n## Figures\n\n\n## Configuration" in text
    assert "HD95 over every scored" not in text and text.endswith("capped values.\n")
    assert not (tmp_path / "figures").exists()
