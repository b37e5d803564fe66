"""nnU-Net's planning and preprocessing of a raw dataset (``nnUNetv2_plan_and_preprocess``).

``plan_and_preprocess`` (this process) links the dataset into a work folder and runs
``run_planner`` in a child process (``workspace``): nnU-Net's fingerprint, its experiment
planner and its preprocessing of the 2d configuration.
"""

from __future__ import annotations

from pathlib import Path

from lrcseg.errors import ConfigError
from lrcseg.nnunet.workspace import (
    CONFIGURATION,
    PLANS_NAME,
    dataset_folder_name,
    nnunet_env,
    plans_file,
    run_child,
)


def plan_and_preprocess(data: Path, work: Path, dataset_id: int) -> Path:
    """nnU-Net's 2d planning and preprocessing of the raw dataset ``data`` (linked as
    ``work/raw/Dataset<id>_<name>``); returns the plans file. Done once: an existing plans
    file is reused."""
    plans = plans_file(work, dataset_id, data)
    if plans.is_file() and (plans.parent / f"{PLANS_NAME}_{CONFIGURATION}").is_dir():
        return plans
    if not (Path(data) / "dataset.json").is_file() or not (Path(data) / "imagesTr").is_dir():
        raise ConfigError(f"{data}: fine-tuning with nnU-Net needs an nnU-Net raw dataset "
                          "(dataset.json, imagesTr/, labelsTr/)")
    link = work / "raw" / dataset_folder_name(dataset_id, data)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(data).resolve(), target_is_directory=True)
    run_child(["plan", str(dataset_id)], nnunet_env(work), "planning",
              work / "logs" / "plan_and_preprocess.log")
    return plans


def run_planner(dataset_id: int) -> None:
    """Child process: nnU-Net's fingerprint, plans and 2d preprocessing of ``dataset_id``."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=(CONFIGURATION,), num_processes=(1,))
