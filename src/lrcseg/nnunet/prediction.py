"""Prediction with nnU-Net's own predictor, scored by lrcseg's evaluation.

``predict`` (this process) writes the spec and runs ``run_predictor`` in a child process
(``workspace``): nnU-Net's ``nnUNetPredictor`` with a trained fold's ``checkpoint_final.pth``
on raw images, one label file per case. ``score`` reads those files into RAS+ like the
references and computes lrcseg's per-case, per-organ Dice / HD95 on the original grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lrcseg.data.layouts import Dataset
from lrcseg.data.readers import read_label
from lrcseg.io_utils import atomic_write_json
from lrcseg.nnunet.workspace import nnunet_env, run_child


def predict(work: Path, model_folder: Path, images: dict[str, str], out: Path,
            device: str = "cpu", mirroring: bool = True) -> dict[str, Path]:
    """nnU-Net's predictor (``checkpoint_final.pth``) on ``images`` {case id: image path};
    returns {case id: predicted label file}."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(model_folder.parent), "images": images, "out": str(out),
            "device": device, "mirroring": mirroring}
    atomic_write_json(out / "nnunet_predict.json", spec)
    run_child(["predict", str(out / "nnunet_predict.json")], nnunet_env(work, device=device),
              "prediction", out / "nnunet_predict.log")
    return {case: out / f"{case}.nii.gz" for case in images}


def run_predictor(spec_path: str) -> None:
    """Child process: nnU-Net's predictor as ``predict``'s spec file describes it."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    spec = json.loads(Path(spec_path).read_text())
    predictor = nnUNetPredictor(use_mirroring=spec["mirroring"], device=torch.device(spec["device"]),
                                perform_everything_on_device=spec["device"] != "cpu",
                                allow_tqdm=False)
    # as initialize_from_trained_model_folder, without its search over every trainer module
    # (which imports torchvision, absent or broken beside CPU torch builds)
    model = Path(spec["model"])
    plans = PlansManager(load_json(str(model / "plans.json")))
    dataset_json = load_json(str(model / "dataset.json"))
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    configuration = plans.get_configuration(checkpoint["init_args"]["configuration"])
    network = nnUNetTrainer.build_network_architecture(
        plans, configuration, determine_num_input_channels(plans, configuration, dataset_json),
        plans.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"])
    predictor.manual_initialization(network, plans, configuration, [checkpoint["network_weights"]],
                                    dataset_json, checkpoint["trainer_name"],
                                    checkpoint.get("inference_allowed_mirroring_axes"))
    cases = sorted(spec["images"])
    predictor.predict_from_files([[spec["images"][c]] for c in cases],
                                 [str(Path(spec["out"]) / c) for c in cases],
                                 num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)


def score(dataset: Dataset, predictions: dict[str, Path], labels: dict[str, int]) -> dict[str, Any]:
    """lrcseg's per-case, per-organ Dice / HD95 of nnU-Net's predicted label files (read into
    RAS+ like the references, on the original grid; the references' ids as read: nnU-Net
    trains on the dataset's own), through ``evaluate.run.score_cases``."""
    from lrcseg.evaluate.run import score_cases  # torch, loaded when scoring

    by_id = {c.id: c for c in dataset.all_cases}
    return score_cases([by_id[case_id] for case_id in sorted(predictions)],
                       lambda case, image: read_label(predictions[case.id], image).array, labels)
