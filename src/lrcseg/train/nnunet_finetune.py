"""Few-label fine-tuning with nnU-Net's own trainer, scored by lrcseg's evaluation.

    dataset (nnU-Net raw layout) -> nnUNetv2_plan_and_preprocess -c 2d (once per experiment)
    per cell: nnUNetTrainer on the K labelled cases (fold 0 = our split), a fixed iteration
              budget, optionally from ``lrcseg export --format nnunet`` weights
              -> nnUNetPredictor on the evaluation cases -> lrcseg's SegmentationMetrics

nnU-Net reads its folders from environment variables when it is imported, so its planning,
training and prediction each run in a child process (``python -m
lrcseg.train.nnunet_finetune``) with ``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` pointing into the experiment folder; every cell gets its own results
folder, so several runner processes never share one. The trainer is nnU-Net's
``nnUNetTrainer`` with two changes only: ``do_split`` returns the K labelled cases (as
training and as nnU-Net's per-epoch pseudo-validation: no further labels are used), and the
budget is ``epochs x iterations_per_epoch`` (same for every initialisation). The last
checkpoint (``checkpoint_final.pth``) is the result, as in lrcseg's own fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lrcseg.errors import ConfigError
from lrcseg.io_utils import atomic_write_json

TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__2d"


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


def _child(args: list[str], env: dict[str, str], what: str, log: Path) -> None:
    """Run this module's ``main(args)`` in a child process; ConfigError naming ``log`` on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        result = subprocess.run([sys.executable, "-m", "lrcseg.train.nnunet_finetune", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise ConfigError(f"{log}: nnU-Net {what} failed (exit {result.returncode}): {tail[0]}")


def dataset_folder_name(dataset_id: int, data: Path) -> str:
    return f"Dataset{dataset_id:03d}_{Path(data).name.split('_', 1)[-1] or 'lrcseg'}"


def plan_and_preprocess(data: Path, work: Path, dataset_id: int) -> Path:
    """nnU-Net's 2d planning and preprocessing of the raw dataset ``data`` (linked as
    ``work/raw/Dataset<id>_<name>``); returns the plans file. Done once: an existing plans
    file is reused."""
    name = dataset_folder_name(dataset_id, data)
    plans = work / "preprocessed" / name / "nnUNetPlans.json"
    if plans.is_file() and (plans.parent / "nnUNetPlans_2d").is_dir():
        return plans
    if not (Path(data) / "dataset.json").is_file() or not (Path(data) / "imagesTr").is_dir():
        raise ConfigError(f"{data}: fine-tuning with nnU-Net needs an nnU-Net raw dataset "
                          "(dataset.json, imagesTr/, labelsTr/)")
    link = work / "raw" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(data).resolve(), target_is_directory=True)
    _child(["plan", str(dataset_id)], nnunet_env(work), "planning",
           work / "logs" / "plan_and_preprocess.log")
    return plans


def train(work: Path, dataset_id: int, data: Path, train_ids: list[str], weights: Path | None,
          iterations: int, iterations_per_epoch: int, seed: int, out: Path,
          device: str = "cpu", batch_size: int | None = None) -> Path:
    """Train nnU-Net (2d, fold 0 = ``train_ids``) into ``out``; returns the trainer's folder
    (holding ``checkpoint_final.pth``). An existing final checkpoint is kept.
    batch_size: None = the plans' batch size."""
    folder = out / dataset_folder_name(dataset_id, data) / TRAINER_FOLDER / "fold_0"
    if (folder / "checkpoint_final.pth").is_file():
        return folder
    spec = {"dataset": dataset_folder_name(dataset_id, data), "train": sorted(train_ids),
            "weights": str(weights) if weights else None, "iterations": iterations,
            "iterations_per_epoch": iterations_per_epoch, "seed": seed, "device": device,
            "batch_size": batch_size}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "nnunet_train.json", spec)
    _child(["train", str(out / "nnunet_train.json")], nnunet_env(work, out, device), "training",
           out / "nnunet_train.log")
    return folder


def predict(work: Path, model_folder: Path, images: dict[str, str], out: Path,
            device: str = "cpu", mirroring: bool = True) -> dict[str, Path]:
    """nnU-Net's predictor (``checkpoint_final.pth``) on ``images`` {case id: image path};
    returns {case id: predicted label file}."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(model_folder.parent), "images": images, "out": str(out),
            "device": device, "mirroring": mirroring}
    atomic_write_json(out / "nnunet_predict.json", spec)
    _child(["predict", str(out / "nnunet_predict.json")], nnunet_env(work, device=device),
           "prediction", out / "nnunet_predict.log")
    return {case: out / f"{case}.nii.gz" for case in images}


# ---- child-process side: everything below imports nnU-Net ---------------------------------

def _plan(dataset_id: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=("2d",), num_processes=(1,))


def _train(spec_path: str) -> None:
    import random

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    spec = json.loads(Path(spec_path).read_text())
    random.seed(spec["seed"])
    np.random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    cases = list(spec["train"])
    pre = Path(nnUNet_preprocessed) / spec["dataset"]
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # as nnunetv2's run_training sets it
    if spec.get("batch_size"):
        plans["configurations"]["2d"]["batch_size"] = int(spec["batch_size"])
    trainer = nnUNetTrainer(plans, "2d", 0, load_json(str(pre / "dataset.json")),
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


def _predict(spec_path: str) -> None:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrcseg.train.nnunet_finetune")
    parser.add_argument("step", choices=["plan", "train", "predict"])
    parser.add_argument("arg", help="dataset id (plan) or the step's JSON spec")
    args = parser.parse_args(argv)
    if args.step == "plan":
        _plan(int(args.arg))
    elif args.step == "train":
        _train(args.arg)
    else:
        _predict(args.arg)
    return 0


def score(dataset: Any, predictions: dict[str, Path], labels: dict[str, int]) -> dict[str, Any]:
    """lrcseg's per-case, per-organ Dice / HD95 of nnU-Net's predicted label files (read into
    RAS+ like the references, on the original grid)."""
    from lrcseg.data.readers import read_image, read_label
    from lrcseg.evaluate.metrics import SegmentationMetrics

    by_id = {c.id: c for c in dataset.all_cases}
    metrics = SegmentationMetrics({n: i for n, i in labels.items() if i != 0})
    for case_id, path in sorted(predictions.items()):
        case = by_id[case_id]
        image = read_image(case.image)
        ref = read_label(case.label, image)
        pred = read_label(path, image)
        metrics.add(case_id, pred.array, ref.array, image.spacing)
    return metrics.result()


if __name__ == "__main__":
    sys.exit(main())
