"""How the cells of an experiment are fine-tuned and scored: the back-end, chosen once.

``ExperimentConfig.finetune_with`` names the back-end, and ``finetune_backend(cfg)`` is the one
place that reads it. The runner, the cells' derived pre-training configs and the report ask
the back-end it returns (``FinetuneBackend``)::

    describe()                             the network and fine-tuning of every cell, in words
    pretrain_network(base, data, out_dir)  a pre-training config set to the network this
                                           back-end fine-tunes (``cells.pretrain_config``)
    prepare(data, out_dir)                 once per invocation, before any cell
    finetune(run) -> bool                  train the cell into its folder; True if training ran
    learning_curve(run)                    (step, metrics) of its learning-curve snapshots
    evaluate(run) -> metrics               its metrics on ``eval_split``
    release(run)                           delete its weights (``keep_checkpoints: false``)

``LrcsegBackend`` is lrcseg's own fine-tuning and evaluation; ``NnUNetBackend`` is nnU-Net's
own trainer and predictor (``lrcseg.nnunet``), scored by lrcseg's metrics. Another back-end is
one class with these methods and an entry in ``_BACKENDS`` (config validation names the
accepted values of ``finetune_with`` too).

Reading this module loads neither torch nor nnunetv2 (``cells`` and ``report`` read it for
configs and words); the run-time methods import them when a cell is fine-tuned.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lrcseg.config import ExperimentConfig, FinetuneConfig, PretrainConfig, to_dict
from lrcseg.data.layouts import load_dataset
from lrcseg.data.splits import choose_labelled, split_cases
from lrcseg.experiment.console import say
from lrcseg.experiment.locks import exclusive_lock, lock_path
from lrcseg.nnunet.planning import plan_and_preprocess
from lrcseg.nnunet.plans import apply_plans, network_from_plans
from lrcseg.nnunet.prediction import predict, score
from lrcseg.nnunet.training import model_folder, train
from lrcseg.nnunet.workspace import plans_file

if TYPE_CHECKING:
    import torch

_say = partial(say, "experiment")


@dataclass(frozen=True)
class CellRun:
    """One cell as the runner hands it to the back-end.

    cfg: the matrix. config: the cell's derived fine-tuning run (``cells.finetune_config``):
    ``run.out`` is the cell's folder, ``init`` the pre-training run folder (or "scratch"),
    ``labeled``, ``split_seed`` and ``run.seed`` the cell's K, draw and seed. data: the
    dataset; out_dir: the experiment folder; device, progress: where and how verbosely to run.
    train_lrcseg, evaluate_lrcseg: lrcseg's training of a fine-tuning run (to its final.pt,
    resuming from its checkpoint.pt; True if it ran) and lrcseg's evaluation of a run folder or
    snapshot on ``eval_split``, as the runner calls them for every lrcseg run (it names them at
    its module top, where the tests stand in for them).
    """

    cfg: ExperimentConfig
    config: FinetuneConfig
    data: Path
    out_dir: Path
    device: torch.device
    progress: bool
    train_lrcseg: Callable[[FinetuneConfig], bool]
    evaluate_lrcseg: Callable[[Path], dict[str, Any]]

    @property
    def folder(self) -> Path:
        """The cell's folder; its metrics.json marks it as finished."""
        return Path(self.config.run.out)

    @property
    def pretraining(self) -> Path | None:
        """The pre-training run the cell starts from; None for scratch."""
        return None if self.config.init == "scratch" else Path(self.config.init)


class FinetuneBackend(Protocol):
    """How every cell of a matrix is fine-tuned and scored (module docstring)."""

    def describe(self) -> str: ...

    def pretrain_network(self, base: PretrainConfig, data: Path, out_dir: Path
                         ) -> PretrainConfig: ...

    def prepare(self, data: Path, out_dir: Path) -> None: ...

    def finetune(self, run: CellRun) -> bool: ...

    def learning_curve(self, run: CellRun) -> Iterator[tuple[int, dict[str, Any]]]: ...

    def evaluate(self, run: CellRun) -> dict[str, Any]: ...

    def release(self, run: CellRun) -> None: ...


def delete_weights(run_dir: Path) -> None:
    """Remove a finished lrcseg run's weights (*.pt): a fine-tuning cell's or a pre-training
    run's; its config, logs and metrics stay."""
    for path in run_dir.glob("*.pt"):
        path.unlink(missing_ok=True)


class LrcsegBackend:
    """lrcseg's own fine-tuning (``train/finetune.py``: the cell's ``FinetuneConfig``) and
    evaluation (``evaluate/run.py``) of the final weights and the learning-curve snapshots;
    each result also names the cell's labelled cases (from the run's split.json), so a
    metrics file kept without its run folder still says what the cell trained on."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def describe(self) -> str:
        cfg = self.cfg
        return (f"backbone {cfg.backbone}, {cfg.image_size} px crops, {cfg.spacing_mm} mm "
                "in-plane spacing")

    def pretrain_network(self, base: PretrainConfig, data: Path, out_dir: Path
                         ) -> PretrainConfig:
        return base  # the FlexibleUNet of ``cfg.backbone``

    def prepare(self, data: Path, out_dir: Path) -> None:
        return None

    def finetune(self, run: CellRun) -> bool:
        return run.train_lrcseg(run.config)

    def learning_curve(self, run: CellRun) -> Iterator[tuple[int, dict[str, Any]]]:
        from lrcseg.train.finetune import snapshot_name

        for step in run.config.snapshots:
            snapshot = run.folder / snapshot_name(step)
            if not snapshot.is_file():  # a run started without it: the curve skips the run
                _say(f"{run.folder.parent.name}/{run.folder.name}: no {snapshot.name}, its "
                     "learning-curve point is skipped")
                continue
            yield step, self._with_cases(run, run.evaluate_lrcseg(snapshot))

    def evaluate(self, run: CellRun) -> dict[str, Any]:
        return self._with_cases(run, run.evaluate_lrcseg(run.folder))

    @staticmethod
    def _with_cases(run: CellRun, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` with "labelled_cases", the K cases the run's split.json records."""
        split = run.folder / "split.json"
        if split.is_file():
            result = {**result, "labelled_cases": json.loads(split.read_text())["labeled"]}
        return result

    def release(self, run: CellRun) -> None:
        delete_weights(run.folder)


#: 3D supervoxels get this fraction of the 2D superpixel scale: about as many voxels per region
#: (docs/METHOD.md, "Supervoxels (3D)": 33 for the 2D default 100, ``lrcseg superpixels
#: --supervoxels``'s default)
SUPERVOXEL_SCALE_FRACTION = 1 / 3


def supervoxel_scale(scale_2d: float) -> float:
    """The supervoxel scale of a 3D pre-training cell for the 2D superpixel scale ``scale_2d``:
    a third of it, to a whole number (100 -> 33)."""
    return float(round(scale_2d * SUPERVOXEL_SCALE_FRACTION))


class NnUNetBackend:
    """nnU-Net's own trainer and predictor (``lrcseg.nnunet``), scored by lrcseg's metrics.

    The nnU-Net configuration is ``cfg.nnunet_configuration`` ("2d" or "3d_fullres") for
    every step. prepare: nnU-Net plans the dataset and preprocesses it for that configuration
    once (``<out>/nnunet``), and every pre-training is of the plans' network of it (3d_fullres:
    a 3D pre-training on views of the plans' patch, with supervoxels at
    ``supervoxel_scale`` of the 2D scale unless ``pretrain_overrides`` or an initialisation's
    overrides set ``superpixels.scale``). A cell exports its pre-training for nnU-Net
    (``init_nnunet.pth`` in the cell; not for scratch), trains nnU-Net's trainer of that
    configuration on its K labelled cases for ``finetune_steps`` iterations
    (``<cell>/nnunet``), predicts ``eval_split`` with nnU-Net's predictor
    (``<cell>/predictions``) and scores the label files.
    """

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.configuration = cfg.nnunet_configuration

    @staticmethod
    def _work(out_dir: Path) -> Path:
        """nnU-Net's raw / preprocessed folders of the experiment."""
        return out_dir / "nnunet"

    def describe(self) -> str:
        cfg = self.cfg
        views = ("pre-training views of the patch's shorter side" if self.configuration == "2d"
                 else "3D pre-training on views of the patch, supervoxels")
        return (f"nnU-Net's {self.configuration} plans network (its patch, spacing and "
                f"CTNormalization; {views}), fine-tuned by nnU-Net's "
                f"trainer: {cfg.finetune_steps} iterations, batch "
                f"{cfg.nnunet_batch_size or 'of the plans'}")

    def pretrain_network(self, base: PretrainConfig, data: Path, out_dir: Path
                         ) -> PretrainConfig:
        plans = plans_file(self._work(out_dir), self.cfg.nnunet_dataset_id, data)
        cfg = apply_plans(base, network_from_plans(plans, self.configuration))
        if cfg.model.spatial_dims == 3:
            cfg = dataclasses.replace(cfg, superpixels=dataclasses.replace(
                cfg.superpixels, scale=supervoxel_scale(cfg.superpixels.scale)))
        return cfg

    def prepare(self, data: Path, out_dir: Path) -> None:
        """nnU-Net's plans and its preprocessing of the dataset for the configuration, made
        once for every cell."""
        with exclusive_lock(lock_path(out_dir, "nnunet_plans"), wait=True):
            plans = plan_and_preprocess(data, self._work(out_dir), self.cfg.nnunet_dataset_id,
                                        self.configuration)
        _say(f"nnU-Net plans: {plans} ({self.configuration})")

    def _labelled(self, run: CellRun) -> list[str]:
        return choose_labelled(load_dataset(run.data), run.config.labeled,
                               run.config.split_seed)["labeled"]

    def finetune(self, run: CellRun) -> bool:
        """Export the pre-training for nnU-Net (not for scratch), then train nnU-Net's trainer
        on the cell's K labelled cases."""
        cfg = self.cfg
        weights = None
        if run.pretraining is not None:
            from lrcseg.models.load import load_pretrain_network  # torch
            from lrcseg.nnunet.export import export_nnunet

            weights = run.folder / "init_nnunet.pth"
            net, pt_cfg, _ = load_pretrain_network(run.pretraining)
            export_nnunet(net, pt_cfg.model, to_dict(pt_cfg.preprocess),
                          to_dict(pt_cfg.superpixels), weights)
        train(self._work(run.out_dir), cfg.nnunet_dataset_id, run.data, self._labelled(run),
              weights, cfg.finetune_steps, cfg.nnunet_iterations_per_epoch, run.config.run.seed,
              run.folder / "nnunet", device=str(run.device.type), batch_size=cfg.nnunet_batch_size,
              configuration=self.configuration)
        return True

    def learning_curve(self, run: CellRun) -> Iterator[tuple[int, dict[str, Any]]]:
        return iter(())  # nnU-Net's trainer keeps no snapshots (config refuses learning curves)

    def evaluate(self, run: CellRun) -> dict[str, Any]:
        """nnU-Net's predictor on ``eval_split``, scored by lrcseg's metrics; the result also
        names the cell's labelled cases."""
        cfg = self.cfg
        dataset = load_dataset(run.data)
        cases = split_cases(dataset, cfg.eval_split)
        model = model_folder(run.folder / "nnunet", cfg.nnunet_dataset_id, run.data,
                             self.configuration)
        predictions = predict(self._work(run.out_dir), model, {c.id: str(c.image) for c in cases},
                              run.folder / "predictions", device=str(run.device.type),
                              mirroring=cfg.nnunet_mirroring)
        result = score(dataset, predictions, dataset.labels)
        result["labelled_cases"] = self._labelled(run)
        return result

    def release(self, run: CellRun) -> None:
        """nnU-Net's checkpoints and the exported initialisation."""
        for weights in [*run.folder.rglob("checkpoint_*.pth"), run.folder / "init_nnunet.pth"]:
            weights.unlink(missing_ok=True)


#: the back-ends by ``ExperimentConfig.finetune_with``
_BACKENDS: dict[str, Callable[[ExperimentConfig], FinetuneBackend]] = {
    "lrcseg": LrcsegBackend,
    "nnunet": NnUNetBackend,
}


def finetune_backend(cfg: ExperimentConfig) -> FinetuneBackend:
    """The back-end that fine-tunes and scores every cell of ``cfg``: the one place that reads
    ``cfg.finetune_with``."""
    return _BACKENDS[cfg.finetune_with](cfg)
