"""Where lrcseg keeps derived data (caches): never inside the users' data tree."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else ``$LRCSEG_CACHE``, else ``~/.cache/lrcseg``."""
    if override:
        return Path(override)
    env = os.environ.get("LRCSEG_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "lrcseg"
