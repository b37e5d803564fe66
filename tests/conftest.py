"""Shared fixtures: an isolated cache folder and the real chest CT series (if present).

The real CT is ``../shared/data/chest_ct_dicom`` beside the checkout, or any DICOM series
folder named by the environment variable ``LRCSEG_TEST_CT``.
"""

from __future__ import annotations

import os
import signal
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


def write_finetuned_run(run: Path, model_cfg, labels: dict[str, int], spacing_mm: float) -> Path:
    """A fine-tuning run folder holding an untrained U-Net of ``model_cfg`` as ``final.pt``, as
    ``lrcseg finetune`` writes it (for tests of what reads fine-tuned models)."""
    from lrcseg.config import PreprocessConfig, to_dict
    from lrcseg.models.unet import build_unet, flexible_unet_kwargs
    from lrcseg.train.checkpoint import save_checkpoint

    preprocess = PreprocessConfig(spacing_mm=spacing_mm)
    model = build_unet(model_cfg, preprocess.in_channels, len(labels))
    run.mkdir(parents=True)
    save_checkpoint(run, {
        "step": 1, "kind": "finetune", "model": model.state_dict(),
        "flexible_unet": flexible_unet_kwargs(model_cfg, preprocess.in_channels, len(labels)),
        "model_config": to_dict(model_cfg), "preprocess": to_dict(preprocess), "labels": labels,
    }, final=True)
    return run


def paired_result_rows() -> list[dict]:
    """results.csv-like rows: inits A and B at K = 1, draws 0/1, one seed, two cases; A has no
    value at (draw 1, c2) and B no row there."""
    values = {("A", 0, "c1"): 0.5, ("A", 0, "c2"): 0.7, ("A", 1, "c1"): 0.9, ("A", 1, "c2"): None,
              ("B", 0, "c1"): 0.4, ("B", 0, "c2"): 0.6, ("B", 1, "c1"): 0.6}
    return [{"init": init, "K": 1, "draw": draw, "seed": 0, "case": case, "liver": v, "mean": v}
            for (init, draw, case), v in values.items()]


@pytest.fixture
def default_sigint():
    """SIGINT raises KeyboardInterrupt during the test, as in a Python started from a terminal.

    A runner started in the background by a non-interactive shell (``cmd &``) inherits SIGINT
    ignored, and Python then keeps it ignored: a test that sends itself SIGINT needs this."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tests: tiny networks run fastest single-threaded on a
    shared CPU, and in-process runs then use the float kernels of single-threaded children."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrain_phantoms(tmp_path_factory) -> dict[str, str]:
    """Three small phantoms (4 x 4 x 8 mm) for pre-training tests, once per module: {"data":
    the dataset folder, "cache": a cache folder beside it}."""
    from lrcseg.phantoms.generate import write_phantom_dataset

    root = tmp_path_factory.mktemp("pretrain_phantoms")
    data = write_phantom_dataset(root / "ph", cases=3, seed=0, spacing_mm=(4.0, 4.0, 8.0),
                                 montage=False)
    return {"data": str(data), "cache": str(root / "cache")}
