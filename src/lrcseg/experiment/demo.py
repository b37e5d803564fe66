"""The embedded default: the whole pipeline on synthetic phantoms, small enough for 2 CPU cores.

Stages (each skipped if its output already exists, so a rerun resumes):
    1. phantoms     an nnU-Net dataset of synthetic abdominal CT with standard splits
    2. check        read every case back through the same readers users' data goes through
    3. regions      superpixel cache + overlay figure
    4. pretrain     MoCo v2 alone and MoCo v2 + LRC, briefly
    5. finetune     scratch, MoCo and MoCo+LRC on the same K labelled case(s), same budget
    6. evaluate     per-organ Dice/HD95 on the test split, a table, report.md and figures
This is a smoke run of the machinery, not evidence about LRC: the budgets are tiny.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrcseg.config import (
    AugmentConfig,
    FinetuneConfig,
    LRCConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
)
from lrcseg.data.check import check_data
from lrcseg.data.slice_cache import SliceCache
from lrcseg.data.splits import pretraining_cases
from lrcseg.evaluate.metrics import write_metrics
from lrcseg.evaluate.run import evaluate_model
from lrcseg.experiment.console import say
from lrcseg.experiment.report import HD95_CONVENTION
from lrcseg.experiment.statistics import hd95_summary
from lrcseg.io_utils import append_invocation, atomic_write_json, atomic_write_text
from lrcseg.models.load import find_checkpoint
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.runtime import resolve_device
from lrcseg.superpixels.region_cache import RegionCache
from lrcseg.train.finetune import finetune
from lrcseg.train.pretrain import pretrain
from lrcseg.viz import montage


@dataclass(frozen=True)
class DemoSize:
    cases: int
    phantom_spacing: tuple[float, float, float]
    spacing_mm: float
    image_size: int
    pretrain_steps: int
    finetune_steps: int
    batch_size: int


FULL = DemoSize(cases=10, phantom_spacing=(2.0, 2.0, 5.0), spacing_mm=3.0, image_size=96,
                pretrain_steps=100, finetune_steps=250, batch_size=8)
FAST = DemoSize(cases=6, phantom_spacing=(3.0, 3.0, 6.0), spacing_mm=3.0, image_size=64,
                pretrain_steps=10, finetune_steps=15, batch_size=4)

INITIALISATIONS = ("scratch", "moco", "moco_lrc")


_say = partial(say, "demo")


def demo_configs(out: Path, size: DemoSize, device: str, seed: int = 0
                 ) -> tuple[dict[str, PretrainConfig], dict[str, FinetuneConfig]]:
    """The pre-training and fine-tuning configurations the demo runs."""
    data = str(out / "phantoms")
    preprocess = PreprocessConfig(spacing_mm=size.spacing_mm)
    model = ModelConfig(backbone="resnet18")

    def run(name: str, steps: int) -> RunConfig:
        return RunConfig(out=str(out / "runs" / name), steps=steps, batch_size=size.batch_size,
                         seed=seed, device=device, checkpoint_every=max(5, steps // 2),
                         log_every=max(1, steps // 10))

    pretrain = {
        name: PretrainConfig(
            data=[data], method="moco", run=run(name, size.pretrain_steps),
            preprocess=preprocess, model=model,
            augment=AugmentConfig(image_size=size.image_size),
            lrc=LRCConfig(enabled=lrc), optim=OptimConfig(lr=1e-3, warmup_steps=5))
        for name, lrc in (("moco", False), ("moco_lrc", True))
    }
    finetune = {
        f"ft_{init}": FinetuneConfig(
            dataset=data, init="scratch" if init == "scratch" else str(out / "runs" / init),
            labeled=1, split_seed=seed,
            run=run(f"ft_{init}", size.finetune_steps), preprocess=preprocess, model=model,
            image_size=size.image_size, optim=OptimConfig(lr=1e-3, warmup_steps=5))
        for init in INITIALISATIONS
    }
    return pretrain, finetune


def run_demo(out: str | Path = "lrcseg_demo", fast: bool = False, device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Run every stage; returns {"results": {init: metrics}, "report": path, "seconds": s}."""
    t0 = time.time()
    out = Path(out)
    size = FAST if fast else FULL
    _say(f"{'fast ' if fast else ''}smoke run of the whole pipeline in {out}/ "
         "(not evidence: see docs/results/ for measured comparisons)")
    data = out / "phantoms"
    _write_phantoms(data, size)
    _check_phantoms(data)
    pretrain_cfgs, finetune_cfgs = demo_configs(out, size, device)
    _say("3/6 superpixel regions (cached) and an overlay figure")
    _region_figure(pretrain_cfgs["moco_lrc"], out / "figures" / "superpixels.png")
    _pretrain_all(pretrain_cfgs, progress)
    results = _finetune_and_evaluate(finetune_cfgs, resolve_device(device), out / "figures",
                                     progress)

    table = comparison_table(results)
    print(table)
    seconds = time.time() - t0
    timings = append_invocation(out / "timings.json", seconds)
    report_path = out / "report.md"
    atomic_write_text(report_path, _report(table, hd95_table(results), size, seconds, fast,
                                           timings))
    atomic_write_json(out / "results.json", {"results": results, "seconds": seconds})
    _say(f"done in {seconds:.0f} s: {report_path}, figures in {out / 'figures'}")
    return {"results": results, "report": str(report_path), "seconds": seconds}


def _write_phantoms(data: Path, size: DemoSize) -> None:
    """Stage 1: the phantom dataset, unless it is there already."""
    if not (data / "dataset.json").is_file():
        _say(f"1/6 writing {size.cases} synthetic abdominal CT phantoms to {data}")
        write_phantom_dataset(data, cases=size.cases, seed=0, spacing_mm=size.phantom_spacing)
    else:
        _say(f"1/6 phantoms already in {data}")


def _check_phantoms(data: Path) -> None:
    """Stage 2: every case read back through the readers users' data goes through."""
    report = check_data(data)
    if report["errors"]:
        raise RuntimeError(f"the demo dataset failed its own check: {report['errors']}")
    _say(f"2/6 check-data: {len(report['cases'])} cases read back, no errors")


def _pretrain_all(configs: dict[str, PretrainConfig], progress: bool) -> None:
    """Stage 4: each pre-training run, skipped if finished, resumed from its checkpoint."""
    for name, cfg in configs.items():
        if find_checkpoint(Path(cfg.run.out)) and (Path(cfg.run.out) / "final.pt").is_file():
            _say(f"4/6 pre-training {name}: done already")
            continue
        resume = (Path(cfg.run.out) / "checkpoint.pt").is_file()
        _say(f"4/6 pre-training {name} ({cfg.run.steps} steps, {cfg.model.backbone}, "
             f"{cfg.augment.image_size} px views)")
        pretrain(cfg, resume=resume, progress=progress)


def _finetune_and_evaluate(configs: dict[str, FinetuneConfig], device: torch.device,
                           figures: Path, progress: bool) -> dict[str, Any]:
    """Stages 5 and 6: fine-tune each initialisation (unless finished) and evaluate it on the
    test split; returns {init: metrics} (``SegmentationMetrics.result()`` dicts)."""
    results: dict[str, Any] = {}
    for name, cfg in configs.items():
        if not (Path(cfg.run.out) / "final.pt").is_file():
            resume = (Path(cfg.run.out) / "checkpoint.pt").is_file()
            _say(f"5/6 fine-tuning {name} on {int(cfg.labeled)} labelled case ({cfg.run.steps} steps)")
            finetune(cfg, resume=resume, progress=progress)
        metrics_path = Path(cfg.run.out) / "metrics.json"
        _say(f"6/6 evaluating {name} on the test split")
        result = evaluate_model(cfg.run.out, cfg.dataset, "test", device,
                                figures_dir=figures / name, progress=progress)
        write_metrics(result, metrics_path)
        results[name.removeprefix("ft_")] = result
    return results


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: mean Dice per organ (rows) for each initialisation (columns)."""
    inits = list(results)
    organs = next(iter(results.values()))["organs"] if results else []
    lines = ["| organ | " + " | ".join(inits) + " |", "|---|" + "---|" * len(inits)]
    for organ in organs:
        cells = []
        for init in inits:
            dice = results[init]["mean"].get(organ, {}).get("dice")
            cells.append("—" if dice is None else f"{dice:.3f}")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    lines.append("| **mean Dice** | " + " | ".join(
        f"**{results[i]['mean_dice']:.3f}**" if results[i]["mean_dice"] is not None else "—"
        for i in inits) + " |")
    return "\n".join(lines)


def hd95_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: HD95 per organ (rows) for each initialisation (columns) as
    "mean / median (capped c of n)" in mm (``lrcseg.experiment.statistics.hd95_summary``)."""
    inits = list(results)
    summaries = {init: hd95_summary(results[init]) for init in inits}
    organs = next(iter(results.values()))["organs"] if results else []
    lines = ["| organ | " + " | ".join(inits) + " |", "|---|" + "---|" * len(inits)]
    for organ in organs:
        cells = []
        for init in inits:
            h = summaries[init][organ]
            cells.append("—" if h["mean"] is None else
                         f"{h['mean']:.1f} / {h['median']:.1f} ({h['capped']} of {h['n']} capped)")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _region_figure(cfg: PretrainConfig, path: Path) -> None:
    """Superpixel boundaries on a few pre-training slices (radiological orientation)."""
    cases, _ = pretraining_cases(cfg.data)
    slice_cache = SliceCache(cfg.preprocess, root=cfg.run.cache_dir)
    region_cache = RegionCache(slice_cache, cfg.superpixels)
    region_cache.build(cases, workers=0, progress=False)
    images, regions, titles = [], [], []
    for case in cases[:3]:
        vol = slice_cache.get(case)
        with_body = np.flatnonzero(np.asarray(vol.body).reshape(vol.body.shape[0], -1).any(1))
        z = int(with_body[len(with_body) // 2])
        reg = np.asarray(region_cache.get(case)[z])
        images.append(np.asarray(vol.image[z, 0], dtype=np.float32))
        regions.append(reg)
        titles.append(f"{case.id} z={z}: {len(np.unique(reg[reg > 0]))} regions")
    montage(images, regions, titles, path, ncols=3, boundaries=True, panel_in=5.0,
            spacing_xy=(cfg.preprocess.spacing_mm,) * 2)


def _report(table: str, hd95: str, size: DemoSize, seconds: float, fast: bool,
            timings: dict[str, Any]) -> str:
    """report.md: the tables, what the run was, and its run time (all invocations)."""
    runs = len(timings["invocations"])
    run_time = (f"{seconds:.0f} s" if runs == 1 else
                f"{seconds:.0f} s in this invocation, {timings['total_seconds']:.0f} s over the "
                f"folder's {runs} invocations (a rerun reuses the finished stages; "
                "`timings.json`)")

    return f"""# lrcseg demo report

**A smoke run, not evidence.** {size.cases} synthetic phantoms, ResNet-18 U-Net,
{size.pretrain_steps} pre-training and {size.finetune_steps} fine-tuning steps on
{size.image_size}-pixel crops{' (--fast)' if fast else ''}. With budgets this small the
differences between columns are noise; measured comparisons are in `docs/results/`.

Mean Dice per organ on the phantom test split (1 labelled training case, same split, seed and
budget for every initialisation):

{table}

HD95 per organ, mm: mean / median over the test cases (capped: missed organs or false
positives, which enter the mean at the cap). {HD95_CONVENTION}

{hd95}

Per-case numbers: `runs/ft_*/metrics.json`. Figures: `figures/` (superpixels, and image /
reference / prediction per test case and initialisation). Run time: {run_time}.
"""
