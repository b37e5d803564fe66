"""Pre-training: a global method (MoCo v2) plus the LRC loss, one readable loop.

    for step in range(start, steps):
        batch -> two augmented views (geometry shared with the region maps)
        online U-Net on both views -> global embeddings + 1/4-resolution local features
        L = L_global(views) + lambda * L_LRC(local features, region maps)
        backward, clip, step, momentum update; log; checkpoint every N steps

Every bit of randomness in a step comes from ``step_generator(seed, step)``, and the sample
order from ``ResumableSampler``, so ``--resume`` replays an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lrcseg.augment import PairedViewAugment
from lrcseg.config import PretrainConfig, save_config, to_dict
from lrcseg.data.cache import SliceCache
from lrcseg.data.layouts import load_dataset
from lrcseg.data.slices import PretrainSlices
from lrcseg.errors import ConfigError, LrcsegError
from lrcseg.losses.lrc import LRCLoss
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.superpixels.cache import RegionCache
from lrcseg.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from lrcseg.train.common import (
    ResumableSampler,
    prepare_run_dir,
    resolve_device,
    seed_everything,
    step_generator,
    warmup_cosine,
)
from lrcseg.train.objectives import build_global_objective
from lrcseg.train.runlog import RunLogger, write_run_card


class TrainingDiverged(LrcsegError):
    """A non-finite loss: training stops, the last good checkpoint stays as it was."""


@dataclass
class PretrainData:
    dataset: PretrainSlices
    sources: list[dict[str, Any]]


def pretraining_cases(paths: list[str]) -> tuple[list, list[dict[str, Any]]]:
    """Cases for the pre-training pool from each data path.

    A dataset with ``splits.json`` contributes its "pretrain" cases only (evaluation cases
    never enter the pool); otherwise all of its training cases (imagesTr / "training" /
    every volume of an unlabelled folder), never its test cases.
    """
    cases, sources = [], []
    for path in paths:
        ds = load_dataset(path)
        chosen = ds.cases
        if ds.splits and "pretrain" in ds.splits:
            wanted = set(ds.splits["pretrain"])
            chosen = [c for c in ds.cases if c.id in wanted]
        cases.extend(chosen)
        sources.append({"path": str(Path(path).resolve()), "layout": ds.layout,
                        "cases": [c.id for c in chosen]})
    if not cases:
        raise ConfigError(f"no pre-training cases found in {paths}")
    return cases, sources


def build_pretrain_data(cfg: PretrainConfig, progress: bool = True) -> PretrainData:
    """Slice and region caches (built once) and the slice dataset over them."""
    cases, sources = pretraining_cases(cfg.data)
    slice_cache = SliceCache(cfg.preprocess, root=cfg.run.cache_dir)
    volumes = [slice_cache.get(c) for c in cases]
    region_cache = RegionCache(slice_cache, cfg.superpixels)
    region_cache.build(cases, workers=cfg.run.workers, progress=progress)
    regions = [region_cache.get(c) for c in cases]
    dataset = PretrainSlices(volumes, regions, cfg.preprocess.context_slices,
                             with_organs=any(v.label is not None for v in volumes))
    if len(dataset) < 2:
        raise ConfigError(f"only {len(dataset)} body slices in {cfg.data}: too few to pre-train")
    return PretrainData(dataset, sources)


def pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool = True,
             stop_at: int | None = None) -> Path:
    """Run (or resume) pre-training as configured; returns the run folder.

    stop_at: leave (with a checkpoint) once this step is reached, as an interruption would;
    ``resume=True`` later continues exactly where it stopped.
    """
    run_dir = prepare_run_dir(cfg.run.out, resume)
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    data = build_pretrain_data(cfg, progress=progress)

    net = PretrainNetwork(cfg.model, cfg.preprocess.in_channels).to(device)
    if cfg.run.channels_last:
        net = net.to(memory_format=torch.channels_last)
    global_objective = build_global_objective(cfg, net, num_slices=len(data.dataset)).to(device)
    lrc = LRCLoss(temperature=cfg.lrc.temperature, num_regions=cfg.lrc.num_regions,
                  pixels_per_region=cfg.lrc.pixels_per_region, min_pixels=cfg.lrc.min_pixels,
                  variant=cfg.lrc.variant, negatives=cfg.lrc.negatives)
    augment = PairedViewAugment(cfg.augment)
    params = [p for p in list(net.parameters()) + list(global_objective.parameters())
              if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    forward = torch.compile(net) if cfg.run.compile else net

    start = 0
    if resume:
        ckpt_path = find_checkpoint(run_dir, prefer_final=False)
        if ckpt_path is None:
            raise ConfigError(f"{run_dir}: --resume given but no checkpoint.pt in it")
        state = load_checkpoint(ckpt_path, map_location=device)
        net.load_state_dict(state["network"])
        global_objective.load_state_dict(state["global_objective"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    else:
        save_config(cfg, run_dir / "config.yaml")
        write_run_card(run_dir, "pretrain", {
            "data_sources": data.sources,
            "slices": len(data.dataset),
            "canvas": data.dataset.canvas,
            "preprocess": to_dict(cfg.preprocess),
            "superpixels": to_dict(cfg.superpixels),
            "device": str(device),
        })

    def state_dict(step: int) -> dict[str, Any]:
        return {"step": step, "network": net.state_dict(),
                "global_objective": global_objective.state_dict(),
                "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "config": to_dict(cfg), "kind": "pretrain"}

    sampler = ResumableSampler(len(data.dataset), cfg.run.seed, start=start * cfg.run.batch_size)
    loader = DataLoader(data.dataset, batch_size=cfg.run.batch_size, sampler=sampler,
                        num_workers=cfg.run.workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.run.workers > 0, drop_last=True)
    logger = RunLogger(run_dir, start_step=start)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if cfg.run.amp and device.type == "cuda" else contextlib.nullcontext())
    bar = tqdm(total=cfg.run.steps, initial=start, desc="pretrain", disable=not progress,
               dynamic_ncols=True)
    step = start
    batches = iter(loader)
    t_last, n_last = time.perf_counter(), 0
    try:
        while step < cfg.run.steps:
            batch = next(batches)
            g = step_generator(cfg.run.seed, step)
            images = batch["image"].to(device, non_blocking=True)
            regions = batch["regions"].to(device, non_blocking=True)
            view1, regions1, view2, regions2 = augment(images, regions, g)
            if cfg.run.channels_last:
                view1 = view1.contiguous(memory_format=torch.channels_last)
                view2 = view2.contiguous(memory_format=torch.channels_last)
            lr = cfg.optim.lr * warmup_cosine(step, cfg.run.steps, cfg.optim.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            with autocast:
                out1, out2 = forward(view1), forward(view2)
                loss_global, global_stats = global_objective(out1, out2, view1, view2, g)
                if cfg.lrc.enabled:
                    organs = batch["organs"].to(device)
                    organs1 = organs2 = None
                    if (organs >= 0).any():
                        organs1, organs2 = _organs_in_views(augment, organs, g, cfg.run.seed, step)
                    loss_lrc, lrc_stats = lrc(out1["local"].float(), out2["local"].float(),
                                              regions1, regions2, generator=g,
                                              organs1=organs1, organs2=organs2)
                else:
                    loss_lrc, lrc_stats = torch.zeros((), device=device), {}
                loss = loss_global + cfg.lrc.weight * loss_lrc

            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"non-finite loss at step {step} (global {loss_global.item():.4g}, "
                    f"lrc {loss_lrc.item():.4g}); the last good checkpoint in {run_dir} is "
                    "untouched. Lower --lr or check the data.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
            optimizer.step()
            global_objective.after_step(step, cfg.run.steps)
            step += 1
            n_last += images.shape[0]
            bar.update(1)

            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                now = time.perf_counter()
                scalars = {"loss/total": loss.item(), "loss/global": loss_global.item(),
                           "loss/lrc": loss_lrc.item(), "lr": lr, "grad_norm": grad_norm.item(),
                           "slices_per_s": n_last / max(now - t_last, 1e-9)}
                scalars.update({f"global/{k}": float(v) for k, v in global_stats.items()})
                scalars.update({f"lrc/{k}": float(v) for k, v in lrc_stats.items()})
                logger.log(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss/total']:.3f}",
                                lrc=f"{scalars['loss/lrc']:.3f}")
                t_last, n_last = now, 0
            if step % cfg.run.checkpoint_every == 0 and step < cfg.run.steps:
                save_checkpoint(run_dir, state_dict(step))
            if stop_at is not None and step >= stop_at and step < cfg.run.steps:
                save_checkpoint(run_dir, state_dict(step))
                return run_dir
        save_checkpoint(run_dir, state_dict(step), final=True)
    except KeyboardInterrupt:
        save_checkpoint(run_dir, state_dict(step))
        bar.write(f"interrupted: checkpoint at step {step} saved; continue with --resume")
        raise
    finally:
        bar.close()
        logger.close()
    return run_dir


def _organs_in_views(augment: PairedViewAugment, organs: torch.Tensor, g: torch.Generator,
                     seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Organ labels carried through the same geometry as the views (for logging only).

    Pixels outside the canvas come back as 0; they lie in region 0, which is never sampled.

    Replays the augmentation from a fresh generator with the same seed, so the organ maps get
    exactly the geometric transforms of the views; ``g`` itself is not advanced.
    """
    replay = step_generator(seed, step)
    dummy = torch.zeros(organs.shape[0], 1, *organs.shape[1:], device=organs.device)
    _, organs1, _, organs2 = augment(dummy, organs.clamp(min=0), replay)
    return organs1, organs2
