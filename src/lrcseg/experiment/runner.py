"""The experiment runner: initialisations x labelled cases (K) x draws x seeds, fairly.

    phantoms (optional) -> for each (initialisation, seed), one self-contained block:
        one pre-training run (shared by every K and draw)
        -> with ``probe``: a frozen-feature linear probe per (K, draw) (``lrcseg.evaluate.probe``)
        -> for each cell (initialisation, K, draw, seed): fine-tune on the K cases drawn by
           ``choose_labelled(dataset, K, split_seed)`` (the draw's split seed,
           ``cells.labelled_split_seed``: the draw itself, or the seed of the draw-th distinct
           labelled set) with the same step budget and fine-tuning strategy -> evaluate on the
           test split (and, for the ``learning_curve`` initialisations, the snapshots at
           ``curve_steps``), both by the fine-tuning back-end (``finetune_with``: lrcseg's own
           or nnU-Net's trainer, whose ``nnunet_configuration``, 2d or 3d_fullres, also sets
           the network every initialisation pre-trains)
        -> without ``keep_checkpoints``: the block's weights are deleted once its metrics
           are written, so a long run only ever holds one block's checkpoints
    -> results.csv, probe_results.csv, report.md, figures

The folder layout, the derived run configs and what may change between invocations are in
``cells.py``; the fine-tuning back-ends in ``backends.py``; parallel invocations of one folder
in ``locks.py``; the rows the report reads in ``results.py``; the statistics, tables and
figures in ``report.py``.

Resuming: a cell whose ``metrics.json`` exists is never rerun; a run folder with a
``checkpoint.pt`` continues with ``resume=True``; a run folder that crashed before its first
checkpoint is started again. Rows for pairs are matched on (draw, seed, case), so every
initialisation sees the same labelled cases and the same test cases.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lrcseg.config import ExperimentConfig, FinetuneConfig, InitSpec
from lrcseg.errors import ConfigError
from lrcseg.evaluate.metrics import write_metrics
from lrcseg.evaluate.probe import evaluate_probe
from lrcseg.evaluate.run import evaluate_model
from lrcseg.experiment.backends import CellRun, FinetuneBackend, delete_weights, finetune_backend
from lrcseg.experiment.cells import (
    RELEASED,
    Cell,
    block_tasks,
    cells,
    check_labelled_sets,
    curve_metrics_path,
    dataset_path,
    finetune_config,
    labelled_split_seed,
    pretrain_config,
    pretrain_dir,
    probe_dir,
    register,
    task_metrics,
)
from lrcseg.experiment.console import say
from lrcseg.experiment.locks import exclusive_lock, lock_path
from lrcseg.experiment.report import write_report
from lrcseg.experiment.results import (
    hd95_rows,
    learning_curves,
    load_results,
    qualitative_rows,
    write_results_csv,
)
from lrcseg.io_utils import append_invocation, atomic_write_text
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.runtime import cpu_model, resolve_device
from lrcseg.train.finetune import finetune
from lrcseg.train.pretrain import pretrain

_say = partial(say, "experiment")


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                   max_seconds: float | None = None) -> Path:
    """Run (or resume) the whole matrix in ``out_dir``; returns the path of results.csv.

    Pre-training runs: one per (pre-trained initialisation, seed). Cells: one fine-tune per
    (initialisation, K, draw, seed), evaluated on ``cfg.eval_split``; a cell with
    metrics.json is never rerun. results.csv, report.md and figures are rewritten from all
    finished cells at the end of every invocation.
    max_seconds: start no new cell after this much time (the running one finishes), so a
    long matrix can be run in chunks (e.g. one per working session); rerun to continue.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = register(cfg, out_dir)
    data = _prepare_dataset(cfg, out_dir)
    check_labelled_sets(cfg, data)  # a draw_mode the dataset cannot serve fails now
    backend = finetune_backend(cfg)
    backend.prepare(data, out_dir)

    tasks = block_tasks(cfg)
    for spec in cfg.initialisations:  # a bad override fails now, not after other blocks trained
        if spec.pretrained:
            pretrain_config(cfg, spec, cfg.seeds[0], data, out_dir)
    matrix = _MatrixRun(cfg, whole, data, out_dir, resolve_device(cfg.device), progress,
                        len(tasks), backend)
    _run_tasks(matrix, tasks, _TimeBudget(t0, max_seconds, len(tasks)))

    seconds = time.time() - t0
    timings = _record_time(out_dir, seconds, matrix.trained)
    # One writer at a time, reading the finished cells inside the lock, so a report never
    # replaces a newer one with older numbers; it covers every initialisation of the folder.
    with exclusive_lock(lock_path(out_dir, "report"), wait=True):
        results_path, reported = _write_results_and_report(whole, data, out_dir, matrix.device,
                                                           timings)
    if reported:
        _say(f"done: {results_path}, {out_dir / 'report.md'} "
             f"({matrix.trained['pretrain']} pre-training and {matrix.trained['finetune']} "
             f"fine-tuning runs trained in this call, {seconds:.0f} s)")
    return results_path


def _prepare_dataset(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """The matrix's dataset; generates its phantoms first if the experiment has them (once,
    under a lock, whichever invocation comes first)."""
    data = dataset_path(cfg, out_dir)
    if cfg.phantoms is not None:
        with exclusive_lock(lock_path(out_dir, "phantoms"), wait=True):
            if not (data / "dataset.json").is_file():
                _say(f"writing {cfg.phantoms.cases} phantoms to {data}")
                write_phantom_dataset(data, cases=cfg.phantoms.cases, seed=cfg.phantoms.seed,
                                      spacing_mm=cfg.phantoms.spacing_mm,
                                      anatomy=cfg.phantoms.anatomy,
                                      pretrain_fraction=cfg.phantoms.pretrain_fraction,
                                      train_fraction=cfg.phantoms.train_fraction)
    if not (data / "dataset.json").is_file() and not data.exists():
        raise ConfigError(f"{data}: dataset not found")
    return data


@dataclass
class _TimeBudget:
    """No new task starts once ``max_seconds`` have passed since ``t0`` (None = no limit)."""

    t0: float
    max_seconds: float | None
    total: int

    def spent(self, i: int) -> bool:
        """True (and says so) if the budget is spent before task ``i``."""
        if self.max_seconds is None or time.time() - self.t0 < self.max_seconds:
            return False
        _say(f"time budget of {self.max_seconds:.0f} s reached before task {i}/{self.total}; "
             "rerun the same command to continue")
        return True


def _run_tasks(matrix: _MatrixRun, tasks: list[tuple[str, Cell]], budget: _TimeBudget) -> None:
    """Every unfinished task, in order, until the time budget is spent.

    First pass: skip what other processes hold; second pass: wait for it, so every process
    helps until the matrix is done (a holder never waits on anything, so nothing deadlocks).
    """
    skipped: list[tuple[int, str, Cell]] = []
    stopped = False
    for i, (kind, cell) in enumerate(tasks, 1):
        if task_metrics(matrix.out_dir, kind, cell).is_file():
            continue
        if stopped := budget.spent(i):
            break
        if not matrix.run_task(i, kind, cell, wait=False):
            _say(f"{kind} {i}/{len(tasks)}: {cell.folder} is held by another process; later")
            skipped.append((i, kind, cell))
    for i, kind, cell in skipped:
        if stopped or (stopped := budget.spent(i)):
            break
        matrix.run_task(i, kind, cell, wait=True)


@dataclass
class _MatrixRun:
    """One invocation's work on the matrix: claims, trains and scores its tasks.

    cfg: this invocation's matrix; whole: the folder's (every initialisation it has seen);
    data: the dataset; device: where the networks run; total: how many tasks ``cfg`` has
    (for the messages); backend: what fine-tunes and scores the cells
    (``backends.finetune_backend``); trained: the runs trained in this invocation, by kind.
    """

    cfg: ExperimentConfig
    whole: ExperimentConfig
    data: Path
    out_dir: Path
    device: torch.device
    progress: bool
    total: int
    backend: FinetuneBackend
    trained: dict[str, int] = field(default_factory=lambda: {"pretrain": 0, "finetune": 0})
    release_tasks: list[tuple[str, Cell]] = field(init=False)

    def __post_init__(self) -> None:
        # A block is finished when its probes AND fine-tunes are, even in a probes-only
        # invocation (fine-tunes may follow), over every initialisation the folder has.
        self.release_tasks = block_tasks(dataclasses.replace(self.whole, finetune=True))

    def run_task(self, i: int, kind: str, cell: Cell, wait: bool) -> bool:
        """Task ``i`` ("probe" | "finetune" of ``cell``) unless done, then release its block's
        weights if that finished it; False if another process holds the task."""
        ok = self._attempt(i, kind, cell, wait)
        if ok:
            self.release_block(self.cfg.init(cell.init), cell.seed)
        return ok

    def _attempt(self, i: int, kind: str, cell: Cell, wait: bool) -> bool:
        """Claim the task and run it unless done; False if another process holds it or the
        pre-training it needs."""
        spec = self.cfg.init(cell.init)
        claim = lock_path(self.out_dir, f"{kind}_{cell.init}_{Path(cell.folder).name}")
        with exclusive_lock(claim, wait) as held:
            if not held:
                return False
            if task_metrics(self.out_dir, kind, cell).is_file():  # finished by another process
                return True
            if spec.pretrained and not self.ensure_pretrained(spec, cell.seed, wait):
                return False
            if kind == "probe":
                self._probe(i, cell, spec)
            else:
                self._finetune(i, cell)
            return True

    def ensure_pretrained(self, spec: InitSpec, seed: int, wait: bool) -> bool:
        """Make sure the pre-training run exists; False if another process is training it."""
        pt_cfg = pretrain_config(self.cfg, spec, seed, self.data, self.out_dir)
        final = Path(pt_cfg.run.out) / "final.pt"
        if final.is_file():
            return True
        released = Path(pt_cfg.run.out) / RELEASED
        if released.is_file():
            raise ConfigError(f"{released}: this pre-training's weights were deleted once its block "
                              "was finished (keep_checkpoints: false); the matrix has grown since. "
                              "Delete the marker to pre-train it again (same config and seed), or "
                              "use a new --out")
        with exclusive_lock(self._pretrain_lock(spec.name, seed), wait) as held:
            if held and not final.is_file():
                _say(f"pre-training {spec.name}_s{seed} ({self.cfg.pretrain_steps} steps)")
                self.trained["pretrain"] += _ensure_run(pretrain, pt_cfg, final, self.progress)
            return held

    def _finetune(self, i: int, cell: Cell) -> None:
        """Fine-tune ``cell`` (or resume it) with the back-end, then score it and its
        learning-curve snapshots."""
        run = CellRun(self.cfg, finetune_config(self.cfg, cell, self.data, self.out_dir),
                      self.data, self.out_dir, self.device, self.progress,
                      train_lrcseg=self._train_finetune, evaluate_lrcseg=self._evaluate)
        _say(f"cell {i}/{self.total}: {cell.folder} ({self.cfg.finetune_steps} steps)")
        self.trained["finetune"] += self.backend.finetune(run)
        for step, result in self.backend.learning_curve(run):  # first: metrics.json = done
            write_metrics(result, curve_metrics_path(self.out_dir, cell, step))
        write_metrics(self.backend.evaluate(run), run.folder / "metrics.json")
        if not self.cfg.keep_checkpoints:
            self.backend.release(run)

    def _train_finetune(self, ft_cfg: FinetuneConfig) -> bool:
        """lrcseg's fine-tuning of ``ft_cfg`` to its final.pt (``CellRun.train_lrcseg``)."""
        return _ensure_run(finetune, ft_cfg, Path(ft_cfg.run.out) / "final.pt", self.progress)

    def _evaluate(self, model: Path) -> dict[str, Any]:
        """lrcseg's evaluation of a fine-tuned run or snapshot on ``eval_split``
        (``CellRun.evaluate_lrcseg``)."""
        return evaluate_model(model, self.data, self.cfg.eval_split, self.device,
                              progress=self.progress)

    def _probe(self, i: int, cell: Cell, spec: InitSpec) -> None:
        """Probe ``cell.init``'s pre-training (or, for scratch, a random network) at (K, draw)."""
        cfg = self.cfg
        _say(f"probe {i}/{self.total}: {cell.folder}")
        scratch = not spec.pretrained
        result = evaluate_probe(
            "scratch" if scratch else str(pretrain_dir(self.out_dir, spec.name, cell.seed)),
            self.data, labeled=cell.labeled,
            split_seed=labelled_split_seed(cfg, self.data, cell.labeled, cell.draw),
            split=cfg.eval_split,
            seed=cell.seed, backbone=cfg.backbone if scratch else None,
            spacing_mm=cfg.spacing_mm if scratch else None, pixels=cfg.probe_pixels,
            levels=cfg.probe_levels, batchnorm=cfg.probe_batchnorm,
            device=self.device, cache_dir=cfg.cache_dir, progress=self.progress)
        write_metrics(result, probe_dir(self.out_dir, cell) / "metrics.json")

    def release_block(self, spec: InitSpec, seed: int) -> None:
        """Delete the block's pre-training weights once every probe and cell of it is done,
        leaving a marker so a later, larger matrix is told instead of silently retraining."""
        if self.cfg.keep_checkpoints or not spec.pretrained:
            return
        if not all(task_metrics(self.out_dir, kind, cell).is_file()
                   for kind, cell in self.release_tasks
                   if cell.init == spec.name and cell.seed == seed):
            return
        run_dir = pretrain_dir(self.out_dir, spec.name, seed)
        with exclusive_lock(self._pretrain_lock(spec.name, seed), wait=True):
            if (run_dir / "final.pt").is_file():
                atomic_write_text(run_dir / RELEASED, "weights deleted: every probe and "
                                  "fine-tune of this block has its metrics.json\n")
                delete_weights(run_dir)

    def _pretrain_lock(self, init: str, seed: int) -> Path:
        return lock_path(self.out_dir, f"pretrain_{init}_s{seed}")


def _ensure_run(train, run_cfg: Any, final: Path, progress: bool) -> bool:
    """Run ``train(run_cfg)`` unless ``final`` exists; resume from checkpoint.pt if there.

    Returns True if training ran. A folder without checkpoint.pt (crashed before the first
    one) holds nothing to keep and is started again.
    """
    run_dir = Path(run_cfg.run.out)
    if final.is_file():
        return False
    resume = (run_dir / "checkpoint.pt").is_file()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    train(run_cfg, resume=resume, progress=progress)
    return True


def _record_time(out_dir: Path, seconds: float, trained: dict[str, int]) -> dict[str, Any]:
    """Append this invocation to timings.json; returns the record with the running total."""
    with exclusive_lock(lock_path(out_dir, "timings"), wait=True):  # parallel invocations
        return append_invocation(out_dir / "timings.json", seconds, trained=trained,
                                 host=platform.node(), pid=os.getpid())


def _write_results_and_report(whole: ExperimentConfig, data: Path, out_dir: Path,
                              device: torch.device, timings: dict[str, Any]) -> tuple[Path, bool]:
    """results.csv (and probe_results.csv), then report.md and its figures unless no cell has
    finished yet; returns (the path of results.csv, whether a report was written)."""
    results_path = write_results_csv(whole, out_dir)
    has_probes = whole.probe or any(task_metrics(out_dir, "probe", c).is_file()
                                    for c in cells(whole))
    probe_path = write_results_csv(whole, out_dir, "probe") if has_probes else None
    if not load_results(whole, out_dir)[0] and not (probe_path and load_results(whole, out_dir, "probe")[0]):
        _say("no finished cell yet: results.csv has only its header, no report")
        return results_path, False
    qualitative = (qualitative_rows(whole, data, out_dir, device)
                   if whole.qualitative_figure else None)
    write_report(whole, out_dir, results_path, machine=_machine(), timings=timings,
                 qualitative=qualitative, probe_path=probe_path,
                 curves=learning_curves(whole, out_dir), hd95=hd95_rows(whole, out_dir))
    return results_path, True


def _machine() -> dict[str, str]:
    """The platform, Python, torch, CPU model and GPU the report names."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu_model(), "gpu": gpu}
