"""Pre-training: a global method (MoCo v2, SimCLR, BYOL, none, supervised) plus LRC, one loop.

    for step in range(start, steps):
        batch -> two augmented views (geometry shared with the region and label maps)
        online U-Net on both views -> global embeddings + local features (1/2 resolution)
        L = L_global(views) + lambda * L_LRC(local features, region maps)
        backward, clip, step, momentum update; log; checkpoint every N steps

Every bit of randomness in a step comes from ``step_generator(seed, step, rank)`` (and, for
what all ranks must agree on, ``step_generator(seed, step, SHARED_STREAM)``), and the sample
order from ``ResumableSampler``, so ``--resume`` replays an uninterrupted run exactly.

Under ``torchrun`` (WORLD_SIZE > 1) the differentiable part of the step (``PretrainStep``) is
wrapped in DistributedDataParallel; rank 0 alone writes the run folder, logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from lrcseg.augment import PairedViewAugment
from lrcseg.config import DistributedConfig, PretrainConfig, save_config, to_dict
from lrcseg.data.slice_cache import SliceCache
from lrcseg.data.slices import PretrainSlices
from lrcseg.data.splits import pretraining_cases, supervised_cases
from lrcseg.errors import ConfigError, DataError, TrainingDiverged, warn_data
from lrcseg.losses.lrc import LRCLoss
from lrcseg.methods.base import Views, build_method
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.runtime import resolve_device, seed_everything
from lrcseg.superpixels.region_cache import RegionCache
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
from lrcseg.train.distributed import (
    DistContext,
    all_ranks_true,
    all_reduce_mean,
    barrier,
    concat_all_gather,
    gather_with_grad,
    init_distributed,
    teardown,
)
from lrcseg.train.prefetch import DevicePrefetcher
from lrcseg.train.runlog import RunLogger, write_run_card

#: generator stream shared by all ranks (ranks use streams 0..W-1 for per-sample randomness)
SHARED_STREAM = 2**31 - 1


@dataclass
class PretrainData:
    dataset: PretrainSlices
    sources: list[dict[str, Any]]
    num_classes: int | None = None  # label ids of the --labels dataset (supervised)
    mixed_pool: bool = False  # supervised + LRC with unlabelled slices from --data too


def build_pretrain_data(cfg: PretrainConfig, progress: bool = True) -> PretrainData:
    """Slice and region caches (built once) and the slice dataset over them.

    Method "supervised" trains on the labelled cases of ``cfg.labels`` (every label id must be
    one the dataset names) and, with ``cfg.data`` too, on the pre-training pool of those
    datasets as well: L_seg on the labelled slices only, L_LRC on all. The other methods use
    the pool of ``cfg.data``.
    """
    num_classes = None
    if cfg.method == "supervised":
        if not cfg.labels:
            raise ConfigError("method 'supervised' needs a labelled dataset: pass --labels DATASET")
        cases, sources, num_classes = supervised_cases(cfg.labels)
        labelled_ids = [c.id for c in cases]
        labelled_dir = str(Path(cfg.labels).resolve())
        extra = [p for p in cfg.data if str(Path(p).resolve()) != labelled_dir]
        if extra:
            if not cfg.lrc.enabled:
                raise ConfigError("--data beside --labels adds unlabelled slices, which only the "
                                  "LRC loss uses: enable --lrc or drop --data")
            more, more_sources = pretraining_cases(extra)
            seen = {str(Path(c.image).resolve()) for c in cases}
            cases += [c for c in more if str(Path(c.image).resolve()) not in seen]
            sources += more_sources
    else:
        if cfg.labels:
            raise ConfigError(f"--labels is only used by --method supervised (method is {cfg.method})")
        cases, sources = pretraining_cases(cfg.data)
    slice_cache = SliceCache(cfg.preprocess, root=cfg.run.cache_dir)
    volumes = [slice_cache.get(c) for c in cases]
    if num_classes is not None:
        for case, vol in zip(cases[:len(labelled_ids)], volumes[:len(labelled_ids)], strict=True):
            largest = int(np.max(vol.label))
            if largest >= num_classes:
                raise DataError(case.label, f"label id {largest} is not among the dataset's "
                                f"labels (ids 0..{num_classes - 1})")
    region_cache = RegionCache(slice_cache, cfg.superpixels)
    region_cache.build(cases, workers=cfg.run.workers, progress=progress)
    regions = [region_cache.get(c) for c in cases]
    if num_classes is not None:  # unlabelled pool slices must not count as all background
        volumes = [v if i < len(labelled_ids) else dataclasses.replace(v, label=None)
                   for i, v in enumerate(volumes)]
    dataset = PretrainSlices(volumes, regions, cfg.preprocess.context_slices,
                             with_organs=any(v.label is not None for v in volumes))
    if len(dataset) < 2:
        raise ConfigError(f"only {len(dataset)} body slices in {cfg.data or cfg.labels}: too few "
                          "to pre-train")
    return PretrainData(dataset, sources, num_classes,
                        mixed_pool=num_classes is not None and len(cases) > len(labelled_ids))


class PretrainStep(nn.Module):
    """The differentiable part of a step, the module DDP wraps.

    forward(view1, view2, regions1, regions2, views, organs1=None, organs2=None) with views
    (B, C, S, S), region maps (B, S, S) long, ``Views`` for the global objective and optional
    organ/label maps (B, S, S) long, returns (loss, loss_global, loss_lrc, stats):
    loss = loss_global + lrc_weight * loss_lrc, all scalars, where loss_lrc is the mean of the
    LRC losses at the network's local levels; stats of the two terms, keyed "global/..." and
    "lrc/..." ("lrc/level<l>/..." with several local levels).

    gather_lrc: LRC with batch negatives across ranks: every rank gathers the local features
    (with gradient), region and organ maps of the whole global batch and computes the same
    loss with the shared generator, i.e. one process's loss over the concatenated batch.
    """

    def __init__(self, net: PretrainNetwork, objective: nn.Module, lrc: LRCLoss | None,
                 lrc_weight: float, gather_lrc: bool = False, compile_net: bool = False,
                 num_region_ids: int | None = None, intensity_channel: int = 0):
        super().__init__()
        self.net, self.objective, self.lrc = net, objective, lrc
        # the input channel holding the slice the regions belong to, in its first window
        # (2.5D context stacks slices z - k//2 .. z + k//2, each with all windows)
        self.intensity_channel = intensity_channel
        self.lrc_weight = lrc_weight
        self.gather_lrc = gather_lrc
        self.num_region_ids = num_region_ids
        self._forward = [torch.compile(net) if compile_net else net]  # not a second submodule

    def forward(self, view1: Tensor, view2: Tensor, regions1: Tensor, regions2: Tensor,
                views: Views, organs1: Tensor | None = None, organs2: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        full = self.objective.full_decoder
        out1, out2 = (self._forward[0](v, full_decoder=full) for v in (view1, view2))
        loss_global, global_stats = self.objective(out1, out2, views)
        stats = {f"global/{k}": v for k, v in global_stats.items()}
        if self.lrc is None:
            return loss_global, loss_global, torch.zeros_like(loss_global), stats
        generator = views.generator
        image1 = views.view1[:, self.intensity_channel] if self.lrc.sampling == "intensity" else None
        if self.gather_lrc:
            regions1, regions2 = concat_all_gather(regions1), concat_all_gather(regions2)
            if image1 is not None:
                image1 = concat_all_gather(image1.contiguous())
            if organs1 is not None:
                organs1, organs2 = concat_all_gather(organs1), concat_all_gather(organs2)
            generator = views.shared_generator
        levels = self.net.cfg.local_levels
        level_losses = []
        for level, feat1, feat2 in zip(levels, out1["local"], out2["local"], strict=True):
            feat1, feat2 = feat1.float(), feat2.float()
            if self.gather_lrc:
                feat1, feat2 = gather_with_grad(feat1), gather_with_grad(feat2)
            level_loss, lrc_stats = self.lrc(feat1, feat2, regions1, regions2, generator=generator,
                                             organs1=organs1, organs2=organs2,
                                             num_ids=self.num_region_ids, image1=image1)
            level_losses.append(level_loss)
            prefix = "lrc/" if len(levels) == 1 else f"lrc/level{level}/"
            stats.update({f"{prefix}{k}": v for k, v in lrc_stats.items()})
        loss_lrc = torch.stack(level_losses).mean()
        return loss_global + self.lrc_weight * loss_lrc, loss_global, loss_lrc, stats


def pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool = True,
             stop_at: int | None = None) -> Path:
    """Run (or resume) pre-training as configured; returns the run folder.

    stop_at: leave (with a checkpoint) once this step is reached, as an interruption would;
    ``resume=True`` later continues exactly where it stopped. Started by torchrun
    (WORLD_SIZE > 1) it runs data-parallel with ``cfg.distributed``'s options.
    """
    ctx = init_distributed(resolve_device(cfg.run.device))
    try:
        return _pretrain(cfg, resume, progress, stop_at, cfg.distributed, ctx)
    finally:
        teardown(ctx)


def _pretrain(cfg: PretrainConfig, resume: bool, progress: bool, stop_at: int | None,
              dcfg: DistributedConfig, ctx: DistContext) -> Path:
    device = ctx.device
    if dcfg.sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation); "
                          "drop it for CPU runs")
    run_dir = prepare_run_dir(cfg.run.out, resume, create=False)
    seed_everything(cfg.run.seed)
    progress = progress and ctx.is_main
    if ctx.is_main:
        warn_long_warmup(cfg.optim.warmup_steps, cfg.run.steps)
    probe = None  # the online probe runs on rank 0 (built with the data, before any step)
    if ctx.is_main:  # rank 0 builds the caches, the others then read them
        data = build_pretrain_data(cfg, progress=progress)
        if cfg.probe.dataset:
            from lrcseg.evaluate.probe import OnlineProbe

            probe = OnlineProbe(cfg.probe.dataset, cfg.preprocess, labeled=cfg.probe.labeled,
                                split_seed=cfg.probe.split_seed, max_cases=cfg.probe.max_cases,
                                pixels=cfg.probe.pixels, cache_dir=cfg.run.cache_dir)
        prepare_run_dir(cfg.run.out, resume)  # created only once the data has been read
    barrier()
    if not ctx.is_main:
        data = build_pretrain_data(cfg, progress=False)

    gather = dcfg.gather_negatives and ctx.enabled
    net = PretrainNetwork(cfg.model, cfg.preprocess.in_channels).to(device)
    if cfg.run.channels_last:
        net = net.to(memory_format=torch.channels_last)
    global_objective = build_method(
        cfg, net, num_slices=len(data.dataset), world_size=ctx.world_size,
        gather_negatives=dcfg.gather_negatives, num_classes=data.num_classes).to(device)
    if dcfg.sync_bn and ctx.enabled:  # after the momentum/target copies: those keep plain BN
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    lrc = None
    if cfg.lrc.enabled:
        lrc = LRCLoss(temperature=cfg.lrc.temperature, num_regions=cfg.lrc.num_regions,
                      pixels_per_region=cfg.lrc.pixels_per_region, min_pixels=cfg.lrc.min_pixels,
                      variant=cfg.lrc.variant, negatives=cfg.lrc.negatives,
                      sampling=cfg.lrc.sampling, intensity_bins=cfg.lrc.intensity_bins)
    step_module = PretrainStep(net, global_objective, lrc, cfg.lrc.weight,
                               gather_lrc=gather and cfg.lrc.negatives == "batch",
                               compile_net=cfg.run.compile,
                               num_region_ids=data.dataset.max_region_id + 1,
                               intensity_channel=(cfg.preprocess.context_slices // 2)
                               * len(cfg.preprocess.windows))
    train_step = step_module
    if ctx.enabled:
        train_step = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=True)
    augment = PairedViewAugment(cfg.augment)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optim, device)

    start, clock = 0, None
    if resume:
        state = load_resume_checkpoint(run_dir)
        for note in check_resume_compatible(state["config"], to_dict(cfg), "pretrain"):
            warn_data(run_dir, note)
        if ctx.is_main:  # the folder describes the run as it now continues
            save_config(cfg, run_dir / "config.yaml")
        if state.get("world_size", 1) != ctx.world_size:
            raise ConfigError(f"{run_dir}: the run was started with {state.get('world_size', 1)} "
                              f"process(es), this resume has {ctx.world_size}; the sample order, "
                              "per-rank randomness and queue size depend on it. Resume with the "
                              "same number of processes.")
        net.load_state_dict(state["network"])
        global_objective.load_state_dict(state["global_objective"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, clock = state["step"], state.get("clock")
    elif ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
        write_run_card(run_dir, "pretrain", {
            "data_sources": data.sources,
            "slices": len(data.dataset),
            "canvas": data.dataset.canvas,
            "preprocess": to_dict(cfg.preprocess),
            "superpixels": to_dict(cfg.superpixels),
            "device": str(device),
            "world_size": ctx.world_size,
            "distributed": to_dict(dcfg),
        })

    def state_dict(step: int) -> dict[str, Any]:
        return {"step": step, "network": net.state_dict(),
                "global_objective": global_objective.state_dict(),
                "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "config": to_dict(cfg), "kind": "pretrain", "world_size": ctx.world_size,
                "clock": None if logger is None else logger.clock()}

    def checkpoint(step: int, final: bool = False) -> None:
        if ctx.is_main:
            save_checkpoint(run_dir, state_dict(step), final=final)
        barrier()

    batch_size = cfg.run.batch_size
    sampler = ResumableSampler(len(data.dataset), cfg.run.seed, start=start * batch_size,
                               rank=ctx.rank, num_replicas=ctx.world_size)
    loader = make_loader(data.dataset, batch_size, sampler, cfg.run.workers, device,
                         drop_last=True)
    logger = RunLogger(run_dir, start_step=start, clock=clock) if ctx.is_main else None
    if logger is not None and start == 0:
        logger.log_hparams(to_dict(cfg), _hparam_metrics(cfg, global_objective.logs_global))

    autocast = autocast_context(device, cfg.run.amp)
    bar = tqdm(total=cfg.run.steps, initial=start, desc="pretrain", disable=not progress,
               dynamic_ncols=True)
    with_labels = data.dataset.with_organs and (cfg.lrc.enabled or cfg.method == "supervised")
    step = start
    batches = DevicePrefetcher(iter(loader), device)  # on the device, float16 -> float32
    t_last, n_last = time.perf_counter(), 0
    interrupt = GracefulInterrupt()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    checked = [start]

    def check_finite(step: int) -> None:
        """Raise if any loss since the last check was NaN/inf (one host sync, not per step)."""
        if not all_ranks_true(not bool(nonfinite), device):
            raise TrainingDiverged(
                f"non-finite loss between steps {checked[0]} and {step}; the last good "
                f"checkpoint in {run_dir} is untouched. Lower --lr or check the data.")
        checked[0] = step

    try:
        with interrupt:
            while step < cfg.run.steps:
                if interrupt.requested:
                    check_finite(step)
                    checkpoint(step)
                    bar.write(f"interrupted: checkpoint at step {step} saved; continue with --resume")
                    raise KeyboardInterrupt
                batch = next(batches)
                g = step_generator(cfg.run.seed, step, ctx.rank)
                images = batch["image"]
                regions = batch["regions"].long()
                view1, regions1, view2, regions2 = augment(images, regions, g)
                if logger is not None and cfg.run.image_every and step % cfg.run.image_every == 0:
                    logger.log_view_pairs(step, view1, regions1, view2, regions2,
                                          channel=step_module.intensity_channel)
                labels1 = labels2 = None
                logging_step = (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.run.steps
                if with_labels and (cfg.method == "supervised" or logging_step):
                    labels1, labels2 = _labels_in_views(augment, batch["organs"].long(),
                                                        step_generator(cfg.run.seed, step, ctx.rank))
                if cfg.run.channels_last:
                    view1 = view1.contiguous(memory_format=torch.channels_last)
                    view2 = view2.contiguous(memory_format=torch.channels_last)
                lr = cfg.optim.lr * warmup_cosine(step, cfg.run.steps, cfg.optim.warmup_steps)
                set_lr(optimizer, lr)
                groups = None
                if cfg.method == "moco" and cfg.moco.position_partitions > 0:
                    partitions = cfg.moco.position_partitions
                    groups = (batch["position"] * partitions).long().clamp_(max=partitions - 1)
                labelled = None
                if cfg.method == "supervised" and data.mixed_pool:
                    labelled = (batch["organs"] >= 0).flatten(1).any(1)
                views = Views(view1, view2, g, step_generator(cfg.run.seed, step, SHARED_STREAM),
                              labels1, labels2, groups, labelled)

                with autocast:
                    loss, loss_global, loss_lrc, stats = train_step(
                        view1, view2, regions1, regions2, views, labels1, labels2)

                nonfinite |= ~torch.isfinite(loss.detach())  # checked at sync points, below
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
                optimizer.step()
                global_objective.after_step(step, cfg.run.steps)
                step += 1
                n_last += images.shape[0] * ctx.world_size
                bar.update(1)

                saving = (step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps
                          or (stop_at is not None and step >= stop_at))
                if step % cfg.run.log_every == 0 or saving:
                    check_finite(step)
                probing = cfg.probe.dataset is not None and (
                    step % cfg.probe.every == 0 or step == cfg.run.steps)
                if step % cfg.run.log_every == 0 or step == cfg.run.steps or probing:
                    now = time.perf_counter()
                    scalars = _reduced_scalars(loss, loss_global, loss_lrc, grad_norm, stats,
                                               global_objective.logs_global, lrc is not None)
                    scalars.update({"lr": lr, "slices_per_s": n_last / max(now - t_last, 1e-9)})
                    if probe is not None and probing:  # rank 0; its time is not in slices_per_s
                        scalars.update(probe.score(net.unet))
                        now = time.perf_counter()
                    if logger is not None:
                        logger.log(step, scalars)
                    bar.set_postfix(loss=f"{scalars['loss/total']:.3f}")
                    t_last, n_last = now, 0
                if step % cfg.run.checkpoint_every == 0 and step < cfg.run.steps:
                    checkpoint(step)
                if stop_at is not None and step >= stop_at and step < cfg.run.steps:
                    checkpoint(step)
                    return run_dir
        checkpoint(step, final=True)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    return run_dir


def _hparam_metrics(cfg: PretrainConfig, logs_global: bool) -> list[str]:
    """The scalar tags that are the columns of the run's TensorBoard HPARAMS row."""
    tags = ["loss/total"] + (["loss/global"] if logs_global else [])
    tags += ["loss/lrc"] if cfg.lrc.enabled else []
    return tags + (["probe/mean_dice"] if cfg.probe.dataset else [])


def _reduced_scalars(loss: Tensor, loss_global: Tensor, loss_lrc: Tensor, grad_norm: Tensor,
                     stats: dict[str, Tensor], log_global: bool, log_lrc: bool
                     ) -> dict[str, float]:
    """The step's scalars, averaged over ranks (every rank calls this at the same steps)."""
    values = {"loss/total": loss, "grad_norm": grad_norm}
    if log_global:
        values["loss/global"] = loss_global
    if log_lrc:
        values["loss/lrc"] = loss_lrc
    values.update(stats)
    names = sorted(values)
    device = loss.device
    stacked = torch.stack([values[k].detach().float().to(device).reshape(()) for k in names])
    return dict(zip(names, all_reduce_mean(stacked).tolist(), strict=True))


def _labels_in_views(augment: PairedViewAugment, organs: Tensor, replay: torch.Generator
                     ) -> tuple[Tensor, Tensor]:
    """Organ labels (B, H, W) carried through the same geometry as the views.

    ``replay`` must be a fresh copy of the generator the views were drawn from: the
    augmentation is replayed on a dummy image, so the label maps get exactly the views'
    geometric transforms (nearest neighbour). Pixels outside the canvas, and unlabelled
    slices (-1), come back as 0 (background; for LRC they lie in region 0, never sampled).
    """
    dummy = torch.zeros(organs.shape[0], 1, *organs.shape[1:], device=organs.device)
    _, labels1, _, labels2 = augment(dummy, organs.clamp(min=0), replay)
    return labels1, labels2
