"""Shared fixtures: an isolated cache folder and the real chest CT series (if present)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHEST_CT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chest_ct_dicom"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own LRCSEG_CACHE so caches never leak between tests."""
    monkeypatch.setenv("LRCSEG_CACHE", str(tmp_path_factory.mktemp("lrcseg_cache")))


@pytest.fixture
def chest_ct_dir() -> Path:
    path = CHEST_CT.resolve()
    if not path.is_dir():
        pytest.skip(f"real chest CT not found at {path} (../shared/data/chest_ct_dicom)")
    return path
