"""An nnU-Net work folder, and the child processes nnU-Net runs in.

nnU-Net reads its folders from environment variables when it is imported, so its planning,
training and prediction each run in a child process (``python -m lrcseg.nnunet STEP ARG``,
``__main__.py``) with ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` pointing
into a work folder::

    <work>/raw/Dataset<id>_<name>               a link to the raw dataset
    <work>/preprocessed/Dataset<id>_<name>/     nnUNetPlans.json, dataset.json, and one
                                                nnUNetPlans_<configuration>/ per configuration
    <work>/logs/plan_and_preprocess[_3d_fullres].log

Each training writes its results into a folder of its own (``training.train``'s ``out``), so
several processes never share one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lrcseg.errors import ConfigError

#: the nnU-Net configuration lrcseg plans, trains and predicts with unless told otherwise
DEFAULT_CONFIGURATION = "2d"
#: the configurations lrcseg plans, pre-trains for and trains (3d_lowres and the cascade
#: would need nnU-Net's second stage, which lrcseg does not run)
CONFIGURATIONS = ("2d", "3d_fullres")
#: nnU-Net's default plans identifier (its plans file and preprocessed-data folder prefix)
PLANS_NAME = "nnUNetPlans"


def dataset_folder_name(dataset_id: int, data: Path) -> str:
    """nnU-Net's name of the dataset ``data`` under ``dataset_id``: ``Dataset<id>_<name>``."""
    return f"Dataset{dataset_id:03d}_{Path(data).name.split('_', 1)[-1] or 'lrcseg'}"


def check_configuration(configuration: str) -> str:
    """``configuration`` if lrcseg runs it (``CONFIGURATIONS``), else a ConfigError naming them."""
    if configuration not in CONFIGURATIONS:
        raise ConfigError(f"nnU-Net configuration {configuration!r} is not supported: use one of "
                          f"{', '.join(CONFIGURATIONS)}")
    return configuration


def preprocessed_folder(plans: Path, configuration: str) -> Path:
    """nnU-Net's preprocessed data of ``configuration`` beside its plans file ``plans``."""
    return plans.parent / f"{PLANS_NAME}_{configuration}"


def plans_file(work: Path, dataset_id: int, data: Path) -> Path:
    """Where nnU-Net's planner writes the plans of ``data`` in the work folder ``work``."""
    return work / "preprocessed" / dataset_folder_name(dataset_id, data) / f"{PLANS_NAME}.json"


def nnunet_env(work: Path, results: Path | None = None, device: str | None = None
               ) -> dict[str, str]:
    """The environment of an nnU-Net child process rooted at ``work``. ``device="cpu"``
    (training, prediction) runs nnU-Net's data augmentation in the main process unless
    ``nnUNet_n_proc_DA`` is set: background workers only compete with CPU training (the
    planner must not see 0 there: it sets torch's thread count from it)."""
    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(results or work / "results"))
    if device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "0")
    return env


def run_child(args: list[str], env: dict[str, str], what: str, log: Path) -> None:
    """``python -m lrcseg.nnunet *args`` with its output in ``log``; ConfigError naming ``log``
    on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        result = subprocess.run([sys.executable, "-m", "lrcseg.nnunet", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise ConfigError(f"{log}: nnU-Net {what} failed (exit {result.returncode}): {tail[0]}")
