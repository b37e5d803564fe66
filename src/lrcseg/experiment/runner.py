"""The experiment runner: initialisations x labelled cases (K) x draws x seeds, fairly.

    phantoms (optional) -> for each (initialisation, seed), one self-contained block:
        one pre-training run (shared by every K and draw)
        -> with ``probe``: a frozen-feature linear probe per (K, draw) (``lrcseg.evaluate.probe``)
        -> for each cell (initialisation, K, draw, seed): fine-tune on the K cases drawn by
           ``choose_labelled(dataset, K, split_seed=draw)`` with the same step budget ->
           evaluate on the test split (and, for the ``learning_curve`` initialisations, the
           snapshots at 1/4 and 1/2 of the budget)
        -> without ``keep_checkpoints``: the block's weights are deleted once its metrics
           are written, so a long run only ever holds one block's checkpoints
    -> results.csv, probe_results.csv, report.md, figures

Output folder::

    experiment.yaml                 the resolved configuration (a rerun must match it)
    runs/pretrain/<init>_s<seed>/   pre-training run folders
    runs/finetune/<init>/K<k>_d<draw>_s<seed>/   fine-tuning runs, each with metrics.json
                                    (and metrics_step<N>.json for learning-curve snapshots)
    runs/probe/<init>/K<k>_d<draw>_s<seed>/metrics.json   probes (seed = pre-training seed)
    results.csv, probe_results.csv, report.md, figures/, timings.json

Resuming: a cell whose ``metrics.json`` exists is never rerun; a run folder with a
``checkpoint.pt`` continues with ``resume=True``; a run folder that crashed before its first
checkpoint is started again. Rows for pairs are matched on (draw, seed, case), so every
initialisation sees the same labelled cases and the same test cases.

Parallel invocations: several processes may run the same experiment folder at once (one per
GPU or CPU core, on one machine): each pre-training run and each cell is claimed with an
exclusive ``flock`` under ``locks/`` while it trains, and a process skips what another one
holds. The lock dies with its process, so a killed run leaves nothing stale behind.

Extending: the matrix axes (initialisations, labeled, draws, seeds) and the report settings
may change between invocations of one folder, so a finished experiment can gain an
initialisation or a seed; everything that changes what a cell computes may not, and neither
may the definition of an initialisation that already has a name.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrcseg.config import (
    PRETRAIN_METHODS,
    AugmentConfig,
    FinetuneConfig,
    LRCConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
    SuperpixelConfig,
    from_dict,
    save_config,
    stable_hash,
    to_dict,
    update_dict,
)
from lrcseg.errors import ConfigError
from lrcseg.io_utils import append_invocation, atomic_write_text

#: left in a pre-training folder whose weights were deleted (keep_checkpoints: false)
RELEASED = "weights_released.txt"
# Fields that may change between invocations of the same experiment without changing results.
_RUNTIME_FIELDS = ("device", "configurations_tried", "progress_note", "keep_checkpoints")
# Fields that choose which cells exist and how they are reported: a finished cell stays valid
# when they change (an initialisation's definition is checked name by name instead).
_MATRIX_FIELDS = ("initialisations", "labeled", "draws", "seeds", "baselines",
                  "bootstrap_resamples", "bootstrap_seed", "qualitative_figure", "probe",
                  "finetune", "learning_curve")
_NOT_COMPARED = (*_RUNTIME_FIELDS, *_MATRIX_FIELDS)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class PhantomSpec:
    """Generate the dataset: ``write_phantom_dataset(out, cases, seed, spacing_mm)``.

    out: folder for the dataset (relative paths are inside the experiment folder).
    """

    out: str = "phantoms"
    cases: int = 20
    seed: int = 0
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 5.0)

    def __post_init__(self) -> None:
        self.spacing_mm = tuple(float(v) for v in self.spacing_mm)
        _check(self.cases >= 3, f"Illegal phantoms.cases {self.cases}: need >= 3 (pretrain/train/test)")
        _check(len(self.spacing_mm) == 3 and all(s > 0 for s in self.spacing_mm),
               f"Illegal phantoms.spacing_mm {self.spacing_mm}: three values > 0")


@dataclass
class InitSpec:
    """One initialisation of the matrix.

    name: its label in results and the report (unique; a folder name).
    method: "scratch" (no pre-training) or a pre-training method (moco, simclr, byol, none,
        supervised); "none" = LRC alone.
    lrc: add the LRC loss. regions: "felzenszwalb" or "grid" local regions.
    lrc_weight, lrc_temperature: overrides of lambda and tau_local (None = the default).
    overrides: nested keys of the pre-training config for this initialisation only (applied
        after the experiment's ``pretrain_overrides``), e.g. ``{model: {local_levels: [2, 3,
        4]}, moco: {momentum: 0.99}}``.
    """

    name: str = ""
    method: str = "scratch"
    lrc: bool = False
    regions: str = "felzenszwalb"
    lrc_weight: float | None = None
    lrc_temperature: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.name) and self.name.replace("_", "").replace("-", "").replace(".", "").isalnum(),
               f"Illegal initialisation name {self.name!r}: letters, digits, '_', '-', '.'")
        _check(self.method in ("scratch", *PRETRAIN_METHODS),
               f"initialisation {self.name}: illegal method {self.method!r}; one of scratch, "
               + ", ".join(PRETRAIN_METHODS))
        _check(self.regions in ("felzenszwalb", "grid"),
               f"initialisation {self.name}: illegal regions {self.regions!r}: felzenszwalb or grid")
        _check(self.method != "scratch" or not self.lrc,
               f"initialisation {self.name}: scratch has no pre-training to add LRC to")
        _check(self.method != "none" or self.lrc,
               f"initialisation {self.name}: method 'none' needs lrc: true (LRC alone)")
        _check(isinstance(self.overrides, dict),
               f"initialisation {self.name}: overrides must be a mapping of config keys")
        _check(self.method != "scratch" or not self.overrides,
               f"initialisation {self.name}: scratch has no pre-training to override")

    @property
    def pretrained(self) -> bool:
        return self.method != "scratch"


@dataclass
class ExperimentConfig:
    """A matrix of initialisations x labelled-case counts x draws x seeds on fixed splits.

    dataset: an existing labelled dataset with splits.json (pretrain/train/test), or None with
        ``phantoms`` set to generate one. labels_dataset: labelled source for "supervised".
    labeled: K values; draws: split seeds choosing the K labelled cases; seeds: training seeds.
    pretrain_steps, finetune_steps: the budgets (identical for every cell).
    eval_split: the split of splits.json the fine-tuned models are scored on: "test" for the
        evidence, "pretrain" (the pre-training pool) to choose hyper-parameters without test cases.
    baselines: initialisation names every other one is compared with (paired tests).
    configurations_tried: how many configurations were run before this one (reported).
    bootstrap_resamples, bootstrap_seed: the paired bootstrap of the report.
    pretrain_overrides: nested keys applied to every pre-training config (e.g. superpixels,
        augmentation, LRC sampling), before each initialisation's own ``overrides``.
    probe: also run the frozen-feature linear probe (``lrcseg.evaluate.probe.evaluate_probe``) of
        every (initialisation, seed) at each (K, draw), scored on ``eval_split``;
        probe_pixels is its pixel budget. Scratch is probed as a random network per seed.
    finetune: False = probes only (a pre-training sweep scored by the probe); needs probe.
    learning_curve: initialisations whose cells are also evaluated after 1/4 and 1/2 of the
        fine-tuning budget (the report states the change over the last doubling).
    keep_checkpoints: False deletes each block's weights once its metrics are written
        (pre-training weights once every probe and cell of the block has finished).
    finetune_with: "lrcseg" (lrcseg's fine-tuning) or "nnunet": every initialisation is then
        nnU-Net's 2d network (its plans, made once by nnU-Net's planner for the dataset in
        ``<out>/nnunet``), pre-trained through ``--nnunet-plans`` and fine-tuned by nnU-Net's
        own trainer on the K labelled cases for ``finetune_steps`` iterations
        (``nnunet_iterations_per_epoch`` per epoch), scored by lrcseg's evaluation. Needs the
        lrcseg[nnunet] extra and an nnU-Net raw dataset (phantoms are one); no probes or
        learning curves; the pre-training views are the plans' patch, not image_size.
    nnunet_dataset_id: the id under which nnU-Net sees the dataset (its folder naming).
    nnunet_mirroring: nnU-Net's test-time mirroring when predicting (its default; on).
    nnunet_batch_size: nnU-Net's fine-tuning batch size (None = the plans'; a CPU-sized run
        may lower it).
    """

    dataset: str | None = None
    phantoms: PhantomSpec | None = None
    labels_dataset: str | None = None
    initialisations: list[InitSpec] = field(default_factory=lambda: [
        InitSpec("scratch"), InitSpec("moco", "moco"), InitSpec("moco_lrc", "moco", lrc=True)])
    labeled: list[int] = field(default_factory=lambda: [1, 2])
    draws: list[int] = field(default_factory=lambda: [0, 1, 2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    pretrain_steps: int = 2000
    finetune_steps: int = 500
    backbone: str = "resnet18"
    image_size: int = 128
    spacing_mm: float = 2.0
    batch_size: int = 32
    finetune_batch_size: int = 8
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-3
    warmup_steps: int = 50
    device: str = "auto"
    eval_split: str = "test"
    baselines: list[str] = field(default_factory=lambda: ["scratch", "moco"])
    configurations_tried: int = 0
    bootstrap_resamples: int = 10000
    bootstrap_seed: int = 0
    qualitative_figure: bool = True
    cache_dir: str | None = None
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    probe: bool = False
    probe_pixels: int = 20000
    finetune: bool = True
    learning_curve: list[str] = field(default_factory=list)
    keep_checkpoints: bool = True
    finetune_with: str = "lrcseg"
    nnunet_iterations_per_epoch: int = 250
    nnunet_dataset_id: int = 990
    nnunet_mirroring: bool = True
    nnunet_batch_size: int | None = None

    def __post_init__(self) -> None:
        self.initialisations = [s if isinstance(s, InitSpec) else from_dict(InitSpec, s)
                                for s in self.initialisations]
        names = [s.name for s in self.initialisations]
        _check(len(names) > 0, "initialisations: need at least one")
        _check(len(set(names)) == len(names), f"initialisations: duplicate names in {names}")
        _check((self.dataset is None) != (self.phantoms is None),
               "give exactly one of dataset (a path) or phantoms (a block to generate them)")
        self.labeled = [int(k) for k in self.labeled]
        self.draws = [int(d) for d in self.draws]
        self.seeds = [int(s) for s in self.seeds]
        for key in ("labeled", "draws", "seeds"):
            values = getattr(self, key)
            _check(len(values) > 0 and len(set(values)) == len(values),
                   f"Illegal {key} {values}: a non-empty list without repeats")
        _check(all(k >= 1 for k in self.labeled), f"Illegal labeled {self.labeled}: counts >= 1")
        _check(self.pretrain_steps >= 1 and self.finetune_steps >= 1,
               f"Illegal budgets pretrain_steps={self.pretrain_steps}, "
               f"finetune_steps={self.finetune_steps}: need >= 1")
        _check(self.image_size >= 32 and self.image_size % 32 == 0,
               f"Illegal image_size {self.image_size}: a multiple of 32, >= 32")
        _check(self.batch_size >= 2, f"Illegal batch_size {self.batch_size}: need >= 2 (contrastive)")
        _check(self.finetune_batch_size >= 1, f"Illegal finetune_batch_size {self.finetune_batch_size}")
        _check(self.configurations_tried >= 0,
               f"Illegal configurations_tried {self.configurations_tried}: need >= 0")
        _check(self.bootstrap_resamples >= 100,
               f"Illegal bootstrap_resamples {self.bootstrap_resamples}: need >= 100")
        _check(self.eval_split != "train",
               "Illegal eval_split 'train': the labelled cases are drawn from it; use test "
               "(or pretrain for a hyper-parameter sweep)")
        unknown = sorted(set(self.baselines) - set(names))
        _check(not unknown, f"baselines {unknown} are not initialisations ({names})")
        unknown = sorted(set(self.learning_curve) - set(names))
        _check(not unknown, f"learning_curve {unknown} are not initialisations ({names})")
        _check(self.finetune or self.probe, "finetune: false needs probe: true (nothing to run)")
        _check(self.probe_pixels >= 100, f"Illegal probe_pixels {self.probe_pixels}: need >= 100")
        _check(isinstance(self.pretrain_overrides, dict),
               "pretrain_overrides must be a mapping of pre-training config keys")
        _check(self.finetune_with in ("lrcseg", "nnunet"),
               f"Illegal finetune_with {self.finetune_with!r}: lrcseg or nnunet")
        if self.finetune_with == "nnunet":
            _check(not self.probe and not self.learning_curve,
                   "finetune_with nnunet: the probe and learning curves read lrcseg's networks; "
                   "set probe: false and learning_curve: []")
            _check(self.finetune, "finetune_with nnunet needs finetune: true")
            _check(not any(s.method == "supervised" for s in self.initialisations),
                   "finetune_with nnunet: supervised pre-training is not available for nnU-Net "
                   "networks yet")
            _check(self.nnunet_batch_size is None or self.nnunet_batch_size >= 1,
                   f"Illegal nnunet_batch_size {self.nnunet_batch_size}: >= 1 or null")
            _check(1 <= self.nnunet_dataset_id <= 999,
                   f"Illegal nnunet_dataset_id {self.nnunet_dataset_id}: 1..999")
            per_epoch = self.nnunet_iterations_per_epoch
            _check(per_epoch >= 1 and (self.finetune_steps <= per_epoch
                                       or self.finetune_steps % per_epoch == 0),
                   f"finetune_steps {self.finetune_steps} must be a multiple of "
                   f"nnunet_iterations_per_epoch {per_epoch} (or smaller than it)")
        if any(s.method == "supervised" for s in self.initialisations):
            _check(self.labels_dataset is not None,
                   "a 'supervised' initialisation needs labels_dataset (the labelled source)")
        # Validate the derived run configs now, so a bad field fails before any training.
        ModelConfig(backbone=self.backbone)
        PreprocessConfig(spacing_mm=self.spacing_mm)
        OptimConfig(lr=self.pretrain_lr, warmup_steps=self.warmup_steps)
        OptimConfig(lr=self.finetune_lr, warmup_steps=self.warmup_steps)

    def init(self, name: str) -> InitSpec:
        return next(s for s in self.initialisations if s.name == name)


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the matrix."""

    init: str
    labeled: int
    draw: int
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.init}/K{self.labeled}_d{self.draw}_s{self.seed}"


def cells(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell, ordered so each pre-training run is used as soon as it is finished."""
    return [Cell(spec.name, k, draw, seed) for spec in cfg.initialisations for seed in cfg.seeds
            for k in cfg.labeled for draw in cfg.draws]


def block_tasks(cfg: ExperimentConfig) -> list[tuple[str, Cell]]:
    """("probe" | "finetune", cell) in run order: block by block ((initialisation, seed)),
    seed by seed (every initialisation of seed 0 first, so a partial run already holds
    complete pairs), the block's probes (cheap, and the first answer) before its fine-tunes."""
    tasks: list[tuple[str, Cell]] = []
    for seed in cfg.seeds:
        for spec in cfg.initialisations:
            block = [Cell(spec.name, k, draw, seed) for k in cfg.labeled for draw in cfg.draws]
            if cfg.probe:
                tasks += [("probe", c) for c in block]
            if cfg.finetune:
                tasks += [("finetune", c) for c in block]
    return tasks


def _task_metrics(out_dir: Path, kind: str, cell: Cell) -> Path:
    return (probe_dir(out_dir, cell) if kind == "probe" else cell_dir(out_dir, cell)) / "metrics.json"


def _delete_weights(run_dir: Path) -> None:
    """Remove a finished run's weights (*.pt); its config, logs and metrics stay."""
    for path in run_dir.glob("*.pt"):
        path.unlink(missing_ok=True)


def pretrain_dir(out_dir: Path, init: str, seed: int) -> Path:
    """The pre-training run of initialisation ``init`` with ``seed`` (shared by its cells)."""
    return out_dir / "runs" / "pretrain" / f"{init}_s{seed}"


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    """The fine-tuning run of ``cell``; its ``metrics.json`` marks the cell as finished."""
    return out_dir / "runs" / "finetune" / cell.folder


def probe_dir(out_dir: Path, cell: Cell) -> Path:
    """The probe of ``cell.init``'s pre-training with ``cell.seed`` at (K, draw)."""
    return out_dir / "runs" / "probe" / cell.folder


def curve_steps(cfg: ExperimentConfig) -> list[int]:
    """Learning-curve points before the full budget: 1/4 and 1/2 of it (distinct, >= 1)."""
    return sorted({s for s in (cfg.finetune_steps // 4, cfg.finetune_steps // 2)
                   if 1 <= s < cfg.finetune_steps})


def curve_metrics_path(out_dir: Path, cell: Cell, step: int) -> Path:
    return cell_dir(out_dir, cell) / f"metrics_step{step}.json"


def dataset_path(cfg: ExperimentConfig, out_dir: Path) -> Path:
    if cfg.dataset is not None:
        return Path(cfg.dataset)
    assert cfg.phantoms is not None
    path = Path(cfg.phantoms.out)
    return path if path.is_absolute() else out_dir / path


def _run(out: Path, steps: int, batch_size: int, seed: int, cfg: ExperimentConfig) -> RunConfig:
    return RunConfig(out=str(out), steps=steps, batch_size=batch_size, seed=seed,
                     device=cfg.device, checkpoint_every=max(1, min(200, steps // 4)),
                     log_every=max(1, min(10, steps // 10)), cache_dir=cfg.cache_dir)


def pretrain_config(cfg: ExperimentConfig, spec: InitSpec, seed: int, data: Path,
                    out_dir: Path) -> PretrainConfig:
    """The pre-training run of ``spec`` with ``seed`` (shared by every K and draw)."""
    lrc = LRCConfig(enabled=spec.lrc)
    if spec.lrc_weight is not None:
        lrc.weight = float(spec.lrc_weight)
    if spec.lrc_temperature is not None:
        lrc.temperature = float(spec.lrc_temperature)
    lrc = LRCConfig(**to_dict(lrc))  # validate the overrides
    sources = [str(data)]
    if spec.method == "supervised":
        sources = [str(cfg.labels_dataset)]
    base = PretrainConfig(
        data=sources, method=spec.method,
        labels=cfg.labels_dataset if spec.method == "supervised" else None,
        run=_run(pretrain_dir(out_dir, spec.name, seed), cfg.pretrain_steps,
                 cfg.batch_size, seed, cfg),
        preprocess=PreprocessConfig(spacing_mm=cfg.spacing_mm),
        superpixels=SuperpixelConfig(method=spec.regions),
        augment=AugmentConfig(image_size=cfg.image_size),
        model=ModelConfig(backbone=cfg.backbone), lrc=lrc,
        optim=OptimConfig(lr=cfg.pretrain_lr, warmup_steps=cfg.warmup_steps))
    if cfg.finetune_with == "nnunet":
        from lrcseg.models.nnunet import apply_plans, network_from_plans

        base = apply_plans(base, network_from_plans(nnunet_plans_path(cfg, data, out_dir)))
    if not cfg.pretrain_overrides and not spec.overrides:
        return base
    merged = update_dict(update_dict(to_dict(base), cfg.pretrain_overrides), spec.overrides)
    for section, key in (("run", "out"), ("run", "seed"), ("run", "steps"), ("data", None),
                         ("method", None), ("model", "backbone"), ("model", "decoder_channels"),
                         ("preprocess", None)):
        before = to_dict(base)
        changed = merged[section] != before[section] if key is None else \
            merged[section][key] != before[section][key]
        _check(not changed, f"initialisation {spec.name}: overrides may not change "
               f"{section if key is None else section + '.' + key} (the experiment sets it)")
    return from_dict(PretrainConfig, merged)


def nnunet_work_dir(out_dir: Path) -> Path:
    """nnU-Net's raw / preprocessed folders of the experiment (finetune_with nnunet)."""
    return out_dir / "nnunet"


def nnunet_plans_path(cfg: ExperimentConfig, data: Path, out_dir: Path) -> Path:
    from lrcseg.train.nnunet_finetune import dataset_folder_name

    return (nnunet_work_dir(out_dir) / "preprocessed"
            / dataset_folder_name(cfg.nnunet_dataset_id, data) / "nnUNetPlans.json")


def finetune_config(cfg: ExperimentConfig, cell: Cell, data: Path, out_dir: Path) -> FinetuneConfig:
    """The fine-tuning run of ``cell``: same budget and hyper-parameters for every init."""
    spec = cfg.init(cell.init)
    init = (str(pretrain_dir(out_dir, spec.name, cell.seed))
            if spec.pretrained else "scratch")
    return FinetuneConfig(
        dataset=str(data), init=init, labeled=cell.labeled, split_seed=cell.draw,
        snapshots=curve_steps(cfg) if cell.init in cfg.learning_curve else [],
        run=_run(cell_dir(out_dir, cell), cfg.finetune_steps,
                 cfg.finetune_batch_size, cell.seed, cfg),
        preprocess=PreprocessConfig(spacing_mm=cfg.spacing_mm),
        model=ModelConfig(backbone=cfg.backbone), image_size=cfg.image_size,
        optim=OptimConfig(lr=cfg.finetune_lr, warmup_steps=cfg.warmup_steps))


def _say(message: str) -> None:
    print(f"[experiment] {message}", flush=True)


def _fingerprint(cfg: ExperimentConfig) -> str:
    d = to_dict(cfg)
    for key in _NOT_COMPARED:
        d.pop(key, None)
    return stable_hash(d)


def _register(cfg: ExperimentConfig, out_dir: Path) -> ExperimentConfig:
    """Check ``cfg`` against the folder, record it, and return the folder's whole matrix.

    Refused: a change to what a cell computes (compared with ``experiment.yaml``), or a new
    definition under an initialisation name the folder has ever had (``initialisations.yaml``
    keeps every definition, so a narrower invocation in between cannot hide one). Returns
    ``cfg`` with ``initialisations`` = every one the folder has seen (recorded order first):
    the matrix that results.csv and report.md cover. Check and record happen under one lock.
    """
    import yaml

    from lrcseg.config import load_config

    path = out_dir / "experiment.yaml"
    record_path = out_dir / "initialisations.yaml"
    with _lock(out_dir / "locks" / "config.lock", wait=True):
        if path.is_file():
            previous = load_config(ExperimentConfig, path)
            if _fingerprint(previous) != _fingerprint(cfg):
                before, now = to_dict(previous), to_dict(cfg)
                changed = sorted(k for k in now
                                 if k not in _NOT_COMPARED and now[k] != before.get(k))
                raise ConfigError(f"{path}: this folder holds an experiment with a different "
                                  f"configuration (changed: {', '.join(changed)}); use a new --out")
        entries = yaml.safe_load(record_path.read_text()) if record_path.is_file() else None
        recorded = [from_dict(InitSpec, d) for d in entries or []]
        known = {s.name: s for s in recorded}
        redefined = sorted(s.name for s in cfg.initialisations
                           if s.name in known and known[s.name] != s)
        if redefined:
            raise ConfigError(f"{record_path}: initialisation(s) {', '.join(redefined)} are "
                              "defined differently in this folder; give the new definition a "
                              "new name")
        union = recorded + [s for s in cfg.initialisations if s.name not in known]
        atomic_write_text(record_path, yaml.safe_dump([to_dict(s) for s in union], sort_keys=False))
        save_config(cfg, path)
    return dataclasses.replace(cfg, initialisations=union)


@contextlib.contextmanager
def _lock(path: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False if ``wait`` is off and it is held.

    flock locks belong to the open file, so they also exclude a second claim inside one
    process, and they vanish when the process dies (no stale locks). Local file systems only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _ensure_run(train, run_cfg, final: Path, progress: bool) -> bool:
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


def _machine() -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu, "gpu": gpu}


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
    from lrcseg.evaluate.metrics import write_metrics
    from lrcseg.evaluate.probe import evaluate_probe
    from lrcseg.evaluate.run import evaluate_model
    from lrcseg.runtime import resolve_device
    from lrcseg.train.finetune import finetune, snapshot_name
    from lrcseg.train.pretrain import pretrain

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = _register(cfg, out_dir)
    data = dataset_path(cfg, out_dir)
    if cfg.phantoms is not None:
        from lrcseg.phantoms.generate import write_phantom_dataset

        with _lock(out_dir / "locks" / "phantoms.lock", wait=True):
            if not (data / "dataset.json").is_file():
                _say(f"writing {cfg.phantoms.cases} phantoms to {data}")
                write_phantom_dataset(data, cases=cfg.phantoms.cases, seed=cfg.phantoms.seed,
                                      spacing_mm=cfg.phantoms.spacing_mm)
    if not (data / "dataset.json").is_file() and not data.exists():
        raise ConfigError(f"{data}: dataset not found")

    if cfg.finetune_with == "nnunet":
        from lrcseg.train.nnunet_finetune import plan_and_preprocess

        with _lock(out_dir / "locks" / "nnunet_plans.lock", wait=True):
            plans = plan_and_preprocess(data, nnunet_work_dir(out_dir), cfg.nnunet_dataset_id)
        _say(f"nnU-Net plans: {plans}")

    tasks = block_tasks(cfg)
    for spec in cfg.initialisations:  # a bad override fails now, not after other blocks trained
        if spec.pretrained:
            pretrain_config(cfg, spec, cfg.seeds[0], data, out_dir)
    device = resolve_device(cfg.device)
    trained = {"pretrain": 0, "finetune": 0}
    locks = out_dir / "locks"

    def ensure_pretrained(spec: InitSpec, seed: int, wait: bool) -> bool:
        """Make sure the pre-training run exists; False if another process is training it."""
        pt_cfg = pretrain_config(cfg, spec, seed, data, out_dir)
        final = Path(pt_cfg.run.out) / "final.pt"
        if final.is_file():
            return True
        released = Path(pt_cfg.run.out) / RELEASED
        if released.is_file():
            raise ConfigError(f"{released}: this pre-training's weights were deleted once its block "
                              "was finished (keep_checkpoints: false); the matrix has grown since. "
                              "Delete the marker to pre-train it again (same config and seed), or "
                              "use a new --out")
        with _lock(locks / f"pretrain_{spec.name}_s{seed}.lock", wait) as held:
            if held and not final.is_file():
                _say(f"pre-training {spec.name}_s{seed} ({cfg.pretrain_steps} steps)")
                trained["pretrain"] += _ensure_run(pretrain, pt_cfg, final, progress)
            return held

    def attempt(i: int, cell: Cell, wait: bool) -> bool:
        """Train and evaluate ``cell`` unless done; False if another process holds it."""
        ft_cfg = finetune_config(cfg, cell, data, out_dir)
        ft_dir = Path(ft_cfg.run.out)
        metrics_path = ft_dir / "metrics.json"
        spec = cfg.init(cell.init)
        with _lock(locks / f"finetune_{cell.init}_{Path(cell.folder).name}.lock", wait) as held:
            if not held:
                return False
            if metrics_path.is_file():  # finished by another process meanwhile
                return True
            if spec.pretrained and not ensure_pretrained(spec, cell.seed, wait):
                return False
            _say(f"cell {i}/{len(tasks)}: {cell.folder} ({cfg.finetune_steps} steps)")
            if cfg.finetune_with == "nnunet":
                write_metrics(_finetune_with_nnunet(cfg, cell, data, out_dir, ft_dir, device),
                              metrics_path)
                trained["finetune"] += 1
                if not cfg.keep_checkpoints:  # nnU-Net's checkpoints and the exported init
                    for weights in [*ft_dir.rglob("checkpoint_*.pth"), ft_dir / "init_nnunet.pth"]:
                        weights.unlink(missing_ok=True)
                return True
            trained["finetune"] += _ensure_run(finetune, ft_cfg, ft_dir / "final.pt", progress)
            for step in ft_cfg.snapshots:  # learning-curve points first: metrics.json = done
                snapshot = ft_dir / snapshot_name(step)
                if not snapshot.is_file():  # a run started without it: the curve skips the run
                    _say(f"{cell.folder}: no {snapshot.name}, its learning-curve point is skipped")
                    continue
                result = evaluate_model(snapshot, data, cfg.eval_split, device, progress=progress)
                write_metrics(result, curve_metrics_path(out_dir, cell, step))
            result = evaluate_model(ft_dir, data, cfg.eval_split, device, progress=progress)
            write_metrics(result, metrics_path)
            if not cfg.keep_checkpoints:
                _delete_weights(ft_dir)
            return True

    def attempt_probe(i: int, cell: Cell, wait: bool) -> bool:
        """Probe ``cell.init``'s pre-training (or a random network) at (K, draw)."""
        metrics_path = probe_dir(out_dir, cell) / "metrics.json"
        spec = cfg.init(cell.init)
        with _lock(locks / f"probe_{cell.init}_{Path(cell.folder).name}.lock", wait) as held:
            if not held:
                return False
            if metrics_path.is_file():
                return True
            if spec.pretrained and not ensure_pretrained(spec, cell.seed, wait):
                return False
            _say(f"probe {i}/{len(tasks)}: {cell.folder}")
            scratch = not spec.pretrained
            result = evaluate_probe(
                "scratch" if scratch else str(pretrain_dir(out_dir, spec.name, cell.seed)),
                data, labeled=cell.labeled, split_seed=cell.draw, split=cfg.eval_split,
                seed=cell.seed, backbone=cfg.backbone if scratch else None,
                spacing_mm=cfg.spacing_mm if scratch else None, pixels=cfg.probe_pixels,
                device=device, cache_dir=cfg.cache_dir, progress=progress)
            write_metrics(result, metrics_path)
            return True

    # A block is finished when its probes AND fine-tunes are, even in a probes-only invocation
    # (fine-tunes may follow), over every initialisation the folder has.
    release_tasks = block_tasks(dataclasses.replace(whole, finetune=True))

    def release_block(spec: InitSpec, seed: int) -> None:
        """Delete the block's pre-training weights once every probe and cell of it is done,
        leaving a marker so a later, larger matrix is told instead of silently retraining."""
        if cfg.keep_checkpoints or not spec.pretrained:
            return
        done = all(_task_metrics(out_dir, kind, cell).is_file() for kind, cell in release_tasks
                   if cell.init == spec.name and cell.seed == seed)
        if done:
            run_dir = pretrain_dir(out_dir, spec.name, seed)
            with _lock(locks / f"pretrain_{spec.name}_s{seed}.lock", wait=True):
                if (run_dir / "final.pt").is_file():
                    atomic_write_text(run_dir / RELEASED, "weights deleted: every probe and "
                                      "fine-tune of this block has its metrics.json\n")
                    _delete_weights(run_dir)

    def out_of_time(i: int) -> bool:
        if max_seconds is None or time.time() - t0 < max_seconds:
            return False
        _say(f"time budget of {max_seconds:.0f} s reached before task {i}/{len(tasks)}; "
             "rerun the same command to continue")
        return True

    def run_task(i: int, kind: str, cell: Cell, wait: bool) -> bool:
        ok = (attempt_probe if kind == "probe" else attempt)(i, cell, wait)
        if ok:
            release_block(cfg.init(cell.init), cell.seed)
        return ok

    # First pass: skip what other processes hold; second pass: wait for it, so every process
    # helps until the matrix is done (a holder never waits on anything, so nothing deadlocks).
    skipped: list[tuple[int, str, Cell]] = []
    stopped = False
    for i, (kind, cell) in enumerate(tasks, 1):
        if _task_metrics(out_dir, kind, cell).is_file():
            continue
        if stopped := out_of_time(i):
            break
        if not run_task(i, kind, cell, wait=False):
            _say(f"{kind} {i}/{len(tasks)}: {cell.folder} is held by another process; later")
            skipped.append((i, kind, cell))
    for i, kind, cell in skipped:
        if stopped or (stopped := out_of_time(i)):
            break
        run_task(i, kind, cell, wait=True)

    seconds = time.time() - t0
    timings = _record_time(out_dir, seconds, trained)
    from lrcseg.experiment.report import write_report

    # One writer at a time, reading the finished cells inside the lock, so a report never
    # replaces a newer one with older numbers; it covers every initialisation of the folder.
    with _lock(locks / "report.lock", wait=True):
        results_path = write_results_csv(whole, out_dir)
        has_probes = whole.probe or any(_task_metrics(out_dir, "probe", c).is_file()
                                        for c in cells(whole))
        probe_path = write_results_csv(whole, out_dir, "probe") if has_probes else None
        if not load_results(whole, out_dir)[0] and not (probe_path and load_results(whole, out_dir, "probe")[0]):
            _say("no finished cell yet: results.csv has only its header, no report")
            return results_path
        qualitative = (_qualitative_rows(whole, data, out_dir, device)
                       if cfg.qualitative_figure else None)
        write_report(whole, out_dir, results_path, machine=_machine(), timings=timings,
                     qualitative=qualitative, probe_path=probe_path,
                     curves=learning_curves(whole, out_dir), hd95=hd95_rows(whole, out_dir))
    _say(f"done: {results_path}, {out_dir / 'report.md'} "
         f"({trained['pretrain']} pre-training and {trained['finetune']} fine-tuning runs trained "
         f"in this call, {seconds:.0f} s)")
    return results_path


def _finetune_with_nnunet(cfg: ExperimentConfig, cell: Cell, data: Path, out_dir: Path,
                         ft_dir: Path, device: Any) -> dict[str, Any]:
    """One cell through nnU-Net: export the pre-training for nnU-Net (not for scratch), train
    nnU-Net's trainer on the cell's K labelled cases, predict ``eval_split``, score it."""
    from lrcseg.config import to_dict
    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.splits import choose_labelled, split_cases
    from lrcseg.models.export import export_nnunet
    from lrcseg.models.load import load_pretrain_network
    from lrcseg.train import nnunet_finetune

    dataset = load_dataset(data)
    labelled = choose_labelled(dataset, cell.labeled, cell.draw)["labeled"]
    spec = cfg.init(cell.init)
    weights = None
    if spec.pretrained:
        weights = ft_dir / "init_nnunet.pth"
        net, pt_cfg, _ = load_pretrain_network(pretrain_dir(out_dir, spec.name, cell.seed))
        export_nnunet(net, pt_cfg.model, to_dict(pt_cfg.preprocess), to_dict(pt_cfg.superpixels),
                      weights)
    work = nnunet_work_dir(out_dir)
    kind = str(device.type)
    model = nnunet_finetune.train(work, cfg.nnunet_dataset_id, data, labelled, weights,
                                  cfg.finetune_steps, cfg.nnunet_iterations_per_epoch, cell.seed,
                                  ft_dir / "nnunet", device=kind,
                                  batch_size=cfg.nnunet_batch_size)
    cases = split_cases(dataset, cfg.eval_split)
    predictions = nnunet_finetune.predict(work, model, {c.id: str(c.image) for c in cases},
                                          ft_dir / "predictions", device=kind,
                                          mirroring=cfg.nnunet_mirroring)
    result = nnunet_finetune.score(dataset, predictions, dataset.labels)
    result["labelled_cases"] = labelled
    return result


def _record_time(out_dir: Path, seconds: float, trained: dict[str, int]) -> dict[str, Any]:
    """Append this invocation to timings.json; returns the record with the running total."""
    with _lock(out_dir / "locks" / "timings.lock", wait=True):  # parallel invocations
        return append_invocation(out_dir / "timings.json", seconds, trained=trained,
                                 host=platform.node(), pid=os.getpid())


def _metrics_path(out_dir: Path, cell: Cell, kind: str, step: int | None) -> Path:
    if kind == "probe":
        return probe_dir(out_dir, cell) / "metrics.json"
    return curve_metrics_path(out_dir, cell, step) if step else cell_dir(out_dir, cell) / "metrics.json"


def load_results(cfg: ExperimentConfig, out_dir: Path, kind: str = "finetune",
                 step: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished cell and evaluated case, organ Dice (None if absent in both).

    kind: "finetune" (the cells' metrics.json; with ``step``, their learning-curve snapshot
    at that step) or "probe" (the probes; seed = the pre-training seed).
    Row keys: init, K, draw, seed, case, each organ, and "mean" (the mean over the organs
    with a Dice on that case). Returns (rows, organs).
    """
    import json

    rows: list[dict[str, Any]] = []
    organs: list[str] = []
    for cell in cells(cfg):
        path = _metrics_path(out_dir, cell, kind, step)
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        organs = organs or list(metrics["organs"])
        for case_id, per_organ in metrics["cases"].items():
            dice = {o: per_organ.get(o, {}).get("dice") for o in organs}
            values = [v for v in dice.values() if v is not None]
            rows.append({"init": cell.init, "K": cell.labeled, "draw": cell.draw,
                         "seed": cell.seed, "case": case_id, **dice,
                         "mean": sum(values) / len(values) if values else None})
    return rows, organs


def write_results_csv(cfg: ExperimentConfig, out_dir: Path, kind: str = "finetune") -> Path:
    """results.csv (probe_results.csv for kind "probe"): init, K, draw, seed, case, organ
    Dice columns, mean (empty = no value)."""
    rows, organs = load_results(cfg, out_dir, kind)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["init", "K", "draw", "seed", "case", *organs, "mean"])
    for row in rows:
        writer.writerow([row["init"], row["K"], row["draw"], row["seed"], row["case"],
                         *(_fmt(row[o]) for o in [*organs, "mean"])])
    path = out_dir / ("probe_results.csv" if kind == "probe" else "results.csv")
    atomic_write_text(path, buf.getvalue())
    return path


def hd95_rows(cfg: ExperimentConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Per (initialisation, K): HD95 mean, median and capped count pooled over the finished
    fine-tuning cells (``report.hd95_markdown`` rows)."""
    import json

    from lrcseg.experiment.report import pooled_hd95

    rows = []
    for spec in cfg.initialisations:
        for k in cfg.labeled:
            paths = [_metrics_path(out_dir, c, "finetune", None) for c in cells(cfg)
                     if c.init == spec.name and c.labeled == k]
            results = [json.loads(p.read_text()) for p in paths if p.is_file()]
            if results:
                rows.append({"init": spec.name, "K": k, "cells": len(results),
                             **pooled_hd95(results)})
    return rows


def learning_curves(cfg: ExperimentConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Per learning-curve initialisation and K: mean Dice (over runs, each run averaged over
    its cases) at 1/4, 1/2 and the whole budget, on the runs that have every point.

    Returns [{"init", "K", "runs", "points": [(step, mean Dice)], "last_doubling": change}].
    """
    steps = [*curve_steps(cfg), cfg.finetune_steps]
    out = []
    for init in cfg.learning_curve:
        for k in cfg.labeled:
            per_step = {}
            for step in steps:
                rows, _ = load_results(cfg, out_dir, step=None if step == cfg.finetune_steps else step)
                runs: dict[tuple, list[float]] = {}
                for r in rows:
                    if r["init"] == init and r["K"] == k and r["mean"] is not None:
                        runs.setdefault((r["draw"], r["seed"]), []).append(r["mean"])
                per_step[step] = {key: sum(v) / len(v) for key, v in runs.items()}
            common = set.intersection(*(set(v) for v in per_step.values())) if per_step else set()
            if not common:
                continue
            points = [(step, sum(per_step[step][key] for key in common) / len(common))
                      for step in steps]
            change = points[-1][1] - points[-2][1] if len(points) >= 2 else math.nan
            out.append({"init": init, "K": k, "runs": len(common), "points": points,
                        "last_doubling": change})
    return out


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def _qualitative_rows(cfg: ExperimentConfig, data: Path, out_dir: Path, device
                      ) -> dict[str, Any] | None:
    """Image, reference and each initialisation's prediction on one test slice.

    Uses the first draw and seed and the smallest K; the slice is the test case's axial slice
    with the most reference foreground. Returns None if any of those cells is missing.
    """
    from lrcseg.data.layouts import apply_label_map, load_dataset
    from lrcseg.data.readers import read_image, read_label
    from lrcseg.data.splits import split_cases
    from lrcseg.evaluate.predict import predict_labels
    from lrcseg.models.load import load_finetuned
    from lrcseg.viz import representative_slice

    k, draw, seed = min(cfg.labeled), cfg.draws[0], cfg.seeds[0]
    runs = {s.name: cell_dir(out_dir, Cell(s.name, k, draw, seed))
            for s in cfg.initialisations}
    if not all((r / "final.pt").is_file() for r in runs.values()):
        return None  # not finished, or its weights were deleted (keep_checkpoints false)
    dataset = load_dataset(data)
    case = split_cases(dataset, cfg.eval_split)[0]
    image = read_image(case.image)
    predictions = {}
    labels: dict[str, int] = {}
    for name, run_dir in runs.items():
        model, meta = load_finetuned(run_dir, device)
        labels = meta["labels"]
        predictions[name] = predict_labels(model, image, meta["preprocess"], device=device,
                                           num_classes=max(labels.values()) + 1)
    ref = apply_label_map(read_label(case.label, image).array, dataset.labels, labels, None)
    z, grey = representative_slice(image.array, ref, meta["preprocess"].window_hu)
    return {"case": case.id, "z": z, "K": k, "draw": draw, "seed": seed,
            "image": grey,
            "reference": ref[:, :, z], "labels": labels,
            "predictions": {n: p[:, :, z] for n, p in predictions.items()},
            "spacing_xy": image.spacing[:2]}
