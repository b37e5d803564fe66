"""Write segmentation masks (.nii.gz) for a NIfTI file, a DICOM series, or a folder of them.

Example:
  lrcseg predict --model runs/ft_lrc --input scans/ --output masks/
Each mask has its input's grid and affine (for DICOM: the series' geometry, in RAS). An output
folder gets labels.json (label name -> id) before its first mask, so a partial folder is
readable too. Existing masks (and a labels.json of other labels) are not replaced unless
--overwrite is given. One exception: a prediction into a folder that did not finish (Ctrl-C,
a kill, an unreadable input) continues when the same command is run again with the same
--model: masks already written whole are kept, the others are predicted. While it runs the
output folder belongs to this process; a second lrcseg predict into it is refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrcseg.commands._options import add_device_argument

# In an output folder while a prediction into it has not finished: which model writes it
# and the masks written so far.
UNFINISHED = ".lrcseg_predict.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="fine-tuning run folder or its final.pt")
    parser.add_argument("--input", required=True, help="NIfTI file, DICOM series folder, or a folder of them")
    parser.add_argument("--output", required=True,
                        help="output .nii.gz (single input) or folder (several inputs); "
                             "rerunning an interrupted folder prediction continues it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace masks that already exist at --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from lrcseg.data.layouts import load_dataset
    from lrcseg.errors import DataError
    from lrcseg.locking import own_folder

    dataset = load_dataset(args.input)
    cases = dataset.all_cases
    if not cases:
        raise DataError(args.input, "no NIfTI file or DICOM series found")
    out = Path(args.output)
    if len(cases) == 1 and out.name.endswith((".nii", ".nii.gz")):
        _check_outputs(out, True, [out], args.overwrite)
        model, meta, device = _load_model(args)
        _check_labels_json(out.parent / "labels.json", meta["labels"], args.overwrite)
        _predict(model, meta, device, cases, [out], args.no_progress)
        _write_labels(out.parent / "labels.json", meta["labels"])
        return 0
    with own_folder(out, create=True, hint="wait for it to finish or choose another --output"):
        _predict_folder(args, cases, out)
    return 0


def _predict_folder(args: argparse.Namespace, cases: list, out: Path) -> None:
    """Masks of ``cases`` in the folder ``out``: the record of the unfinished prediction and
    labels.json first, then the masks, each added to the record once written. Continuing an
    unfinished prediction of this model keeps the recorded masks that are whole."""
    from lrcseg.errors import ConfigError
    from lrcseg.evaluate.predict import is_complete_prediction
    from lrcseg.io_utils import atomic_write_json

    targets = [out / f"{case.id}.nii.gz" for case in cases]
    started = None if args.overwrite else _unfinished(out)
    _check_outputs(out, False, targets, args.overwrite, continuing=started is not None)
    identity = _model_identity(args.model)
    if started is not None and started.get("model") != identity:
        model = started.get("model")
        by = f" by {model['path']}" if isinstance(model, dict) and "path" in model else ""
        raise ConfigError(f"{out}: holds an unfinished prediction{by} (another model, or that "
                          "model changed since); run it again with that --model to finish it, "
                          "pass --overwrite to replace it, or choose another --output")
    model, meta, device = _load_model(args)
    if started is None:
        _check_labels_json(out / "labels.json", meta["labels"], args.overwrite)
    recorded = set(started.get("written", [])) if started is not None else set()
    written = [t.name for t, c in zip(targets, cases, strict=True)
               if t.name in recorded and is_complete_prediction(t, c.image)]
    todo = [(c, t) for c, t in zip(cases, targets, strict=True) if t.name not in written]
    if written:
        print(f"{out}: {len(written)} of {len(cases)} masks already written, kept")

    def record(target: Path | None = None) -> None:
        if target is not None:
            written.append(target.name)
        atomic_write_json(out / UNFINISHED, {"model": identity, "written": written})

    record()
    _write_labels(out / "labels.json", meta["labels"])
    try:
        _predict(model, meta, device, [c for c, _ in todo], [t for _, t in todo],
                 args.no_progress, after_each=record)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{len(written)} of {len(targets)} masks in {out} are written; "
                                "run the same command again to predict the rest") from None
    (out / UNFINISHED).unlink()


def _unfinished(out: Path) -> dict[str, Any] | None:
    """The record of an unfinished prediction into ``out`` ({"model": the checkpoint's
    identity, "written": mask names}); None if there is none. An unreadable record is one
    of an unknown model."""
    import json

    marker = out / UNFINISHED
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        record = None
    return record if isinstance(record, dict) else {"model": "unknown"}


def _load_model(args: argparse.Namespace) -> tuple[Any, dict, Any]:
    from lrcseg.models.load import load_finetuned
    from lrcseg.runtime import resolve_device

    device = resolve_device(args.device)
    model, meta = load_finetuned(args.model, device)
    return model, meta, device


def _predict(model, meta: dict, device, cases, targets, no_progress: bool,
             after_each: Callable[[Path], None] | None = None) -> None:
    """Predict each case and write its mask (atomically) to its target; then
    ``after_each(target)``."""
    from tqdm import tqdm

    from lrcseg.data.readers import read_image
    from lrcseg.evaluate.predict import predict_labels, write_prediction

    num_classes = max(meta["labels"].values()) + 1
    for case, target in tqdm(list(zip(cases, targets, strict=True)), desc="predict",
                             disable=no_progress):
        image = read_image(case.image)
        labels = predict_labels(model, image, meta["preprocess"], device=device,
                                num_classes=num_classes)
        write_prediction(labels, image, target)
        print(f"{case.image} -> {target}")
        if after_each is not None:
            after_each(target)


def _write_labels(path: Path, labels: dict) -> None:
    from lrcseg.io_utils import atomic_write_json

    atomic_write_json(path, labels)


def _model_identity(model: str) -> dict[str, Any]:
    """The checkpoint file predicting (resolved path, size, modification time): a rerun
    continues an unfinished folder only with the same one."""
    from lrcseg.models.load import resolve_checkpoint

    path = resolve_checkpoint(model, "fine-tuning run").resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _check_outputs(out: Path, single: bool, targets: list[Path], overwrite: bool,
                   continuing: bool = False) -> None:
    """ConfigError before any work if an output is in the way (unless ``overwrite``, or
    ``continuing`` an unfinished prediction into the folder ``out``)."""
    from lrcseg.errors import ConfigError

    if not single and out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --output is a file, but {len(targets)} inputs (or an output "
                          "not ending in .nii/.nii.gz) need an output folder")
    if single and out.is_dir():
        raise ConfigError(f"{out}: --output is a folder; name a .nii.gz file or drop the ending")
    existing = [t for t in targets if t.exists()]
    if existing and not (overwrite or continuing):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]}: already exists{more}; pass --overwrite to replace "
                          "existing masks or choose another --output")


def _check_labels_json(path: Path, labels: dict, overwrite: bool) -> None:
    """ConfigError if ``path`` holds other labels than this model's (unless ``overwrite``)."""
    import json

    from lrcseg.errors import ConfigError

    if overwrite or not path.is_file():
        return
    try:
        same = json.loads(path.read_text(encoding="utf-8")) == labels
    except (ValueError, UnicodeDecodeError):
        same = False
    if not same:
        raise ConfigError(f"{path}: already exists with other labels than this model's; pass "
                          "--overwrite or choose another --output")
