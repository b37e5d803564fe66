"""Few-label fine-tuning with nnU-Net's own trainer.

``train`` (this process) writes the run's spec and runs ``run_trainer`` in a child process
(``workspace``). The trainer is nnU-Net's ``nnUNetTrainer`` for the spec's configuration
(2d or 3d_fullres) with two changes only:
``do_split`` returns the K labelled cases (as training and as nnU-Net's per-epoch
pseudo-validation: no further labels are used), and the budget is
``epochs x iterations_per_epoch`` (same for every initialisation). It starts from
``lrcseg export --format nnunet`` weights when given (nnU-Net's ``load_pretrained_weights``),
else from nnU-Net's own initialisation. The last checkpoint (``checkpoint_final.pth``) is the
result, as in lrcseg's own fine-tuning; its folder stays loadable by nnU-Net.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lrcseg.errors import ConfigError
from lrcseg.io_utils import atomic_write_json
from lrcseg.nnunet.workspace import (
    DEFAULT_CONFIGURATION,
    PLANS_NAME,
    check_configuration,
    dataset_folder_name,
    nnunet_env,
    run_child,
)


def trainer_folder(configuration: str = DEFAULT_CONFIGURATION) -> str:
    """The trainer's results folder under ``nnUNet_results/<dataset>``, as nnU-Net names it."""
    return f"nnUNetTrainer__{PLANS_NAME}__{configuration}"


def model_folder(out: Path, dataset_id: int, data: Path,
                 configuration: str = DEFAULT_CONFIGURATION) -> Path:
    """The fold folder ``train`` writes into ``out`` (``checkpoint_final.pth`` when done)."""
    return out / dataset_folder_name(dataset_id, data) / trainer_folder(configuration) / "fold_0"


def train(work: Path, dataset_id: int, data: Path, train_ids: list[str], weights: Path | None,
          iterations: int, iterations_per_epoch: int, seed: int, out: Path,
          device: str = "cpu", batch_size: int | None = None,
          configuration: str = DEFAULT_CONFIGURATION) -> Path:
    """Train nnU-Net's ``configuration`` ("2d" or "3d_fullres"; fold 0 = ``train_ids``) into
    ``out``; returns the trainer's folder (holding ``checkpoint_final.pth``). An existing final
    checkpoint is kept. batch_size: None = the plans' batch size. ``weights`` exported for
    another configuration (their JSON says which) are refused before nnU-Net starts."""
    check_configuration(configuration)
    folder = model_folder(out, dataset_id, data, configuration)
    if (folder / "checkpoint_final.pth").is_file():
        return folder
    if weights:
        _check_export_configuration(Path(weights), configuration)
    spec = {"dataset": dataset_folder_name(dataset_id, data), "configuration": configuration,
            "train": sorted(train_ids),
            "weights": str(weights) if weights else None, "iterations": iterations,
            "iterations_per_epoch": iterations_per_epoch, "seed": seed, "device": device,
            "batch_size": batch_size}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "nnunet_train.json", spec)
    run_child(["train", str(out / "nnunet_train.json")], nnunet_env(work, out, device),
              "training", out / "nnunet_train.log")
    return folder


def _check_export_configuration(weights: Path, configuration: str) -> None:
    """ConfigError when the JSON beside ``weights`` (``lrcseg export --format nnunet``) names
    another configuration than the one trained: nnU-Net's loader would fail on the first
    convolution, deep in the child's log. Weights without a readable JSON go to nnU-Net's
    loader unchecked."""
    described = weights.with_suffix(".json")
    try:
        meta = json.loads(described.read_text(encoding="utf-8"))
        exported = meta.get("checked_against_configuration", meta.get("configuration"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    if exported and exported != configuration:
        raise ConfigError(f"{weights}: exported for nnU-Net's {exported} network ({described.name}); "
                          f"cannot start nnU-Net's {configuration} training from it")


def run_trainer(spec_path: str) -> None:
    """Child process: nnU-Net's trainer as ``train``'s spec file describes it."""
    import random

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    spec = json.loads(Path(spec_path).read_text())
    configuration = spec["configuration"]
    random.seed(spec["seed"])
    np.random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    cases = list(spec["train"])
    pre = Path(nnUNet_preprocessed) / spec["dataset"]
    plans = load_json(str(pre / f"{PLANS_NAME}.json"))
    plans["continue_training"] = False  # as nnunetv2's run_training sets it
    if spec.get("batch_size"):
        plans["configurations"][configuration]["batch_size"] = int(spec["batch_size"])
    trainer = nnUNetTrainer(plans, configuration, 0, load_json(str(pre / "dataset.json")),
                            device=torch.device(spec["device"]))
    # nnU-Net's own trainer class (its folder and checkpoints stay loadable by nnU-Net), with
    # fold 0 = the K labelled cases, also as its per-epoch pseudo-validation
    trainer.do_split = lambda: (list(cases), list(cases))
    per_epoch = min(spec["iterations_per_epoch"], spec["iterations"])
    trainer.num_iterations_per_epoch = per_epoch
    trainer.num_epochs = math.ceil(spec["iterations"] / per_epoch)
    trainer.num_val_iterations_per_epoch = 1
    trainer.initialize()
    if spec["weights"]:
        load_pretrained_weights(trainer.network, spec["weights"], verbose=False)
    trainer.run_training()
