"""Few-label fine-tuning of the U-Net, fair across initialisations.

Fairness rules (docs/METHOD.md, fine-tuning protocol): every initialisation gets the same
step budget, hyper-parameters and labelled cases for a given split seed, and the *last*
checkpoint is the result (no model selection on extra labelled cases).

    labelled cases (K, drawn from split_seed) -> slice cache -> padded slices
    for step: random crop/rotate/scale (no left-right flip with lateral labels) -> intensity
              (noise, blur, brightness, contrast, low resolution, gamma; image only) -> U-Net
              -> Dice + cross-entropy -> backward, clip, step; log; checkpoint

The strategy (``FinetuneStrategyConfig``) sets which parts of the U-Net train at each step
and at what rate: the optimiser has one parameter group per part (``PARTS``), and the phase
and the rates are pure functions of the step (:func:`frozen_parts`, :func:`group_lrs`), so
``--resume`` continues a run at any step, in either phase, exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import Tensor

from lrcseg.augment import IntensityAugment, OrganContrastAugment, augment_labelled
from lrcseg.config import (
    FinetuneConfig,
    FinetuneStrategyConfig,
    IntensityAugmentConfig,
    OptimConfig,
    OrganContrastConfig,
    save_config,
    to_dict,
)
from lrcseg.data.labels import labelled_volumes, model_labels
from lrcseg.data.layouts import load_dataset
from lrcseg.data.slice_cache import SliceCache
from lrcseg.data.slices import LabelledSlices
from lrcseg.data.splits import choose_labelled
from lrcseg.errors import ConfigError, warn_data
from lrcseg.io_utils import atomic_torch_save, atomic_write_json
from lrcseg.models.load import load_initialisation
from lrcseg.models.unet import build_unet, flexible_unet_kwargs
from lrcseg.runtime import resolve_device, seed_everything
from lrcseg.train.checkpoint import save_checkpoint
from lrcseg.train.common import (
    ResumableSampler,
    autocast_context,
    make_loader,
    make_optimizer,
    set_lr,
    step_generator,
    warmup_cosine,
    warn_long_warmup,
)
from lrcseg.train.loop import TrainingLoop
from lrcseg.train.prefetch import DevicePrefetcher
from lrcseg.train.resume import check_resume_compatible, load_resume_checkpoint, prepare_run_dir
from lrcseg.train.runlog import RunLogger, write_run_card

# The U-Net's parts in the order of its parameters (FlexibleUNet registers them so): the
# optimiser's parameter groups, in this order.
PARTS = ("encoder", "decoder", "segmentation_head")


def frozen_parts(step: int, strategy: FinetuneStrategyConfig) -> tuple[str, ...]:
    """The parts of ``PARTS`` that do not train at ``step``: the pre-trained encoder and decoder
    during the head-first phase, the encoder all along with ``freeze_encoder``."""
    if step < strategy.head_first_steps:
        return PARTS[:2]
    return PARTS[:1] if strategy.freeze_encoder else ()


def group_lrs(step: int, steps: int, optim: OptimConfig,
              strategy: FinetuneStrategyConfig) -> tuple[float, float, float]:
    """Learning rates of the encoder, decoder and segmentation head at ``step`` of a
    ``steps``-step budget (0 for a frozen part).

    Each phase runs the usual schedule over its own steps (``warmup_cosine``): the head-first
    phase, steps [0, H), trains the head alone, warming up over ``optim.warmup_steps`` and
    decaying towards 0 at the switch (the linear probe of LP-FT, run to convergence); at step H
    the schedule starts again for every part that trains, warming up from the switch (the
    pre-trained layers, whose Adam moments start there, ramp up instead of starting at full
    rate) and decaying to 0 at the budget. The pre-trained parts run at their scale of the
    head's rate. With H = 0 and scales of 1 every part gets ``optim.lr * warmup_cosine(step,
    steps, optim.warmup_steps)``, the one rate fine-tuning always used.
    """
    head_first = strategy.head_first_steps
    if step < head_first:
        return 0.0, 0.0, optim.lr * warmup_cosine(step, head_first, optim.warmup_steps)
    head = optim.lr * warmup_cosine(step - head_first, steps - head_first, optim.warmup_steps)
    encoder = 0.0 if strategy.freeze_encoder else head * strategy.encoder_lr_scale
    return encoder, head * strategy.decoder_lr_scale, head


def default_steps(num_slices: int, batch_size: int) -> int:
    """The default budget: 60 passes over the labelled slices, clamped to [600, 6000] steps.

    It depends only on the labelled data, never on the initialisation. (30 passes and at
    least 200 steps, the earlier rule, left every organ but the liver unlearned on real CT.)
    """
    return int(min(6000, max(600, math.ceil(60 * num_slices / batch_size))))


def snapshot_name(step: int) -> str:
    """File name of the learning-curve snapshot saved at ``step``."""
    return f"snapshot_{step}.pt"


def has_laterality(label_names: list[str]) -> bool:
    """True if a label name has a left/right token ("kidney_left", "Lung R", "adrenal-l"):
    then left-right flips would swap classes."""
    sides = {"left", "right", "l", "r", "lt", "rt"}
    return any(sides & set(re.split(r"[^a-z]+", name.lower())) for name in label_names)


class Finetuning:
    """One fine-tuning run, built from its config in a fixed order (labelled cases, weights,
    run folder, seeds, slices, network, optimiser: the random draws depend on it) and then
    stepped by ``TrainingLoop``: ``step`` (freeze or thaw parts per the strategy, augment,
    forward, Dice + CE, backward, clip, step), ``log``, ``snapshot``, ``save``.
    """

    def __init__(self, cfg: FinetuneConfig, resume: bool):
        self.cfg = cfg
        dataset = load_dataset(cfg.dataset)
        if not dataset.labels:
            raise ConfigError(f"{cfg.dataset}: fine-tuning needs a labelled dataset with label "
                              "names (nnU-Net dataset.json or datalist)")
        self.split = choose_labelled(dataset, cfg.labeled, cfg.split_seed)
        weights, self.init_meta = load_initialisation(cfg.init, cfg.model, cfg.preprocess,
                                                      cfg.allow_mismatch)
        self.run_dir = prepare_run_dir(cfg.run.out, resume, create=False)
        self.device = resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        labels, self.data = self._labelled_slices(dataset)
        prepare_run_dir(cfg.run.out, resume)  # created only once the data has been read
        self.steps = cfg.run.steps or default_steps(len(self.data), cfg.run.batch_size)
        self._check_budget()
        self.hflip = cfg.hflip and not has_laterality(list(labels))
        self.intensity = self._intensity_augment()
        num_classes = max(labels.values()) + 1
        self.organ_contrast = self._organ_contrast(num_classes)
        self.model = self._model(weights, num_classes)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self.optimizer = make_optimizer(
            [{"params": list(getattr(self.model, part).parameters())} for part in PARTS],
            cfg.optim, self.device)
        self.forward = torch.compile(self.model) if cfg.run.compile else self.model
        self.model_meta = {
            "flexible_unet": flexible_unet_kwargs(cfg.model, cfg.preprocess.in_channels,
                                                  num_classes),
            "model_config": to_dict(cfg.model), "preprocess": to_dict(cfg.preprocess),
            "labels": labels}
        self.channel = (cfg.preprocess.context_slices // 2) * len(cfg.preprocess.windows)
        self.logger: RunLogger | None = None
        self._frozen: tuple[str, ...] | None = None  # the parts frozen now (None: not yet set)
        self._last: tuple[Tensor, tuple[float, float, float]] | None = None

    def _check_budget(self) -> None:
        """The budget against the snapshots and the head-first phase (ConfigError); a warning
        for a warm-up that does not fit the run, or with a head-first phase either phase."""
        cfg, steps = self.cfg, self.steps
        if cfg.snapshots and cfg.snapshots[-1] >= steps:
            raise ConfigError(f"snapshots {cfg.snapshots}: each must be < the budget of "
                              f"{steps} steps")
        head_first, warmup = cfg.strategy.head_first_steps, cfg.optim.warmup_steps
        if head_first >= steps:
            raise ConfigError(f"strategy.head_first_steps {head_first}: must be < the budget of "
                              f"{steps} steps (the rest fine-tunes the network)")
        if not head_first:
            warn_long_warmup(warmup, steps)
            return
        for phase, length in (("head-first phase", head_first),
                              ("fine-tuning after it", steps - head_first)):
            if warmup >= length:
                warn_data(None, f"warm-up of {warmup} steps >= the {length} steps of the {phase}: "
                                "its learning rate never reaches its peak (--lr) nor decays; "
                                "lower optim.warmup_steps or change strategy.head_first_steps")

    def _labelled_slices(self, dataset) -> tuple[dict[str, int], LabelledSlices]:
        """The model's labels and the padded slices of the K labelled cases (label values
        checked against the dataset's names)."""
        cfg = self.cfg
        labels, label_lut = model_labels(dataset.labels, cfg.label_map)
        by_id = {c.id: c for c in dataset.cases}
        volumes = labelled_volumes(SliceCache(cfg.preprocess, root=cfg.run.cache_dir),
                                   [by_id[i] for i in self.split["labeled"]], dataset.labels)
        return labels, LabelledSlices(volumes, cfg.preprocess.context_slices, label_lut=label_lut)

    def _model(self, weights: dict[str, Tensor] | None, num_classes: int) -> torch.nn.Module:
        cfg = self.cfg
        model = build_unet(cfg.model, cfg.preprocess.in_channels, num_classes)
        if weights is not None:
            result = model.load_state_dict(weights, strict=False)
            unexpected = list(result.unexpected_keys)
            missing = [k for k in result.missing_keys if not k.startswith("segmentation_head.")]
            if unexpected or missing:
                raise ConfigError(f"{cfg.init}: weights do not fit the {cfg.model.backbone} "
                                  f"U-Net (missing {missing[:5]}, unexpected {unexpected[:5]})")
        model = model.to(self.device)
        if cfg.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _intensity_augment(self) -> IntensityAugment | None:
        cfg = self.cfg
        if not cfg.intensity.enabled:
            return None
        return IntensityAugment(cfg.intensity, cfg.preprocess.windows, cfg.preprocess.context_slices)

    def _organ_contrast(self, num_classes: int) -> OrganContrastAugment | None:
        cfg = self.cfg
        if not cfg.organ_contrast.enabled:
            return None
        return OrganContrastAugment(cfg.organ_contrast, cfg.preprocess.windows, num_classes,
                                    cfg.preprocess.context_slices)

    def restore(self) -> tuple[int, dict | None]:
        """Load the checkpoint to resume from; returns (step, the logger's clock).

        A run begun before fine-tuning had intensity augmentation (no ``intensity`` in its
        checkpoint's config) continues without it, as it began; one begun before it had a
        strategy continues with the default strategy, its optimiser state split into groups.
        """
        state = load_resume_checkpoint(self.run_dir)
        if "intensity" not in state["config"]:
            self.cfg = dataclasses.replace(self.cfg, intensity=IntensityAugmentConfig(enabled=False))
            self.intensity = None
            warn_data(self.run_dir, "this run began before fine-tuning had intensity "
                      "augmentation: it continues without it (config.yaml now records "
                      "intensity.enabled: false)")
        if "organ_contrast" not in state["config"] and self.cfg.organ_contrast.enabled:
            self.cfg = dataclasses.replace(self.cfg, organ_contrast=OrganContrastConfig(enabled=False))
            self.organ_contrast = None
            warn_data(self.run_dir, "this run began before fine-tuning had the organ contrast "
                      "augmentation: it continues without it (config.yaml now records "
                      "organ_contrast.enabled: false)")
        for note in check_resume_compatible(state["config"], to_dict(self.cfg), "finetune"):
            warn_data(self.run_dir, note)
        save_config(self.cfg, self.run_dir / "config.yaml")  # the run as it now continues
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(self._grouped(state["optimizer"]))
        torch.set_rng_state(state["torch_rng"])
        return state["step"], state.get("clock")

    def _grouped(self, saved: dict[str, Any]) -> dict[str, Any]:
        """An optimiser state in this run's parameter groups. A run begun before fine-tuning
        had a strategy saved one group of every parameter, in the order the groups (``PARTS``)
        list them, so it splits into them unchanged."""
        if len(saved["param_groups"]) == len(self.optimizer.param_groups):
            return saved
        (group,) = saved["param_groups"]
        ids = iter(group["params"])
        groups = [{**group, "params": [next(ids) for _ in part["params"]]}
                  for part in self.optimizer.param_groups]
        return {**saved, "param_groups": groups}

    def describe(self) -> None:
        """A new run's folder: its config, labelled split and run card."""
        cfg = self.cfg
        save_config(cfg, self.run_dir / "config.yaml")
        atomic_write_json(self.run_dir / "split.json", self.split)
        write_run_card(self.run_dir, "finetune", {
            "dataset": str(Path(cfg.dataset).resolve()), "split": self.split, **self.init_meta,
            "steps": self.steps, "slices": len(self.data), "hflip": self.hflip,
            "device": str(self.device), "preprocess": to_dict(cfg.preprocess)})

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"step": step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "config": to_dict(self.cfg), "kind": "finetune", "steps": self.steps,
                "clock": self.logger.clock(), **self.model_meta}

    def start(self, start: int, clock: dict | None) -> None:
        """The sample stream from step ``start`` and the run's logger."""
        cfg = self.cfg
        sampler = ResumableSampler(len(self.data), cfg.run.seed, start=start * cfg.run.batch_size)
        loader = make_loader(self.data, cfg.run.batch_size, sampler, cfg.run.workers, self.device)
        self.logger = RunLogger(self.run_dir, start_step=start, clock=clock)
        if start == 0:
            self.logger.log_hparams(to_dict(cfg), ["loss/seg"])
        self.autocast = autocast_context(self.device, cfg.run.amp)
        self.batches = DevicePrefetcher(iter(loader), self.device)  # float16 -> float32
        self.model.train()
        self._frozen = None  # every part trains; step() freezes what the strategy says

    def _freeze(self, step: int) -> None:
        """Freeze the parts the strategy leaves fixed at ``step`` and thaw the others: a frozen
        part gets no gradient (AdamW skips it: no update, no weight decay, no moments) and its
        BatchNorm runs in eval mode, so its running statistics do not move either."""
        frozen = frozen_parts(step, self.cfg.strategy)
        if frozen == self._frozen:
            return
        for part in PARTS:
            module = getattr(self.model, part)
            module.train(part not in frozen)
            module.requires_grad_(part not in frozen)
        self._frozen = frozen

    def step(self, step: int) -> tuple[Tensor, int]:
        """One optimiser step; returns the loss and the number of slices."""
        cfg = self.cfg
        batch = next(self.batches)
        generator = step_generator(cfg.run.seed, step)
        images, targets = augment_labelled(batch["image"], batch["label"].long(), cfg.image_size,
                                           cfg.rotation_deg, self.hflip, generator)
        if self.organ_contrast is not None:  # draws after the geometry, from the same generator
            images = self.organ_contrast(images, targets, generator)
        if self.intensity is not None:
            images = self.intensity(images, generator)
        if cfg.run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self._freeze(step)
        lrs = group_lrs(step, self.steps, cfg.optim, cfg.strategy)
        set_lr(self.optimizer, lrs)
        with self.autocast:
            logits = self.forward(images)
        loss = self.loss_fn(logits.float(), targets[:, None])
        if cfg.run.image_every and step % cfg.run.image_every == 0:
            self.logger.log_prediction(step, images, targets, logits, channel=self.channel)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self._last = (loss, lrs)
        return loss, images.shape[0]

    def log(self, step: int, slices_per_s: float) -> float:
        """Log the loss and the head's learning rate, and with a strategy the pre-trained
        parts' rates ("lr/encoder", "lr/decoder")."""
        loss, (encoder_lr, decoder_lr, head_lr) = self._last
        value = loss.item()
        rates = {"lr": head_lr}
        if self.cfg.strategy.changes():
            rates.update({"lr/encoder": encoder_lr, "lr/decoder": decoder_lr})
        self.logger.log(step, {"loss/seg": value, **rates, "slices_per_s": slices_per_s})
        return value

    def save(self, step: int, final: bool) -> None:
        save_checkpoint(self.run_dir, self.state_dict(step), final=final)

    def snapshot(self, step: int) -> None:
        """Weights only, loadable like final.pt, if ``step`` is a learning-curve step (the loop
        has checked every loss up to it for NaN/inf)."""
        if step not in self.cfg.snapshots:
            return
        snapshot = {k: v for k, v in self.state_dict(step).items() if k != "optimizer"}
        atomic_torch_save(self.run_dir / snapshot_name(step), snapshot)


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True,
             stop_at: int | None = None) -> Path:
    """Run (or resume) fine-tuning as configured; returns the run folder.

    stop_at: leave (with a checkpoint) once this step is reached, as an interruption would.
    """
    run = Finetuning(cfg, resume)
    start, clock = run.restore() if resume else (0, None)
    if not resume:
        run.describe()
    run.start(start, clock)
    loop = TrainingLoop(run.run_dir, run.steps, start, run.save, log_every=cfg.run.log_every,
                        checkpoint_every=cfg.run.checkpoint_every, device=run.device,
                        stop_at=stop_at, desc="finetune", progress=progress,
                        check_each_step=True)  # a diverged fine-tune stops at its first NaN
    try:
        loop.run(run.step, run.log, run.snapshot)
    finally:
        run.logger.close()
    return run.run_dir
