"""Write segmentation masks (.nii.gz) for a NIfTI file, a DICOM series, or a folder of them.

Example:
  lrcseg predict --model runs/ft_lrc --input scans/ --output masks/
Each mask has its input's grid and affine (for DICOM: the series' geometry, in RAS). Existing
masks (and a labels.json of other labels) are not replaced unless --overwrite is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrcseg.cli import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="fine-tuning run folder or its final.pt")
    parser.add_argument("--input", required=True, help="NIfTI file, DICOM series folder, or a folder of them")
    parser.add_argument("--output", required=True,
                        help="output .nii.gz (single input) or folder (several inputs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace masks that already exist at --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.readers import read_image
    from lrcseg.errors import DataError
    from lrcseg.evaluate.predict import predict_labels, write_prediction
    from lrcseg.io_utils import atomic_write_json
    from lrcseg.models.load import load_finetuned
    from lrcseg.runtime import resolve_device

    dataset = load_dataset(args.input)
    cases = dataset.all_cases
    if not cases:
        raise DataError(args.input, "no NIfTI file or DICOM series found")
    out = Path(args.output)
    single = len(cases) == 1 and out.name.endswith((".nii", ".nii.gz"))
    targets = [out] if single else [out / f"{case.id}.nii.gz" for case in cases]
    _check_outputs(out, single, targets, args.overwrite)
    device = resolve_device(args.device)
    model, meta = load_finetuned(args.model, device)
    labels_json = (out.parent if single else out) / "labels.json"
    _check_labels_json(labels_json, meta["labels"], args.overwrite)
    num_classes = max(meta["labels"].values()) + 1
    for case, target in tqdm(list(zip(cases, targets, strict=True)), desc="predict",
                             disable=args.no_progress):
        image = read_image(case.image)
        labels = predict_labels(model, image, meta["preprocess"], device=device,
                                num_classes=num_classes)
        write_prediction(labels, image, target)
        print(f"{case.image} -> {target}")
    atomic_write_json(labels_json, meta["labels"])
    return 0


def _check_outputs(out: Path, single: bool, targets: list[Path], overwrite: bool) -> None:
    """ConfigError before any work if an output is in the way (unless ``overwrite``)."""
    from lrcseg.errors import ConfigError

    if not single and out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --output is a file, but {len(targets)} inputs (or an output "
                          "not ending in .nii/.nii.gz) need an output folder")
    if single and out.is_dir():
        raise ConfigError(f"{out}: --output is a folder; name a .nii.gz file or drop the ending")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
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
