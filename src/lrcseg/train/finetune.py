"""Few-label fine-tuning of the U-Net, fair across initialisations.

Fairness rules (docs/METHOD.md, fine-tuning protocol): every initialisation gets the same
step budget, hyper-parameters and labelled cases for a given split seed, and the *last*
checkpoint is the result (no model selection on extra labelled cases).

    labelled cases (K, drawn from split_seed) -> slice cache -> padded slices
    for step: random crop/rotate/scale (no left-right flip with lateral labels) -> U-Net ->
              Dice + cross-entropy -> backward, clip, step; log; checkpoint
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from tqdm import tqdm

from lrcseg.config import (
    FinetuneConfig,
    save_config,
    to_dict,
)
from lrcseg.data.layouts import (
    check_label_values,
    load_dataset,
    model_labels,
)
from lrcseg.data.slice_cache import SliceCache
from lrcseg.data.slices import LabelledSlices
from lrcseg.data.splits import choose_labelled
from lrcseg.errors import ConfigError, TrainingDiverged, warn_data
from lrcseg.io_utils import atomic_torch_save, atomic_write_json
from lrcseg.models.load import load_initialisation
from lrcseg.models.unet import build_unet, flexible_unet_kwargs
from lrcseg.runtime import resolve_device, seed_everything
from lrcseg.train.checkpoint import save_checkpoint
from lrcseg.train.common import (
    GracefulInterrupt,
    ResumableSampler,
    autocast_context,
    check_resume_compatible,
    load_resume_checkpoint,
    make_loader,
    make_optimizer,
    prepare_run_dir,
    set_lr,
    step_generator,
    warmup_cosine,
    warn_long_warmup,
)
from lrcseg.train.prefetch import DevicePrefetcher
from lrcseg.train.runlog import RunLogger, write_run_card


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


def augment_batch(images: torch.Tensor, labels: torch.Tensor, size: int, rotation_deg: float,
                  hflip: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale (0.8-1.25 zoom), rotation, translation and optional flip, then a size x size
    window: images (B, C, S, S) bilinear, labels (B, S, S) nearest -> (B, C, size, size),
    (B, size, size). Parameters are drawn from ``generator`` (a pure function of the step)."""
    b, _, s, _ = images.shape
    zoom = torch.exp(torch.empty(b).uniform_(math.log(0.8), math.log(1.25), generator=generator))
    angle = torch.empty(b).uniform_(-rotation_deg, rotation_deg, generator=generator) * math.pi / 180
    shift = torch.empty(b, 2).uniform_(-0.5, 0.5, generator=generator) * (1 - size / s / zoom).clamp(min=0)[:, None] * 2
    flip = (torch.rand(b, generator=generator) < 0.5) if hflip else torch.zeros(b, dtype=torch.bool)
    extent = size / s / zoom  # output window side as a fraction of the canvas
    cos, sin = torch.cos(angle) * extent, torch.sin(angle) * extent
    sign = torch.where(flip, -1.0, 1.0)
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1).to(images.device)
    grid = F.affine_grid(theta, (b, 1, size, size), align_corners=False)
    out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].long()
    return out_images, out_labels


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True,
             stop_at: int | None = None) -> Path:
    """Run (or resume) fine-tuning as configured; returns the run folder.

    stop_at: leave (with a checkpoint) once this step is reached, as an interruption would.
    """
    dataset = load_dataset(cfg.dataset)
    if not dataset.labels:
        raise ConfigError(f"{cfg.dataset}: fine-tuning needs a labelled dataset with label names "
                          "(nnU-Net dataset.json or datalist)")
    split = choose_labelled(dataset, cfg.labeled, cfg.split_seed)
    weights, init_meta = load_initialisation(cfg.init, cfg.model, cfg.preprocess, cfg.allow_mismatch)
    run_dir = prepare_run_dir(cfg.run.out, resume, create=False)
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)

    labels, label_lut = model_labels(dataset.labels, cfg.label_map)
    num_classes = max(labels.values()) + 1
    by_id = {c.id: c for c in dataset.cases}
    slice_cache = SliceCache(cfg.preprocess, root=cfg.run.cache_dir)
    volumes = [slice_cache.get(by_id[i]) for i in split["labeled"]]
    for case_id, vol in zip(split["labeled"], volumes, strict=True):
        check_label_values(np.asarray(vol.label), dataset.labels, by_id[case_id].label)
    data = LabelledSlices(volumes, cfg.preprocess.context_slices, label_lut=label_lut)
    prepare_run_dir(cfg.run.out, resume)  # created only once the data has been read
    steps = cfg.run.steps or default_steps(len(data), cfg.run.batch_size)
    warn_long_warmup(cfg.optim.warmup_steps, steps)
    if cfg.snapshots and cfg.snapshots[-1] >= steps:
        raise ConfigError(f"snapshots {cfg.snapshots}: each must be < the budget of {steps} steps")
    hflip = cfg.hflip and not has_laterality(list(labels))

    model = build_unet(cfg.model, cfg.preprocess.in_channels, num_classes)
    if weights is not None:
        result = model.load_state_dict(weights, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if not k.startswith("segmentation_head.")]
        if unexpected or missing:
            raise ConfigError(f"{cfg.init}: weights do not fit the {cfg.model.backbone} U-Net "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    optimizer = make_optimizer(model.parameters(), cfg.optim, device)
    forward = torch.compile(model) if cfg.run.compile else model
    model_meta = {"flexible_unet": flexible_unet_kwargs(cfg.model, cfg.preprocess.in_channels,
                                                        num_classes),
                  "model_config": to_dict(cfg.model), "preprocess": to_dict(cfg.preprocess),
                  "labels": labels}

    start, clock = 0, None
    if resume:
        state = load_resume_checkpoint(run_dir)
        for note in check_resume_compatible(state["config"], to_dict(cfg), "finetune"):
            warn_data(run_dir, note)
        save_config(cfg, run_dir / "config.yaml")  # the folder describes the run as it continues
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, clock = state["step"], state.get("clock")
    else:
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "split.json", split)
        write_run_card(run_dir, "finetune", {
            "dataset": str(Path(cfg.dataset).resolve()), "split": split, **init_meta,
            "steps": steps, "slices": len(data), "hflip": hflip, "device": str(device),
            "preprocess": to_dict(cfg.preprocess)})

    def state_dict(step: int) -> dict[str, Any]:
        return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "config": to_dict(cfg), "kind": "finetune",
                "steps": steps, "clock": logger.clock(), **model_meta}

    sampler = ResumableSampler(len(data), cfg.run.seed, start=start * cfg.run.batch_size)
    loader = make_loader(data, cfg.run.batch_size, sampler, cfg.run.workers, device)
    logger = RunLogger(run_dir, start_step=start, clock=clock)
    if start == 0:
        logger.log_hparams(to_dict(cfg), ["loss/seg"])
    autocast = autocast_context(device, cfg.run.amp)
    bar = tqdm(total=steps, initial=start, desc="finetune", disable=not progress, dynamic_ncols=True)
    step, batches = start, DevicePrefetcher(iter(loader), device)  # float16 -> float32
    t_last, n_last = time.perf_counter(), 0
    model.train()
    interrupt = GracefulInterrupt()
    try:
        with interrupt:
            while step < steps:
                if interrupt.requested:
                    save_checkpoint(run_dir, state_dict(step))
                    bar.write(f"interrupted: checkpoint at step {step} saved; continue with --resume")
                    raise KeyboardInterrupt
                batch = next(batches)
                g = step_generator(cfg.run.seed, step)
                images, targets = augment_batch(batch["image"], batch["label"].long(),
                                                cfg.image_size, cfg.rotation_deg, hflip, g)
                if cfg.run.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                lr = cfg.optim.lr * warmup_cosine(step, steps, cfg.optim.warmup_steps)
                set_lr(optimizer, lr)
                with autocast:
                    logits = forward(images)
                loss = loss_fn(logits.float(), targets[:, None])
                if cfg.run.image_every and step % cfg.run.image_every == 0:
                    logger.log_prediction(step, images, targets, logits, channel=(
                        cfg.preprocess.context_slices // 2) * len(cfg.preprocess.windows))
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"non-finite loss at step {step}; the last good checkpoint "
                                           f"in {run_dir} is untouched. Lower --lr.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                step += 1
                n_last += images.shape[0]
                bar.update(1)
                if step % cfg.run.log_every == 0 or step == steps:
                    now = time.perf_counter()
                    logger.log(step, {"loss/seg": loss.item(), "lr": lr,
                                      "slices_per_s": n_last / max(now - t_last, 1e-9)})
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    t_last, n_last = now, 0
                if step in cfg.snapshots:  # weights only: loadable like final.pt
                    snapshot = {k: v for k, v in state_dict(step).items() if k != "optimizer"}
                    atomic_torch_save(run_dir / snapshot_name(step), snapshot)
                if step % cfg.run.checkpoint_every == 0 and step < steps:
                    save_checkpoint(run_dir, state_dict(step))
                if stop_at is not None and step >= stop_at and step < steps:
                    save_checkpoint(run_dir, state_dict(step))
                    return run_dir
        save_checkpoint(run_dir, state_dict(step), final=True)
    finally:
        bar.close()
        logger.close()
    return run_dir
