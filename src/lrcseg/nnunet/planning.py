"""nnU-Net's planning and preprocessing of a raw dataset (``nnUNetv2_plan_and_preprocess``).

``plan_and_preprocess`` (this process) links the dataset into a work folder and runs
``run_planner`` in a child process (``workspace``): nnU-Net's fingerprint, its experiment
planner (which plans every configuration, 2d and, for 3D data, 3d_fullres) and its
preprocessing of the one configuration asked for (2d or 3d_fullres).
"""

from __future__ import annotations

from pathlib import Path

from lrcseg.errors import ConfigError
from lrcseg.nnunet.workspace import (
    DEFAULT_CONFIGURATION,
    PLANS_NAME,
    check_configuration,
    dataset_folder_name,
    nnunet_env,
    plans_file,
    preprocessed_folder,
    run_child,
)


def plan_and_preprocess(data: Path, work: Path, dataset_id: int,
                        configuration: str = DEFAULT_CONFIGURATION) -> Path:
    """nnU-Net's planning and its preprocessing for ``configuration`` ("2d" or "3d_fullres")
    of the raw dataset ``data`` (linked as ``work/raw/Dataset<id>_<name>``); returns the plans
    file. Done once per configuration: existing plans and preprocessed data are reused."""
    check_configuration(configuration)
    plans = plans_file(work, dataset_id, data)
    if plans.is_file() and preprocessed_folder(plans, configuration).is_dir():
        return plans
    if not (Path(data) / "dataset.json").is_file() or not (Path(data) / "imagesTr").is_dir():
        raise ConfigError(f"{data}: fine-tuning with nnU-Net needs an nnU-Net raw dataset "
                          "(dataset.json, imagesTr/, labelsTr/)")
    link = work / "raw" / dataset_folder_name(dataset_id, data)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(data).resolve(), target_is_directory=True)
    log = "plan_and_preprocess" + ("" if configuration == DEFAULT_CONFIGURATION else f"_{configuration}")
    run_child(["plan", str(dataset_id), "--configuration", configuration], nnunet_env(work),
              "planning", work / "logs" / f"{log}.log")
    return plans


def run_planner(dataset_id: int, configuration: str = DEFAULT_CONFIGURATION) -> None:
    """Child process: nnU-Net's fingerprint, plans and the preprocessing of ``configuration``
    for ``dataset_id`` (the same data give the same plans, so planning again for a second
    configuration leaves the first one's plans as they were). Exits with one line naming the plans file when
    nnU-Net planned no such configuration (3d_fullres of 2D images)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    plans = Path(nnUNet_preprocessed) / convert_id_to_dataset_name(dataset_id) / f"{PLANS_NAME}.json"
    planned = load_json(str(plans))["configurations"]
    if configuration not in planned:
        raise SystemExit(f"{plans}: nnU-Net planned no {configuration!r} configuration for this "
                         f"dataset (it planned {', '.join(sorted(planned))})")
    preprocess([dataset_id], configurations=(configuration,), num_processes=(1,))
