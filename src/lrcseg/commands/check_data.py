"""Validate a dataset and summarise it.

PATH may be an nnU-Net v2 raw folder, an MSD-style datalist JSON, any folder of NIfTI files
and DICOM series, a single NIfTI file or a single DICOM series folder. Every case is read
(images in canonical RAS orientation, labels checked against their image grid and the label
ids declared in dataset.json); errors and warnings are listed per case (what is refused and
what is warned about: docs/ACCEPTED_DATA.md). Exit code 0 when no errors (warnings allowed).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="dataset folder, datalist JSON, NIfTI file "
                                                     "or DICOM series folder")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object {cases: [... with warnings], errors: [...], "
                             "warnings: [...]} instead of a table")


def run(args: argparse.Namespace) -> int:
    from lrcseg.data.check import check_data, format_report  # imports torch: not for --help

    report = check_data(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 1 if report["errors"] else 0
