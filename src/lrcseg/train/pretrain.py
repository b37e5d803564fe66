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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lrcseg.augment import PairedViewAugment
from lrcseg.augment3d import PairedVolumeAugment
from lrcseg.config import PretrainConfig, save_config, to_dict
from lrcseg.distributed import (
    DistContext,
    all_ranks_true,
    all_reduce_mean,
    barrier,
    concat_all_gather,
    gather_with_grad,
    init_distributed,
    teardown,
)
from lrcseg.errors import ConfigError, warn_data
from lrcseg.losses.lrc import LRCLoss, ViewMaps
from lrcseg.methods.base import GlobalMethod, Views, build_method
from lrcseg.methods.registry import method_class
from lrcseg.models.pretrain_net import PretrainNetwork
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
from lrcseg.train.pretrain_data import PretrainData, build_pretrain_data
from lrcseg.train.resume import check_resume_compatible, load_resume_checkpoint, prepare_run_dir
from lrcseg.train.runlog import RunLogger, write_run_card

#: generator stream shared by all ranks (ranks use streams 0..W-1 for per-sample randomness)
SHARED_STREAM = 2**31 - 1


class PretrainStep(nn.Module):
    """The differentiable part of a step, the module DDP wraps.

    forward(view1, view2, regions1, regions2, views, organs1=None) with views (B, C, S, S),
    region maps (B, S, S) long, ``Views`` for the global method and view 1's optional
    organ/label map (B, S, S) long for LRC's statistics, returns (loss, loss_global, loss_lrc,
    stats): loss = loss_global + lrc_weight * loss_lrc, all scalars, where loss_lrc is the
    mean of the LRC losses at the network's local levels; stats of the two terms, keyed
    "global/..." and "lrc/..." ("lrc/level<l>/..." with several local levels).

    gather_lrc: LRC with batch negatives across ranks: every rank gathers the local features
    (with gradient), region and organ maps of the whole global batch and computes the same
    loss with the shared generator, i.e. one process's loss over the concatenated batch.
    """

    def __init__(self, net: PretrainNetwork, method: GlobalMethod, lrc: LRCLoss | None,
                 lrc_weight: float, gather_lrc: bool = False, compile_net: bool = False,
                 num_region_ids: int | None = None, intensity_channel: int = 0):
        super().__init__()
        self.net, self.method, self.lrc = net, method, lrc
        # the input channel holding the slice the regions belong to, in its first window
        # (2.5D context stacks slices z - k//2 .. z + k//2, each with all windows)
        self.intensity_channel = intensity_channel
        self.lrc_weight = lrc_weight
        self.gather_lrc = gather_lrc
        self.num_region_ids = num_region_ids
        self._forward = [torch.compile(net) if compile_net else net]  # not a second submodule

    def forward(self, view1: Tensor, view2: Tensor, regions1: Tensor, regions2: Tensor,
                views: Views, organs1: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        full = self.method.full_decoder
        out1, out2 = (self._forward[0](v, full_decoder=full) for v in (view1, view2))
        loss_global, global_stats = self.method(out1, out2, views)
        stats = {f"global/{k}": v for k, v in global_stats.items()}
        if self.lrc is None:
            return loss_global, loss_global, torch.zeros_like(loss_global), stats
        generator = views.generator
        image1 = (views.view1[:, self.intensity_channel]
                  if self.lrc.cfg.sampling == "intensity" else None)
        if self.gather_lrc:
            regions1, regions2 = concat_all_gather(regions1), concat_all_gather(regions2)
            if image1 is not None:
                image1 = concat_all_gather(image1.contiguous())
            if organs1 is not None:
                organs1 = concat_all_gather(organs1)
            generator = views.shared_generator
        levels = self.net.cfg.local_levels
        level_losses = []
        for level, feat1, feat2 in zip(levels, out1["local"], out2["local"], strict=True):
            feat1, feat2 = feat1.float(), feat2.float()
            if self.gather_lrc:
                feat1, feat2 = gather_with_grad(feat1), gather_with_grad(feat2)
            level_loss, lrc_stats = self.lrc(feat1, feat2, regions1, regions2, generator=generator,
                                             num_ids=self.num_region_ids,
                                             maps1=ViewMaps(image=image1, organs=organs1))
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
        run = Pretraining(cfg, resume, progress and ctx.is_main, ctx)
        start, clock = run.restore() if resume else (0, None)
        if not resume and ctx.is_main:
            run.describe()
        run.start(start, clock)
        probing = None
        if cfg.probe.dataset is not None:
            def probing(step: int) -> bool:
                return step % cfg.probe.every == 0 or step == cfg.run.steps
        loop = TrainingLoop(run.run_dir, cfg.run.steps, start, run.save,
                            log_every=cfg.run.log_every, checkpoint_every=cfg.run.checkpoint_every,
                            device=ctx.device, stop_at=stop_at, also_log=probing,
                            desc="pretrain", progress=run.progress, all_true=all_ranks_true)
        try:
            loop.run(run.step, lambda step, rate: run.log(step, rate, probing))
        finally:
            if run.logger is not None:
                run.logger.close()
        return run.run_dir
    finally:
        teardown(ctx)


class Pretraining:
    """One pre-training run, built from its config in a fixed order (run folder, seeds, data,
    online probe, network, global method, LRC, optimiser: the random draws depend on it) and
    then stepped by ``TrainingLoop``: ``step`` (two views, forward, L_global + lambda L_LRC,
    backward, clip, step, the method's after-step update), ``log``, ``save``.
    """

    def __init__(self, cfg: PretrainConfig, resume: bool, progress: bool, ctx: DistContext):
        dcfg = cfg.distributed
        if dcfg.sync_bn and ctx.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation); "
                              "drop it for CPU runs")
        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.run_dir = prepare_run_dir(cfg.run.out, resume, create=False)
        seed_everything(cfg.run.seed)
        if ctx.is_main:
            warn_long_warmup(cfg.optim.warmup_steps, cfg.run.steps)
        self.data, self.probe = self._data(resume)
        self.net = PretrainNetwork(cfg.model, cfg.preprocess.in_channels,
                                   method_class(cfg.method).normalized_global).to(ctx.device)
        # channels_last is a 2D layout; channels_last_3d exists but is not measured here
        self.channels_last = cfg.run.channels_last and cfg.model.spatial_dims == 2
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.method = build_method(
            cfg, self.net, num_slices=len(self.data.dataset), world_size=ctx.world_size,
            gather_negatives=dcfg.gather_negatives, num_classes=self.data.num_classes
        ).to(ctx.device)
        if dcfg.sync_bn and ctx.enabled:  # after the momentum/target copies: those keep plain BN
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        self.step_module = self._step_module()
        self.train_step = self.step_module
        if ctx.enabled:
            self.train_step = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True)
        self.volumes = cfg.model.spatial_dims == 3
        self.augment = (PairedVolumeAugment(cfg.augment, cfg.augment.patch_size,
                                            cfg.augment.tilt_deg)
                        if self.volumes else PairedViewAugment(cfg.augment))
        self.params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg.optim, ctx.device)
        self.with_labels = self.data.dataset.with_organs and (
            cfg.lrc.enabled or self.method.needs_labels)
        self.logger: RunLogger | None = None
        self._last: tuple | None = None

    def _data(self, resume: bool) -> tuple[PretrainData, Any]:
        """Rank 0 builds the caches (and the online probe), the others then read them."""
        cfg, probe = self.cfg, None
        if self.ctx.is_main:
            data = build_pretrain_data(cfg, progress=self.progress)
            if cfg.probe.dataset:
                from lrcseg.evaluate.probe import OnlineProbe

                probe = OnlineProbe(cfg.probe.dataset, cfg.preprocess, labeled=cfg.probe.labeled,
                                    split_seed=cfg.probe.split_seed, max_cases=cfg.probe.max_cases,
                                    pixels=cfg.probe.pixels, cache_dir=cfg.run.cache_dir)
            prepare_run_dir(cfg.run.out, resume)  # created only once the data has been read
        barrier()
        if not self.ctx.is_main:
            data = build_pretrain_data(cfg, progress=False)
        return data, probe

    def _step_module(self) -> PretrainStep:
        cfg = self.cfg
        lrc = None
        if cfg.lrc.enabled:
            lrc = LRCLoss(cfg.lrc)
        gather = cfg.distributed.gather_negatives and self.ctx.enabled
        return PretrainStep(self.net, self.method, lrc, cfg.lrc.weight,
                            gather_lrc=gather and cfg.lrc.negatives == "batch",
                            compile_net=cfg.run.compile,
                            num_region_ids=self.data.dataset.max_region_id + 1,
                            intensity_channel=(cfg.preprocess.context_slices // 2)
                            * len(cfg.preprocess.windows))

    def restore(self) -> tuple[int, dict | None]:
        """Load the checkpoint to resume from; returns (step, the logger's clock)."""
        cfg, ctx, run_dir = self.cfg, self.ctx, self.run_dir
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
        self.net.load_state_dict(state["network"])
        self.method.load_state_dict(state["global_objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return state["step"], state.get("clock")

    def describe(self) -> None:
        """A new run's folder: its config and run card."""
        cfg, data = self.cfg, self.data
        save_config(cfg, self.run_dir / "config.yaml")
        write_run_card(self.run_dir, "pretrain", {
            "data_sources": data.sources,
            "slices": len(data.dataset),  # 3D: boxes
            "canvas": data.dataset.canvas,  # 3D: the box (d, h, w)
            "spatial_dims": cfg.model.spatial_dims,
            "preprocess": to_dict(cfg.preprocess),
            "superpixels": to_dict(cfg.superpixels),
            "device": str(self.ctx.device),
            "world_size": self.ctx.world_size,
            "distributed": to_dict(cfg.distributed),
        })

    def start(self, start: int, clock: dict | None) -> None:
        """This rank's sample stream from step ``start`` and (rank 0) the run's logger."""
        cfg, ctx = self.cfg, self.ctx
        sampler = ResumableSampler(len(self.data.dataset), cfg.run.seed,
                                   start=start * cfg.run.batch_size, rank=ctx.rank,
                                   num_replicas=ctx.world_size)
        loader = make_loader(self.data.dataset, cfg.run.batch_size, sampler, cfg.run.workers,
                             ctx.device, drop_last=True)
        if ctx.is_main:
            self.logger = RunLogger(self.run_dir, start_step=start, clock=clock)
            if start == 0:
                self.logger.log_hparams(to_dict(cfg), _hparam_metrics(
                    cfg, self.method.logs_global))
        self.autocast = autocast_context(ctx.device, cfg.run.amp)
        self.batches = DevicePrefetcher(iter(loader), ctx.device)  # float16 -> float32

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"step": step, "network": self.net.state_dict(),
                "global_objective": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "config": to_dict(self.cfg), "kind": "pretrain",
                "world_size": self.ctx.world_size,
                "clock": None if self.logger is None else self.logger.clock()}

    def save(self, step: int, final: bool) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.run_dir, self.state_dict(step), final=final)
        barrier()

    def _views(self, batch: dict[str, Tensor], step: int) -> tuple[Views, Tensor, Tensor]:
        """The two augmented views of the batch (geometry shared with regions and labels) and
        their region maps (B, S, S) long (3D: (B, S_d, S, S))."""
        cfg, rank, method = self.cfg, self.ctx.rank, self.method
        g = step_generator(cfg.run.seed, step, rank)
        geometry = {"spacing_mm": batch["spacing"]} if self.volumes else {}  # 3D: in mm
        view1, regions1, view2, regions2 = self.augment(batch["image"], batch["regions"].long(),
                                                        g, **geometry)
        if self.logger is not None and cfg.run.image_every and step % cfg.run.image_every == 0:
            self.logger.log_view_pairs(step, *_middle_slice(view1, regions1),
                                       *_middle_slice(view2, regions2),
                                       channel=self.step_module.intensity_channel)
        labels1 = labels2 = None
        logging_step = (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.run.steps
        if self.with_labels and (method.needs_labels or logging_step):
            labels1, labels2 = self.augment.labels_in_views(batch["organs"].long(),
                                                            step_generator(cfg.run.seed, step, rank),
                                                            **geometry)
        if self.channels_last:
            view1 = view1.contiguous(memory_format=torch.channels_last)
            view2 = view2.contiguous(memory_format=torch.channels_last)
        groups = labelled = None
        if method.position_partitions > 0:
            partitions = method.position_partitions
            groups = (batch["position"] * partitions).long().clamp_(max=partitions - 1)
        if method.needs_labels and self.data.mixed_pool:
            labelled = (batch["organs"] >= 0).flatten(1).any(1)
        views = Views(view1, view2, g, step_generator(cfg.run.seed, step, SHARED_STREAM),
                      labels1, labels2, groups, labelled)
        return views, regions1, regions2

    def step(self, step: int) -> tuple[Tensor, int]:
        """One optimiser step; returns the loss and the number of slices over all ranks."""
        cfg = self.cfg
        batch = next(self.batches)
        views, regions1, regions2 = self._views(batch, step)
        lr = cfg.optim.lr * warmup_cosine(step, cfg.run.steps, cfg.optim.warmup_steps)
        set_lr(self.optimizer, lr)
        with self.autocast:
            loss, loss_global, loss_lrc, stats = self.train_step(
                views.view1, views.view2, regions1, regions2, views, views.labels1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.method.after_step(step, cfg.run.steps)
        self._last = (loss, loss_global, loss_lrc, grad_norm, stats, lr)
        return loss, batch["image"].shape[0] * self.ctx.world_size

    def log(self, step: int, slices_per_s: float,
            probing: Callable[[int], bool] | None) -> float:
        """Scalars averaged over ranks (+ the online probe on its steps), logged by rank 0."""
        loss, loss_global, loss_lrc, grad_norm, stats, lr = self._last
        scalars = _reduced_scalars(loss, loss_global, loss_lrc, grad_norm, stats,
                                   self.method.logs_global, self.cfg.lrc.enabled)
        scalars.update({"lr": lr, "slices_per_s": slices_per_s})
        if self.probe is not None and probing(step):  # rank 0; not in slices_per_s
            scalars.update(self.probe.score(self.net.unet))
        if self.logger is not None:
            self.logger.log(step, scalars)
        return scalars["loss/total"]


def _middle_slice(view: Tensor, regions: Tensor) -> tuple[Tensor, Tensor]:
    """What the view logging shows of a view: a slice (B, C, S, S) and its map (B, S, S) as
    they are; a volume patch (B, C, S_d, S, S) and its map (B, S_d, S, S) by their middle
    axial slice."""
    if view.ndim == 4:
        return view, regions
    z = view.shape[2] // 2
    return view[:, :, z], regions[:, z]


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
