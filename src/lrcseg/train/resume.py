"""The run folder and ``--resume``: create or refuse a folder, find the checkpoint to continue
from, and decide which configuration changes a resume may carry (the rest would continue a
different run)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lrcseg.config import flatten_dict
from lrcseg.errors import ConfigError
from lrcseg.locking import LOCK_NAME
from lrcseg.methods.registry import method_names, options_fixed_on_resume
from lrcseg.models.load import FINAL, LATEST, find_checkpoint, load_checkpoint

# What a run writes before its first checkpoint; a folder holding only these (and temporary
# ".<name>.*" files of interrupted atomic writes) is a run that never reached a checkpoint.
_EARLY_RUN_FILES = ("config.yaml", "run_card.json", "metrics.jsonl", "split.json", "tb")


def prepare_run_dir(out: str | Path, resume: bool, create: bool = True) -> Path:
    """Check (and with ``create``, make) the run folder.

    A new run needs ``out`` to be absent, empty, or a run that stopped before its first
    checkpoint (killed, disk full): a folder holding no checkpoint.pt and no final.pt and
    nothing but the files a run writes first (config.yaml, run_card.json, metrics.jsonl,
    split.json, tb/, snapshot_*.pt, temporary ``.<name>.*`` files). Such a folder holds no
    state to resume, so a rerun reuses it and, with ``create``, clears it first; ``--resume``
    on it says to rerun instead (:func:`check_resumable`). Anything else is refused: a folder
    with a checkpoint (use ``--resume``), with files lrcseg did not write, or a file.
    Call it once with ``create=False`` before reading data, so bad input leaves no empty run
    folder behind. The lock file of the folder's owner (``lrcseg.locking.LOCK_NAME``, held by
    the CLI for the whole run) is not part of the run: it is neither counted nor cleared.
    """
    run_dir = Path(out)
    if resume:
        return check_resumable(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: --out names a file, not a run folder; choose another --out")
    if run_dir.exists() and _run_entries(run_dir):
        if find_checkpoint(run_dir) is not None:
            raise ConfigError(f"{run_dir}: run folder holds a checkpoint; use --resume to continue "
                              "it or choose another --out")
        if not _stopped_before_first_checkpoint(run_dir):
            raise ConfigError(f"{run_dir}: run folder exists and is not empty; use --resume to "
                              "continue it or choose another --out")
        if create:
            for entry in _run_entries(run_dir):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_resumable(out: str | Path) -> Path:
    """The run folder ``out`` if ``--resume`` can continue it; else ConfigError saying why.

    Call it before reading the run's config.yaml, so a folder without a checkpoint is reported
    as such (not as an unreadable config).
    """
    run_dir = Path(out)
    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: --resume given but the run folder does not exist")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: --resume given but this is a file, not a run folder")
    if find_checkpoint(run_dir, prefer_final=False) is None:
        if _run_entries(run_dir) and _stopped_before_first_checkpoint(run_dir):
            raise ConfigError(f"{run_dir}: no checkpoint to resume: the run stopped before its "
                              "first checkpoint; run it again without --resume (e.g. --config "
                              f"{run_dir / 'config.yaml'}), which reuses this folder")
        raise ConfigError(f"{run_dir}: --resume given but there is no checkpoint to resume "
                          "(no checkpoint.pt in this folder)")
    return run_dir


def _stopped_before_first_checkpoint(run_dir: Path) -> bool:
    """Only files a run writes before its first checkpoint (see :func:`prepare_run_dir`)."""
    if find_checkpoint(run_dir) is not None:
        return False
    return all(_is_early_run_file(entry.name) for entry in _run_entries(run_dir))


def _run_entries(run_dir: Path) -> list[Path]:
    """What the run folder holds, less its owner's lock file."""
    return [entry for entry in run_dir.iterdir() if entry.name != LOCK_NAME]


def _is_early_run_file(name: str) -> bool:
    if name.startswith("."):  # the temporary file of an interrupted atomic write
        written = (*_EARLY_RUN_FILES, LATEST, FINAL)
        return name[1:].startswith(tuple(f"{n}." for n in written)) or name[1:].startswith("snapshot_")
    return name in _EARLY_RUN_FILES or (name.startswith("snapshot_") and name.endswith(".pt"))


def load_resume_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The latest checkpoint of ``run_dir`` (for --resume); ConfigError if there is none.

    Loaded on the CPU: ``load_state_dict`` moves weights and optimiser state to their
    parameters' device, and the RNG state must stay a CPU ByteTensor.
    """
    check_resumable(run_dir)
    return load_checkpoint(find_checkpoint(run_dir, prefer_final=False), map_location="cpu")


# --resume and the configuration: which changes would continue a different run. Keys are
# dotted config paths; an entry also covers the keys below it ("model" -> "model.backbone").
# A pre-training config's method sections (moco, simclr, byol, an added method's) are fixed
# as each method's options dataclass says (``_method_rules``).
_RESUME_FIXED: dict[str, dict[str, str]] = {
    "pretrain": {
        "data": "the training data", "labels": "the training data",
        "method": "the objective", "lrc": "the objective",
        "model": "the network's shape", "preprocess": "the input slices",
        "superpixels": "the LRC regions", "augment": "the augmentation",
        "distributed": "the multi-process setup",
        "run.batch_size": "the sample order", "run.seed": "the per-step randomness",
    },
    "finetune": {
        "dataset": "the training data", "init": "the initial weights",
        "labeled": "the labelled cases", "split_seed": "the labelled cases",
        "label_map": "the label ids", "model": "the network's shape",
        "preprocess": "the input slices", "image_size": "the augmentation",
        "rotation_deg": "the augmentation", "hflip": "the augmentation",
        "intensity": "the augmentation", "strategy": "the fine-tuning schedule",
        "run.batch_size": "the sample order", "run.seed": "the per-step randomness",
    },
}


# Changes that take effect from the resumed step on and are worth saying.
_RESUME_NOTED: dict[str, str] = {
    "optim": "applies from the resumed step on, so the run is not what either setting gives "
             "uninterrupted",
    "run.amp": "the numerics change from the resumed step on",
    "snapshots": "snapshots at steps already done are not written",
}


# Changes that do not alter the result.
_RESUME_FREE = ("run.out", "run.device", "run.workers", "run.cache_dir", "run.compile",
                "run.channels_last", "run.checkpoint_every", "run.log_every", "run.image_every",
                "allow_mismatch", "probe")  # the online probe only logs (a probed run is bit-identical)


def check_resume_compatible(saved_config: dict, new_config: dict, kind: str) -> list[str]:
    """Compare a run's saved configuration with the one a ``--resume`` would continue it with.

    saved_config, new_config: ``to_dict`` of the configs (the checkpoint's "config" or the
    run's config.yaml, and the resolved config of this invocation); kind: "pretrain" or
    "finetune". Raises ConfigError listing every change that would continue a different run
    (data, objective/method and the methods' options, network shape, preprocessing, regions,
    augmentation, batch size, seed). Returns one warning per notable change: the step budget
    (``run.steps`` or ``steps``: the LR schedule spans it, so a new budget bends the schedule;
    the caller rewrites config.yaml with the new value), optimiser settings, AMP, snapshots,
    and keys this function does not know. Device, workers, paths, logging cadence, compile and
    method options marked ``FREE_ON_RESUME`` are ignored, as are keys present on one side only
    (configs written by an older lrcseg).
    """
    if kind not in _RESUME_FIXED:
        raise ValueError(f"Illegal kind {kind!r}: 'pretrain' or 'finetune'")
    fixed, free = dict(_RESUME_FIXED[kind]), _RESUME_FREE
    if kind == "pretrain":
        method_fixed, method_free = _method_rules(saved_config.keys() | new_config.keys())
        fixed, free = {**fixed, **method_fixed}, (*free, *method_free)
    saved, new = ({k: _as_lists(v) for k, v in flatten_dict(c).items()}
                  for c in (saved_config, new_config))
    refused, notes = [], []
    for key in sorted(saved.keys() & new.keys()):
        old_value, new_value = saved[key], new[key]
        if old_value == new_value or _covered(key, free):
            continue
        change = f"{key} {old_value!r} -> {new_value!r}"
        reason = _covering(key, fixed)
        if reason is not None:
            refused.append(f"{change} (changes {reason})")
        elif key in ("run.steps", "steps"):
            notes.append(f"{change}: the learning-rate schedule (warm-up, then cosine over "
                            "the step budget) changes from the resumed step on, so the result "
                            "is not that of an uninterrupted run of either length; config.yaml "
                            f"now records {new_value!r}")
        else:
            note = _covering(key, _RESUME_NOTED) or "not known to be safe to change on resume"
            notes.append(f"{change}: {note}")
    if refused:
        raise ConfigError("--resume would continue a different run: " + "; ".join(refused)
                          + ". Resume without these changes, or start a new run with another "
                          "--out")
    return notes


def _method_rules(sections) -> tuple[dict[str, str], list[str]]:
    """The resume rules of the method sections among the top-level keys ``sections``: each
    section is fixed (it configures the objective) but for the options its dataclass marks
    ``FREE_ON_RESUME``, which are free."""
    fixed, free = {}, []
    for name in sorted(set(sections) & set(method_names())):
        fixed[name] = "the objective"
        free += [f"{name}.{option}" for option, kept in options_fixed_on_resume(name).items()
                 if not kept]
    return fixed, free


def _as_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _covering(key: str, table: dict[str, str]) -> str | None:
    for prefix, reason in table.items():
        if key == prefix or key.startswith(prefix + "."):
            return reason
    return None
