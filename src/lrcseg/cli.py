"""The ``lrcseg`` command: parse arguments, call the library, print results.

Each subcommand lives in ``lrcseg.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``. The one error boundary is :func:`main`:
- user errors (``LrcsegError``: bad data, bad configuration) print one line naming the file
  and the problem, exit 1;
- environment faults (``OSError``: disk full, read-only file system, permission, not a
  directory...) print one line naming the path and the cause, exit 2;
- ``DataWarning``s print as one line each (once per message) and the command goes on;
- Ctrl-C exits 130, SIGTERM during training 143 (128 + the signal), with one line saying what
  was saved and how to continue. Anything else is a bug and keeps its traceback.

Every command runs inside ``lrcseg.train.invocation.guard_invocation``: the training commands
own their ``--out`` run folder for the whole invocation (a second process on the same folder
is refused with one line), ``--device`` is checked before any data is read and ``--resume``
before the run's config.yaml is read. Shared argparse helpers live in
``lrcseg.commands._options``; command modules never import this module.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import shlex
import signal
import sys

from lrcseg import __version__
from lrcseg.errors import DataWarning, LrcsegError, handle_data_warnings
from lrcseg.train.invocation import guard_invocation

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
    ("probe", "probe", "frozen-feature dense linear probe of a network (pre-trained, exported, scratch)"),
    ("predict", "predict", "write segmentation masks for NIfTI files or DICOM series"),
    ("experiment", "experiment", "run a matrix of initialisations x labelled cases x seeds"),
]

# Subcommands that write a run folder at --out (new, resumed or cleared): the process owns the
# folder while it runs. ``predict`` owns its output folder itself (only a folder output needs
# it); ``experiment`` and ``demo`` claim their cells with their own locks (several processes
# may share one experiment folder).
RUN_FOLDER_COMMANDS = ("pretrain", "finetune")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` to an option's help
    when argparse holds its default. Options whose default comes from the config dataclasses
    (argparse default None: "not given") and on/off flags say their default in their own text.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required
                or action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action.default, bool)):
            return text
        return f"{text} (default: %(default)s)"


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
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    prefix = f"lrcseg {args.command}"
    shown: set[str] = set()

    def print_warning(warning: DataWarning) -> None:
        if str(warning) not in shown:
            shown.add(str(warning))
            print(f"{prefix}: warning: {warning}", file=sys.stderr)

    try:
        with handle_data_warnings(print_warning), guard_invocation(
                device=getattr(args, "device", None), out=getattr(args, "out", None),
                resume=getattr(args, "resume", False), own_out=_writes_run_folder(args)):
            return int(args._run(args) or 0)
    except LrcsegError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prefix}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{prefix}: {describe_interrupt(args, exc)}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)


def _writes_run_folder(args: argparse.Namespace) -> bool:
    """True if the command writes a run folder at --out this time (not --print-config)."""
    return args.command in RUN_FOLDER_COMMANDS and not getattr(args, "print_config", False)


def describe_interrupt(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    """'interrupted[: what was saved][; how to continue]' for Ctrl-C or SIGTERM."""
    text = "interrupted" + (f": {exc}" if str(exc) else "")
    if getattr(exc, "resumable", False):
        if args.command in RUN_FOLDER_COMMANDS:
            text += f"; continue with: lrcseg {args.command} --out {shlex.quote(args.out)} --resume"
        else:
            text += "; rerun the same command to continue"
    return text


def describe_os_error(exc: OSError) -> str:
    """'PATH: cause (ENAME)' for an environment fault, e.g. a full disk or a read-only folder."""
    cause = exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)
    if exc.errno in errno.errorcode:
        cause += f" ({errno.errorcode[exc.errno]})"
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


if __name__ == "__main__":
    sys.exit(main())
