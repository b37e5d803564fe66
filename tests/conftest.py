"""Shared fixtures: an isolated cache folder and the real chest CT series (if present).

The real CT is ``../shared/data/chest_ct_dicom`` beside the checkout, or any DICOM series
folder named by the environment variable ``LRCSEG_TEST_CT``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHEST_CT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chest_ct_dicom"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own LRCSEG_CACHE so caches never leak between tests."""
    monkeypatch.setenv("LRCSEG_CACHE", str(tmp_path_factory.mktemp("lrcseg_cache")))


@pytest.fixture
def chest_ct_dir() -> Path:
    path = Path(os.environ.get("LRCSEG_TEST_CT") or CHEST_CT).resolve()
    if not path.is_dir():
        pytest.skip(f"real chest CT not found at {path} (set LRCSEG_TEST_CT to a DICOM series folder)")
    return path
