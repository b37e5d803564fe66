"""The cells of an experiment matrix: their identities, folders and the runs they derive.

A cell is one fine-tuning run (initialisation, K, draw, seed); the pre-training run of an
(initialisation, seed) block is shared by every K and draw of it. Output folder::

    experiment.yaml                 the resolved configuration (a rerun must match it)
    initialisations.yaml            every initialisation the folder has ever had
    runs/pretrain/<init>_s<seed>/   pre-training run folders
    runs/finetune/<init>/K<k>_d<draw>_s<seed>/   fine-tuning runs, each with metrics.json
                                    (and metrics_step<N>.json for learning-curve snapshots)
    runs/probe/<init>/K<k>_d<draw>_s<seed>/metrics.json   probes (seed = pre-training seed)
    nnunet/                         nnU-Net's raw / preprocessed folders (finetune_with nnunet,
                                    ``backends.NnUNetBackend``; preprocessed for
                                    ``nnunet_configuration``)
    locks/                          the flock files of parallel invocations (``locks.py``)
    results.csv, probe_results.csv, report.md, figures/, timings.json

Extending: the matrix axes (initialisations, labeled, draws, seeds) and the report settings
may change between invocations of one folder, so a finished experiment can gain an
initialisation or a seed; everything that changes what a cell computes may not, and neither
may the definition of an initialisation that already has a name (``register``).

Labelled sets: a cell (K, draw) fine-tunes (and its probe fits) on
``choose_labelled(dataset, K, split_seed)``, where the split seed is the draw itself
(``draw_mode: seeded``) or the one that draws the draw-th distinct labelled set of that K
(``labelled_split_seed``); the run folder's split.json records the cases.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from lrcseg.config import (
    AugmentConfig,
    ExperimentConfig,
    FinetuneConfig,
    FinetuneStrategyConfig,
    InitSpec,
    IntensityAugmentConfig,
    LRCConfig,
    ModelConfig,
    OptimConfig,
    OrganContrastConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
    SuperpixelConfig,
    from_dict,
    load_config,
    read_config_file,
    save_config,
    stable_hash,
    to_dict,
    update_dict,
)
from lrcseg.data.layouts import load_dataset
from lrcseg.data.splits import LabelledSet, case_phases, choose_labelled, distinct_labelled_sets
from lrcseg.errors import ConfigError
from lrcseg.experiment.backends import finetune_backend
from lrcseg.experiment.locks import exclusive_lock, lock_path
from lrcseg.io_utils import atomic_write_text

#: left in a pre-training folder whose weights were deleted (keep_checkpoints: false)
RELEASED = "weights_released.txt"
# Fields that may change between invocations of the same experiment without changing results.
_RUNTIME_FIELDS = ("device", "configurations_tried", "progress_note", "keep_checkpoints")
# Fields that choose which cells exist and how they are reported: a finished cell stays valid
# when they change (an initialisation's definition is checked name by name instead).
_MATRIX_FIELDS = ("initialisations", "labeled", "draws", "seeds", "baselines",
                  "bootstrap_resamples", "bootstrap_seed", "qualitative_figure", "probe",
                  "finetune", "learning_curve", "curve_steps", "equivalence_margin")
_NOT_COMPARED = (*_RUNTIME_FIELDS, *_MATRIX_FIELDS)
# Pre-training keys the experiment sets itself: an override may not change them (None = the
# whole section).
_SET_BY_THE_EXPERIMENT = (("run", "out"), ("run", "seed"), ("run", "steps"), ("data", None),
                          ("method", None), ("model", "backbone"), ("model", "decoder_channels"),
                          ("preprocess", None))


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the matrix (and, for a probe, the (K, draw) it is fitted at)."""

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


# --------------------------------------------------------------------------- folders


def pretrain_dir(out_dir: Path, init: str, seed: int) -> Path:
    """The pre-training run of initialisation ``init`` with ``seed`` (shared by its cells)."""
    return out_dir / "runs" / "pretrain" / f"{init}_s{seed}"


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    """The fine-tuning run of ``cell``; its ``metrics.json`` marks the cell as finished."""
    return out_dir / "runs" / "finetune" / cell.folder


def probe_dir(out_dir: Path, cell: Cell) -> Path:
    """The probe of ``cell.init``'s pre-training with ``cell.seed`` at (K, draw)."""
    return out_dir / "runs" / "probe" / cell.folder


def task_metrics(out_dir: Path, kind: str, cell: Cell) -> Path:
    """The metrics.json that marks task (``kind`` "probe" | "finetune", ``cell``) as done."""
    return (probe_dir(out_dir, cell) if kind == "probe" else cell_dir(out_dir, cell)) / "metrics.json"


def curve_steps(cfg: ExperimentConfig) -> list[int]:
    """Learning-curve points before the full budget: ``cfg.curve_steps``, or by default 1/4
    and 1/2 of it (distinct, >= 1)."""
    if cfg.curve_steps:
        return list(cfg.curve_steps)
    return sorted({s for s in (cfg.finetune_steps // 4, cfg.finetune_steps // 2)
                   if 1 <= s < cfg.finetune_steps})


def curve_metrics_path(out_dir: Path, cell: Cell, step: int) -> Path:
    return cell_dir(out_dir, cell) / f"metrics_step{step}.json"


def metrics_path(out_dir: Path, cell: Cell, kind: str, step: int | None) -> Path:
    """A cell's metrics: the probe's, the fine-tune's, or (``step``) a learning-curve point's."""
    if kind == "probe":
        return probe_dir(out_dir, cell) / "metrics.json"
    return curve_metrics_path(out_dir, cell, step) if step else cell_dir(out_dir, cell) / "metrics.json"


def dataset_path(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """The dataset the matrix runs on: ``cfg.dataset``, or where its phantoms are written."""
    if cfg.dataset is not None:
        return Path(cfg.dataset)
    assert cfg.phantoms is not None
    path = Path(cfg.phantoms.out)
    return path if path.is_absolute() else out_dir / path


# --------------------------------------------------------------------------- labelled sets


def labelled_sets(cfg: ExperimentConfig, data: Path, k: int) -> list[LabelledSet]:
    """The distinct labelled sets of K for draws 0..max(draws) (``draw_mode`` distinct or
    distinct_by_phase, by contrast phase for the latter); ConfigError naming the dataset if
    its candidates cannot give that many, or, by phase, if it records no phase for one."""
    assert cfg.draw_mode != "seeded"
    dataset = load_dataset(data)
    candidates = choose_labelled(dataset, k, 0)["candidates"]
    strata = None
    if cfg.draw_mode == "distinct_by_phase":
        strata = case_phases(data)
        if not strata:
            raise ConfigError(f"{data}: draw_mode distinct_by_phase needs each case's contrast "
                              "phase in dataset.json (\"phantoms\": {\"phases\": ...}, as "
                              "`lrcseg phantoms` writes it); this dataset records none")
    try:
        return distinct_labelled_sets(candidates, k, max(cfg.draws) + 1, strata=strata)
    except ConfigError as exc:
        raise ConfigError(f"{data}: draw_mode {cfg.draw_mode}, K = {k}: {exc}") from exc


def labelled_split_seed(cfg: ExperimentConfig, data: Path, k: int, draw: int) -> int:
    """The split seed of (K, ``draw``): ``choose_labelled(dataset, k, seed)`` is the cell's
    labelled set."""
    if cfg.draw_mode == "seeded":
        return draw
    return labelled_sets(cfg, data, k)[draw].split_seed


def check_labelled_sets(cfg: ExperimentConfig, data: Path) -> None:
    """Refuse (ConfigError) a draw_mode the dataset cannot serve, before any training."""
    if cfg.draw_mode != "seeded":
        for k in cfg.labeled:
            labelled_sets(cfg, data, k)


# --------------------------------------------------------------------------- derived runs


def _run(out: Path, steps: int, batch_size: int, seed: int, cfg: ExperimentConfig) -> RunConfig:
    return RunConfig(out=str(out), steps=steps, batch_size=batch_size, seed=seed,
                     device=cfg.device, checkpoint_every=max(1, min(200, steps // 4)),
                     log_every=max(1, min(10, steps // 10)), cache_dir=cfg.cache_dir)


def _lrc_config(spec: InitSpec) -> LRCConfig:
    """LRC on or off, with the initialisation's weight and temperature overrides (validated)."""
    lrc = LRCConfig(enabled=spec.lrc)
    if spec.lrc_weight is not None:
        lrc.weight = float(spec.lrc_weight)
    if spec.lrc_temperature is not None:
        lrc.temperature = float(spec.lrc_temperature)
    return LRCConfig(**to_dict(lrc))  # validate the overrides


def _check_overrides(spec: InitSpec, base: PretrainConfig, merged: dict) -> None:
    """Refuse overrides that change a key the experiment sets (``_SET_BY_THE_EXPERIMENT``)."""
    before = to_dict(base)
    for section, key in _SET_BY_THE_EXPERIMENT:
        changed = merged[section] != before[section] if key is None else \
            merged[section][key] != before[section][key]
        if changed:
            raise ConfigError(f"initialisation {spec.name}: overrides may not change "
                              f"{section if key is None else section + '.' + key} "
                              "(the experiment sets it)")


def pretrain_config(cfg: ExperimentConfig, spec: InitSpec, seed: int, data: Path,
                    out_dir: Path) -> PretrainConfig:
    """The pre-training run of ``spec`` with ``seed`` (shared by every K and draw), of the
    network the fine-tuning back-end fine-tunes (``backends.FinetuneBackend.pretrain_network``)."""
    lrc = _lrc_config(spec)
    supervised = spec.method == "supervised"
    base = PretrainConfig(
        data=[str(cfg.labels_dataset) if supervised else str(data)], method=spec.method,
        labels=cfg.labels_dataset if supervised else None,
        run=_run(pretrain_dir(out_dir, spec.name, seed), cfg.pretrain_steps,
                 cfg.batch_size, seed, cfg),
        preprocess=PreprocessConfig(spacing_mm=cfg.spacing_mm),
        superpixels=SuperpixelConfig(method=spec.regions),
        augment=AugmentConfig(image_size=cfg.image_size),
        model=ModelConfig(backbone=cfg.backbone), lrc=lrc,
        optim=OptimConfig(lr=cfg.pretrain_lr, warmup_steps=cfg.warmup_steps))
    base = finetune_backend(cfg).pretrain_network(base, data, out_dir)
    if not cfg.pretrain_overrides and not spec.overrides:
        return base
    merged = update_dict(update_dict(to_dict(base), cfg.pretrain_overrides), spec.overrides)
    _check_overrides(spec, base, merged)
    return from_dict(PretrainConfig, merged)


def finetune_config(cfg: ExperimentConfig, cell: Cell, data: Path, out_dir: Path) -> FinetuneConfig:
    """The fine-tuning run of ``cell``: same budget, hyper-parameters and strategy for every
    init (scratch, having no pre-trained layers, with the default strategy)."""
    spec = cfg.init(cell.init)
    init = (str(pretrain_dir(out_dir, spec.name, cell.seed))
            if spec.pretrained else "scratch")
    return FinetuneConfig(
        dataset=str(data), init=init, labeled=cell.labeled,
        split_seed=labelled_split_seed(cfg, data, cell.labeled, cell.draw),
        snapshots=curve_steps(cfg) if cell.init in cfg.curve_inits() else [],
        strategy=cfg.finetune_strategy if spec.pretrained else FinetuneStrategyConfig(),
        run=_run(cell_dir(out_dir, cell), cfg.finetune_steps,
                 cfg.finetune_batch_size, cell.seed, cfg),
        preprocess=PreprocessConfig(spacing_mm=cfg.spacing_mm),
        model=ModelConfig(backbone=cfg.backbone), image_size=cfg.image_size,
        optim=OptimConfig(lr=cfg.finetune_lr, warmup_steps=cfg.warmup_steps),
        intensity=IntensityAugmentConfig(enabled=cfg.finetune_intensity),
        organ_contrast=OrganContrastConfig(enabled=cfg.finetune_organ_contrast))


# --------------------------------------------------------------------------- the folder's record


def _fingerprint(cfg: ExperimentConfig) -> str:
    d = to_dict(cfg)
    for key in _NOT_COMPARED:
        d.pop(key, None)
    return stable_hash(d)


def register(cfg: ExperimentConfig, out_dir: Path) -> ExperimentConfig:
    """Check ``cfg`` against the folder, record it, and return the folder's whole matrix.

    Refused: a change to what a cell computes (compared with ``experiment.yaml``), or a new
    definition under an initialisation name the folder has ever had (``initialisations.yaml``
    keeps every definition, so a narrower invocation in between cannot hide one). Returns
    ``cfg`` with ``initialisations`` = every one the folder has seen (recorded order first):
    the matrix that results.csv and report.md cover. Check and record happen under one lock.
    """
    path = out_dir / "experiment.yaml"
    record_path = out_dir / "initialisations.yaml"
    with exclusive_lock(lock_path(out_dir, "config"), wait=True):
        if path.is_file():
            _check_unchanged(_recorded(path), cfg, path)
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


#: what the probe read before ``probe_levels`` existed (no enc32)
LEGACY_PROBE_LEVELS = "enc4,enc8,enc16,dec4,dec2,dec1"


def _recorded(path: Path) -> ExperimentConfig:
    """The experiment.yaml of a folder; one written before ``finetune_intensity`` /
    ``finetune_organ_contrast`` existed fine-tuned its cells without that augmentation, its
    phantoms (if generated) are anatomy 1 when it names none, one written before
    ``probe_levels``/``probe_batchnorm`` probed the legacy levels with stored BatchNorm, and
    one written before ``finetune_strategy``/``draw_mode`` fine-tuned every layer at one rate
    on seeded draws, and one written before ``nnunet_configuration`` ran nnU-Net's 2d."""
    data = read_config_file(path)
    data.setdefault("finetune_intensity", False)
    data.setdefault("finetune_organ_contrast", False)
    if isinstance(data.get("phantoms"), dict):
        data["phantoms"] = {"anatomy": 1, **data["phantoms"]}
    data.setdefault("finetune_strategy", {"encoder_lr_scale": 1.0, "decoder_lr_scale": 1.0,
                                          "head_first_steps": 0, "freeze_encoder": False})
    data.setdefault("draw_mode", "seeded")
    data.setdefault("probe_levels", LEGACY_PROBE_LEVELS)
    data.setdefault("probe_batchnorm", "stored")
    data.setdefault("nnunet_configuration", "2d")
    return load_config(ExperimentConfig, None, data)


def _check_unchanged(previous: ExperimentConfig, cfg: ExperimentConfig, path: Path) -> None:
    """Refuse ``cfg`` if it changes what a cell computes compared with ``previous``."""
    if _fingerprint(previous) != _fingerprint(cfg):
        before, now = to_dict(previous), to_dict(cfg)
        changed = sorted(k for k in now if k not in _NOT_COMPARED and now[k] != before.get(k))
        raise ConfigError(f"{path}: this folder holds an experiment with a different "
                          f"configuration (changed: {', '.join(changed)}); use a new --out")
