"""Exceptions that carry the offending file, so the CLI can print one clear line and exit 1."""

from __future__ import annotations

import os


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
