"""Errors and warnings that carry the offending file, so the CLI can print one clear line.

``LrcsegError`` (bad data, bad configuration) exits 1. ``DataWarning`` marks data lrcseg reads
but that may not be what the user means (an oblique affine, a skipped RTSTRUCT series...): the
CLI prints each one once as a line, ``check-data`` lists them per case. docs/ACCEPTED_DATA.md
lists what is refused and what is warned about.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class LrcsegError(Exception):
    """Base class for user-facing errors (bad data, bad configuration)."""


class DataError(LrcsegError):
    """A problem with an input file or dataset; ``path`` names the file or folder."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ConfigError(LrcsegError):
    """An invalid or inconsistent configuration (e.g. preprocessing mismatch at fine-tuning)."""


class TrainingDiverged(LrcsegError):
    """A non-finite loss: training stops, the last good checkpoint stays as it was."""


class DataWarning(UserWarning):
    """Data that is read, but may be processed other than the user expects.

    path: the file or folder concerned; case: the dataset case id when known (layouts).
    """

    def __init__(self, path: str | os.PathLike | None, message: str, case: str | None = None):
        self.path = None if path is None else str(path)
        self.message = message
        self.case = case
        super().__init__(f"{self.path}: {message}" if self.path else message)


def warn_data(path: str | os.PathLike | None, message: str, case: str | None = None) -> None:
    """Issue a :class:`DataWarning` (shown by the CLI, collected by ``check-data``)."""
    warnings.warn(DataWarning(path, message, case), stacklevel=3)


@contextmanager
def handle_data_warnings(handle: Callable[[DataWarning], None]) -> Iterator[None]:
    """Within the block, pass every :class:`DataWarning` to ``handle`` (each occurrence, not
    once per code location); other warnings are shown as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if isinstance(message, DataWarning):
                handle(message)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
