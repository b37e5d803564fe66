"""Write segmentation masks (.nii.gz) for a NIfTI file, a DICOM series, or a folder of them.

Example:
  lrcseg predict --model runs/ft_lrc --input scans/ --output masks/
Each mask has its input's grid and affine (for DICOM: the series' geometry, in RAS).
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
    parser.add_argument("--no-progress", action="store_true")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.readers import read_image
    from lrcseg.errors import DataError
    from lrcseg.inference import predict_labels, write_prediction
    from lrcseg.io_utils import atomic_write_json
    from lrcseg.train.common import resolve_device
    from lrcseg.train.finetune import load_finetuned

    device = resolve_device(args.device)
    model, meta = load_finetuned(args.model, device)
    dataset = load_dataset(args.input)
    cases = dataset.all_cases
    if not cases:
        raise DataError(args.input, "no NIfTI file or DICOM series found")
    out = Path(args.output)
    single = len(cases) == 1 and out.name.endswith((".nii", ".nii.gz"))
    num_classes = max(meta["labels"].values()) + 1
    for case in tqdm(cases, desc="predict", disable=args.no_progress):
        image = read_image(case.image)
        labels = predict_labels(model, image, meta["preprocess"], device=device,
                                num_classes=num_classes)
        target = out if single else out / f"{case.id}.nii.gz"
        write_prediction(labels, image, target)
        print(f"{case.image} -> {target}")
    atomic_write_json((out.parent if single else out) / "labels.json", meta["labels"])
    return 0
