"""The ``lrcseg`` command: parse arguments, call the library, print results.

Each subcommand lives in ``lrcseg.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``. User-facing errors (``LrcsegError``) print one line naming the file and
the problem and exit 1; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lrcseg import __version__
from lrcseg.errors import LrcsegError

# (subcommand, module, one-line help). Order is the order in --help.
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "run the whole pipeline on synthetic phantoms (the embedded default)"),
    ("check-data", "check_data", "validate a dataset, NIfTI file or DICOM series and summarise it"),
    ("phantoms", "phantoms", "write a synthetic abdominal CT dataset (nnU-Net layout)"),
    ("superpixels", "superpixels", "build the superpixel region cache and inspect region quality"),
    ("pretrain", "pretrain", "self-supervised pre-training (MoCo v2 and others, with or without LRC)"),
    ("export", "export", "export pre-trained U-Net weights loadable by MONAI FlexibleUNet"),
    ("finetune", "finetune", "fine-tune a segmentation U-Net on a few labelled volumes"),
    ("evaluate", "evaluate", "per-organ Dice and HD95 of a fine-tuned model on a dataset"),
    ("predict", "predict", "write segmentation masks for NIfTI files or DICOM series"),
    ("experiment", "experiment", "run a matrix of initialisations x labelled cases x seeds"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrcseg",
        description="Localized Region Contrast pre-training and few-label CT segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"lrcseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(f"lrcseg.commands.{module_name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The global ``--device`` choice for commands that run a network."""
    parser.add_argument("--device", default=None,
                        help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:N")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except LrcsegError as exc:
        print(f"lrcseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lrcseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
