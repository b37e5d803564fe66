"""Benchmark: the 3D pre-training step against the 2D step, in one run (issue 30 item 6).

One *step* is what ``lrcseg.train.pretrain.Pretraining.step`` does with a batch already on
the device: the two augmented views (the region maps' int32 -> int64 conversion included),
the online network on both views, the global loss (MoCo: momentum update, key encoder on both
views, InfoNCE, queue), the LRC loss, backward, gradient clipping, AdamW, the method's
after-step update. It runs through the loop's own ``PretrainStep`` module, augmentation
classes and optimiser factory; what the loop does around a step (data loading, logging steps'
organ statistics, checkpoints) is not timed.

Arms, each in its own child process (so that its peak memory is its own):

    2d           the 2D step as configured today (``cpu``: configs/pretrain_cpu.yaml, i.e.
                 FlexibleUNet ResNet-18, 128 px views, batch 16, LRC at 1/2 resolution)
    3d_flexible  the same config in 3D: a 3D FlexibleUNet (``--backbone-3d``), views of
                 ``--patch`` voxels (D, H, W), batch ``--batch-3d``
    3d_nnunet    the same config set to nnU-Net's 3d_fullres network by ``nnunet.plans.
                 apply_plans``: the plans made by nnU-Net's own planner on generated phantoms
                 (``--nnunet-phantom-shape/-spacing``) or read from ``--nnunet-plans``, views
                 of the plans' patch; skipped with a reason where nnunetv2 is not installed

Inputs are synthetic and placed on the device once, as in ``bench/throughput.py``: random
images, Voronoi region maps inside an elliptic body (2D; the preset's ``regions_2d`` per
slice) or an elliptic cylinder along D (3D supervoxels; ``regions_3d`` per box), on the canvas the loop
cuts views from (2D: ``ceil(1.25 S / 32) * 32`` px square; 3D: the box of
``train.pretrain_data.box_size``, ``augment.box_scale`` x the patch).

Per arm: ``warmup`` steps (not timed), then timed steps until ``steps`` or ``max_s``; each
step synchronised at its end. Reported: median and IQR of the step time, pairs/s = B /
median, voxels/s = B x (voxels of one view) / median (pixels for 2D), and the ratios of each
3D arm to the 2D arm of the same run (step time, voxels/s, peak memory). Peak memory: on CPU
the child's peak resident set (``ru_maxrss``: the whole process, torch included) and how much
the steps added to the peak after set-up; on CUDA ``torch.cuda.max_memory_allocated``.

Profile: every timed step is split into parts by timers (forward hooks on the online network,
the global method and the LRC loss, plus timers around the augmentation, backward and the
optimiser): ``augment``, ``forward`` (online network, both views), ``global``, ``lrc``,
``backward``, ``optimizer`` and ``other`` (the rest of the step), each as mean ms per step and
share of the summed step time (the shares add up to 1). On CPU the timers cost
nothing; on CUDA each part boundary needs a synchronisation, so the parts come from
``profile_steps`` extra steps after the timed ones, which stay unsynchronised inside. With
``--op-profile N`` (default 1), ``torch.profiler`` records N more steps and the top operators by
self time are kept.

    python bench/throughput_3d.py --preset cpu|gpu [--out bench/results/throughput_3d.json]
        [--device auto|cpu|cuda] [--arms 2d,3d_flexible,3d_nnunet] [--patch 64,64,64]
        [--batch-3d 2] [--backbone-3d resnet18] [--backbone-2d B --image-size S --batch-2d N]
        [--nnunet-plans PLANS.json] [--steps N] [--work DIR]

The JSON (``--out``) is rewritten after every arm; the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the 2D benchmark's helpers (and its numba stand-in, set up on import) serve here too
from throughput import _reset_memory, _sync, environment, synthetic_regions  # noqa: E402

from lrcseg.augment import PairedViewAugment  # noqa: E402
from lrcseg.augment3d import PairedVolumeAugment  # noqa: E402
from lrcseg.config import PretrainConfig, load_config  # noqa: E402
from lrcseg.io_utils import atomic_write_json  # noqa: E402
from lrcseg.losses.lrc import LRCLoss  # noqa: E402
from lrcseg.methods.base import Views, build_method  # noqa: E402
from lrcseg.methods.registry import method_class  # noqa: E402
from lrcseg.models.pretrain_net import PretrainNetwork  # noqa: E402
from lrcseg.train.common import autocast_context, make_optimizer, step_generator  # noqa: E402
from lrcseg.train.pretrain import SHARED_STREAM, PretrainStep  # noqa: E402
from lrcseg.train.pretrain_data import box_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("2d", "3d_flexible", "3d_nnunet")
#: the parts of a step, in the order they run ("other": step time not in any part)
PARTS = ("augment", "forward", "global", "lrc", "backward", "optimizer", "other")
#: MoCo's queue: about this many keys, a multiple of the 2B keys a step enqueues
QUEUE_TARGET = 16384
#: the nnU-Net dataset id of the phantoms planned here (any id nnU-Net accepts)
NNUNET_DATASET_ID = 987
NNUNET_PHANTOM_CASES = 4


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """What one run compares and how long it times each arm.

    config_2d: the 2D pre-training config (YAML, relative to the repository) or None for the
    defaults; overrides_2d: nested overrides of it. The 3D arms take the same config with
    ``backbone_3d``, ``patch`` (D, H, W), ``batch_3d`` and ``spacing_3d`` (mm along D, H, W,
    for the 3D rotation in mm). The nnU-Net plans come from ``NNUNET_PHANTOM_CASES`` phantoms
    of ``nnunet_shape`` (x, y, z voxels) at ``nnunet_spacing`` (x, y, z mm).
    """

    config_2d: str | None
    overrides_2d: dict[str, Any]
    backbone_3d: str
    patch: tuple[int, int, int]
    batch_3d: int
    spacing_3d: tuple[float, float, float]
    regions_2d: int
    regions_3d: int
    nnunet_shape: tuple[int, int, int]
    nnunet_spacing: tuple[float, float, float]
    warmup: int
    steps: int
    max_s: float
    cap_s: float
    profile_steps: int
    op_profile: int


PRESETS: dict[str, Preset] = {
    # The 2-core VM: a few steps of each arm, all arms in about 5-8 minutes.
    "cpu": Preset(
        config_2d="configs/pretrain_cpu.yaml", overrides_2d={},
        backbone_3d="resnet18", patch=(64, 64, 64), batch_3d=2, spacing_3d=(3.0, 3.0, 3.0),
        regions_2d=50, regions_3d=200,
        nnunet_shape=(96, 80, 24), nnunet_spacing=(4.0, 4.0, 8.0),
        warmup=1, steps=5, max_s=90.0, cap_s=420.0, profile_steps=0, op_profile=1),
    # One GPU (not yet run): ResNet-50 at 224 px x 128 as the 2D H100 bench, 128^3 patches and
    # the plans nnU-Net makes for CT-sized phantoms (~1.5 x 1.5 x 2.5 mm).
    "gpu": Preset(
        config_2d=None,
        overrides_2d={"run": {"batch_size": 128, "steps": 1000},
                      "augment": {"image_size": 224}, "model": {"backbone": "resnet50"}},
        backbone_3d="resnet50", patch=(128, 128, 128), batch_3d=2, spacing_3d=(1.5, 1.5, 1.5),
        regions_2d=50, regions_3d=400,
        nnunet_shape=(256, 256, 128), nnunet_spacing=(1.5, 1.5, 2.5),
        warmup=5, steps=20, max_s=40.0, cap_s=240.0, profile_steps=3, op_profile=1),
}


# ----------------------------------------------------------------------------- inputs


def synthetic_supervoxels(batch: int, shape: Sequence[int], regions: int,
                          generator: torch.Generator) -> torch.Tensor:
    """Voronoi supervoxels inside an elliptic cylinder: (B, D, H, W) long, ids 1..regions,
    0 outside the body.

    The body is the 2D benchmark's ellipse ((x/0.45)^2 + (y/0.35)^2 < 1, x and y in
    [-0.5, 0.5] across W and H) on every axial slice; z runs along D in units of W voxels so
    that cells are about as long along D as across. Seeds are uniform in the body; every body
    voxel takes the id of its nearest seed (computed a slice at a time).
    """
    d, h, w = (int(s) for s in shape)
    if batch < 1 or regions < 1 or min(d, h, w) < 1:
        raise ValueError(f"Illegal synthetic supervoxels batch={batch} shape={tuple(shape)} "
                         f"regions={regions}")
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
    zs = (torch.arange(d, dtype=torch.float32) + 0.5 - d / 2) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    body = (xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1
    plane = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # (H*W, 2)
    maps = torch.zeros(batch, d, h, w, dtype=torch.long)
    for b in range(batch):
        r = torch.rand(regions, generator=generator).sqrt()
        phi = torch.rand(regions, generator=generator) * 2 * math.pi
        z = (torch.rand(regions, generator=generator) - 0.5) * d / w
        seeds = torch.stack([0.45 * r * torch.cos(phi), 0.35 * r * torch.sin(phi), z], dim=1)
        for k in range(d):
            points = torch.cat([plane, zs[k].expand(h * w, 1)], dim=1)
            nearest = torch.cdist(points, seeds).argmin(dim=1).view(h, w) + 1
            maps[b, k] = torch.where(body, nearest, torch.zeros_like(nearest))
    return maps


@dataclass
class Arm:
    """One configuration to time: ``cfg`` is a complete PretrainConfig (2D or 3D, FlexibleUNet
    or nnU-Net); ``canvas`` the (H, W) slice or (D, H, W) box the two views are cut from;
    ``regions`` the synthetic regions per slice or box; ``spacing_mm`` the 3D voxel size
    along D, H, W (None in 2D)."""

    name: str
    cfg: PretrainConfig
    canvas: tuple[int, ...]
    regions: int
    spacing_mm: tuple[float, float, float] | None
    network: str

    @property
    def batch(self) -> int:
        return self.cfg.run.batch_size

    @property
    def view(self) -> tuple[int, ...]:
        """The shape of one view: (S, S) or (S_d, S_h, S_w)."""
        if self.cfg.model.spatial_dims == 3:
            return tuple(self.cfg.augment.patch_size)
        return (self.cfg.augment.image_size,) * 2

    @property
    def view_voxels(self) -> int:
        return math.prod(self.view)


def _queue(batch: int) -> int:
    per_step = 2 * batch
    return per_step * max(1, QUEUE_TARGET // per_step)


def config_2d(preset: Preset, device: torch.device) -> PretrainConfig:
    """The 2D arm's config: the preset's file and overrides, on ``device``, MoCo's queue near
    ``QUEUE_TARGET`` keys."""
    path = ROOT / preset.config_2d if preset.config_2d else None
    overrides = json.loads(json.dumps(preset.overrides_2d))  # a deep copy
    run = overrides.setdefault("run", {})
    run["device"] = device.type
    if path is None:
        run.setdefault("steps", 1000)  # required; only the methods' after-step schedules read it
    cfg = load_config(PretrainConfig, path, overrides)
    return dataclasses.replace(cfg, moco=dataclasses.replace(
        cfg.moco, queue_size=_queue(cfg.run.batch_size)))


def config_3d(cfg2d: PretrainConfig, backbone: str, patch: Sequence[int], batch: int) -> PretrainConfig:
    """The 2D config in 3D: a 3D FlexibleUNet with ``backbone`` and views of ``patch``."""
    return dataclasses.replace(
        cfg2d, run=dataclasses.replace(cfg2d.run, batch_size=batch),
        model=dataclasses.replace(cfg2d.model, backbone=backbone, spatial_dims=3),
        augment=dataclasses.replace(cfg2d.augment, patch_size=tuple(int(s) for s in patch)),
        moco=dataclasses.replace(cfg2d.moco, queue_size=_queue(batch)))


def config_nnunet(cfg2d: PretrainConfig, plans: Path, batch: int) -> PretrainConfig:
    """The 2D config set to the plans' 3d_fullres network (``apply_plans``: its patch, the
    CT clip window as the network's channel)."""
    from lrcseg.nnunet.plans import apply_plans, network_from_plans

    base = dataclasses.replace(cfg2d, run=dataclasses.replace(cfg2d.run, batch_size=batch),
                               moco=dataclasses.replace(cfg2d.moco, queue_size=_queue(batch)))
    return apply_plans(base, network_from_plans(plans, "3d_fullres"))


def build_arm(name: str, preset: Preset, device: torch.device, plans: Path | None = None) -> Arm:
    """The arm ``name`` of ``preset`` (``3d_nnunet`` needs ``plans``)."""
    cfg2d = config_2d(preset, device)
    if name == "2d":
        side = cfg2d.augment.image_size
        canvas = int(math.ceil(side * 1.25 / 32) * 32)
        return Arm(name, cfg2d, (canvas, canvas), preset.regions_2d, None,
                   f"FlexibleUNet {cfg2d.model.backbone} 2D")
    if name == "3d_flexible":
        cfg = config_3d(cfg2d, preset.backbone_3d, preset.patch, preset.batch_3d)
        return Arm(name, cfg, box_size(cfg), preset.regions_3d, preset.spacing_3d,
                   f"FlexibleUNet {preset.backbone_3d} 3D")
    if name == "3d_nnunet":
        if plans is None:
            raise ValueError("arm 3d_nnunet needs nnU-Net plans")
        cfg = config_nnunet(cfg2d, plans, preset.batch_3d)
        arch = cfg.model.nnunet
        return Arm(name, cfg, box_size(cfg), preset.regions_3d, tuple(arch.spacing_mm),
                   f"nnU-Net {arch.network_class_name.rsplit('.', 1)[-1]} 3d_fullres "
                   f"({arch.arch_kwargs['n_stages']} stages)")
    raise ValueError(f"unknown arm {name!r}; one of {', '.join(ARMS)}")


# ----------------------------------------------------------------------------- the step


class PartTimer:
    """Wall time per part of a step, accumulated until ``take``; ``sync`` synchronises the
    device at every boundary (needed on CUDA for the parts to mean anything). Disabled, it
    does nothing. Parts may be entered several times a step (the network runs on two views)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}
        self._open: dict[str, float] = {}

    def start(self, part: str) -> None:
        if self.enabled:
            _sync(self.device)
            self._open[part] = time.perf_counter()

    def stop(self, part: str) -> None:
        if self.enabled:
            _sync(self.device)
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - self._open.pop(part)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.start(name)
        yield
        self.stop(name)

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


class StepBench:
    """One arm's pre-training step, built as ``train.pretrain.Pretraining`` builds it (network,
    global method, LRC loss, ``PretrainStep``, augmentation, optimiser), on a synthetic batch
    on ``device``: images (B, C, *canvas) float32 and regions (B, *canvas) int32 as the
    prefetcher hands them to the loop. ``step(i)`` runs step i; part timers are attached by
    forward hooks to the online network ("forward"), the global method ("global") and the LRC
    loss ("lrc")."""

    def __init__(self, arm: Arm, device: torch.device, seed: int = 0):
        cfg = arm.cfg
        self.cfg, self.device = cfg, device
        torch.manual_seed(seed)
        self.volumes = cfg.model.spatial_dims == 3
        net = PretrainNetwork(cfg.model, cfg.preprocess.in_channels,
                              method_class(cfg.method).normalized_global).to(device)
        self.channels_last = cfg.run.channels_last and not self.volumes  # as Pretraining
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        method = build_method(cfg, net, num_slices=1_000_000).to(device)
        lrc = LRCLoss(cfg.lrc) if cfg.lrc.enabled else None
        self.module = PretrainStep(net, method, lrc, cfg.lrc.weight,
                                   num_region_ids=arm.regions + 1)
        self.augment = (PairedVolumeAugment(cfg.augment, cfg.augment.patch_size,
                                            cfg.augment.tilt_deg)
                        if self.volumes else PairedViewAugment(cfg.augment))
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg.optim, device)
        self.autocast = autocast_context(device, cfg.run.amp)
        self.timer = PartTimer(device, enabled=False)
        for part, module in (("forward", net), ("global", method), ("lrc", lrc)):
            if module is not None:
                module.register_forward_pre_hook(lambda *_, p=part: self.timer.start(p))
                module.register_forward_hook(lambda *_, p=part: self.timer.stop(p))
        g = torch.Generator().manual_seed(seed + 1)
        b, c = arm.batch, cfg.preprocess.in_channels
        self.images = torch.rand(b, c, *arm.canvas, generator=g).to(device)
        maker = synthetic_supervoxels if self.volumes else synthetic_regions
        canvas = arm.canvas if self.volumes else arm.canvas[0]
        self.regions = maker(b, canvas, arm.regions, g).to(torch.int32).to(device)
        # the loop's batch["spacing"] is on the device too (the prefetcher moves every tensor)
        self.spacing = (torch.tensor(arm.spacing_mm, dtype=torch.float32).expand(b, 3).to(device)
                        if self.volumes else None)
        self.last_loss: torch.Tensor | None = None

    def step(self, step: int) -> None:
        cfg, timer = self.cfg, self.timer
        g = step_generator(cfg.run.seed, step)
        with timer.part("augment"):
            geometry = {"spacing_mm": self.spacing} if self.volumes else {}
            view1, regions1, view2, regions2 = self.augment(self.images, self.regions.long(), g,
                                                            **geometry)
            if self.channels_last:
                view1 = view1.contiguous(memory_format=torch.channels_last)
                view2 = view2.contiguous(memory_format=torch.channels_last)
        views = Views(view1, view2, g, step_generator(cfg.run.seed, step, SHARED_STREAM))
        with self.autocast:
            loss, _, _, _ = self.module(view1, view2, regions1, regions2, views)
        with timer.part("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timer.part("optimizer"):
            torch.nn.utils.clip_grad_norm_(
                self.params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
            self.optimizer.step()
            self.module.method.after_step(step, cfg.run.steps)
        self.last_loss = loss.detach()


# ----------------------------------------------------------------------------- timing


def summarise(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, mean and min of per-step seconds (one value: IQR 0)."""
    if not seconds:
        raise ValueError("no timed steps")
    values = sorted(seconds)
    q1, q3 = ((values[0], values[0]) if len(values) == 1
              else statistics.quantiles(values, n=4, method="inclusive")[::2])
    return {"step_s_median": statistics.median(values), "step_s_q1": q1, "step_s_q3": q3,
            "step_s_iqr": q3 - q1, "step_s_mean": statistics.fmean(values),
            "step_s_min": values[0]}


def part_shares(parts: Sequence[dict[str, float]], totals: Sequence[float]) -> dict[str, Any]:
    """Per part: its mean seconds per step over the profiled steps and its share of their
    summed step time (``other`` = step time outside every part, so the shares add up to 1);
    ``dominant`` = the part with the largest share; ``steps``: each step's part seconds."""
    rows = [{**p, "other": max(0.0, t - sum(p.values()))} for p, t in zip(parts, totals, strict=True)]
    total = sum(totals)
    out = {}
    for name in PARTS:
        seconds = sum(r.get(name, 0.0) for r in rows)
        out[name] = {"s_mean": seconds / len(rows), "share": seconds / total}
    dominant = max(PARTS, key=lambda n: out[n]["share"])
    return {"parts": out, "dominant": dominant, "profiled_steps": len(rows), "steps": rows}


def op_profile(run_step: Callable[[int], None], first: int, steps: int, device: torch.device,
               top: int = 10) -> list[dict[str, Any]]:
    """torch.profiler over ``steps`` steps: the ``top`` operators by self time (device time
    on CUDA, CPU time elsewhere), ms per step and share of the recorded self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            run_step(first + i)
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"op": e.key, "self_ms_per_step": round(getattr(e, key) / 1000 / steps, 2),
             "share": round(getattr(e, key) / total, 4), "calls_per_step": e.count / steps}
            for e in events[:top]]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_arm(arm: Arm, device: torch.device, warmup: int, steps: int, max_s: float,
            profile_steps: int = 0, op_steps: int = 0) -> dict[str, Any]:
    """Time ``arm``'s step in this process: its row (timing, voxels/s, memory, parts)."""
    row: dict[str, Any] = {"arm": arm.name, "network": arm.network,
                           "spatial_dims": arm.cfg.model.spatial_dims, "batch": arm.batch,
                           "view": list(arm.view), "canvas": list(arm.canvas),
                           "regions": arm.regions, "spacing_mm": arm.spacing_mm,
                           "local_levels": list(arm.cfg.model.local_levels),
                           "lrc_variant": arm.cfg.lrc.variant,
                           "rss_start_mib": round(_rss_mib(), 1)}
    _reset_memory(device)
    t0 = time.perf_counter()
    bench = StepBench(arm, device)
    row["setup_s"] = round(time.perf_counter() - t0, 2)
    row["parameters"] = sum(p.numel() for p in bench.module.net.parameters())
    row["rss_setup_mib"] = round(_rss_mib(), 1)
    # On CPU the part timers are free, so the timed steps are the profiled ones.
    split_inline = device.type != "cuda"
    bench.timer.enabled = split_inline
    for i in range(warmup):
        bench.step(i)
        _sync(device)
        bench.timer.take()
    totals: list[float] = []
    parts: list[dict[str, float]] = []
    done = warmup
    while len(totals) < steps and (not totals or sum(totals) < max_s):
        t = time.perf_counter()
        bench.step(done)
        _sync(device)
        totals.append(time.perf_counter() - t)
        parts.append(bench.timer.take())
        done += 1
    if not torch.isfinite(bench.last_loss):
        raise FloatingPointError(f"arm {arm.name}: non-finite loss at step {done - 1}")
    row.update({"warmup_steps": warmup, "timed_steps": len(totals), "step_s": totals,
                **summarise(totals)})
    if not split_inline and profile_steps > 0:
        bench.timer.enabled = True
        totals, parts = [], []
        for _ in range(profile_steps):
            t = time.perf_counter()
            bench.step(done)
            _sync(device)
            totals.append(time.perf_counter() - t)
            parts.append(bench.timer.take())
            done += 1
        bench.timer.enabled = False
    if parts and parts[0]:
        row["profile"] = part_shares(parts, totals)
    median = row["step_s_median"]
    row["pairs_per_s"] = arm.batch / median
    row["voxels_per_s"] = arm.batch * arm.view_voxels / median
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    row["rss_peak_mib"] = round(_rss_mib(), 1)
    row["rss_steps_added_mib"] = round(row["rss_peak_mib"] - row["rss_setup_mib"], 1)
    if op_steps > 0:
        bench.timer.enabled = False
        row["top_ops"] = op_profile(bench.step, done, op_steps, device)
    return row


# ----------------------------------------------------------------------------- nnU-Net plans


def nnunet_available() -> str | None:
    """None if nnunetv2 imports, else why not."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        return f"nnunetv2 is not installed ({exc}); pip install 'lrcseg[nnunet]'"
    return None


def plan_phantoms(work: Path, shape: tuple[int, int, int],
                  spacing_mm: tuple[float, float, float]) -> Path:
    """nnU-Net's own planning (``nnunet.planning.plan_and_preprocess``, 3d_fullres) of
    ``NNUNET_PHANTOM_CASES`` generated phantoms; returns the plans file (reused if ``work``
    holds it already)."""
    from lrcseg.nnunet.planning import plan_and_preprocess
    from lrcseg.phantoms.generate import write_phantom_dataset

    raw = work / f"Dataset{NNUNET_DATASET_ID}_Bench3d"
    if not raw.exists():
        write_phantom_dataset(raw, NNUNET_PHANTOM_CASES, seed=0, spacing_mm=spacing_mm,
                              shape=shape, montage=False)
    return plan_and_preprocess(raw, work / "nnunet", NNUNET_DATASET_ID, "3d_fullres")


# ----------------------------------------------------------------------------- the run


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every measured 3D arm against the 2D arm of the same run: step time, voxels/s and peak
    memory (CUDA peak allocated, else peak RSS), each 3D / 2D."""
    ok = {r["arm"]: r for r in rows if r.get("status") == "ok"}
    base = ok.get("2d")
    if base is None:
        return []
    memory = "peak_mem_gib" if "peak_mem_gib" in base else "rss_peak_mib"
    out = []
    for name, r in ok.items():
        if name == "2d":
            continue
        out.append({"arm": name, "step_time_3d_over_2d": r["step_s_median"] / base["step_s_median"],
                    "voxels_per_s_3d_over_2d": r["voxels_per_s"] / base["voxels_per_s"],
                    f"{memory}_3d_over_2d": r[memory] / base[memory]})
    return out


def markdown(report: dict[str, Any]) -> str:
    """The run's two tables: arms (time, rates, ratios to 2D, memory) and the step's parts."""
    rows = report["results"]
    by_arm = {r["arm"]: r for r in report["ratios"]}
    cuda = any("peak_mem_gib" in r for r in rows)
    mem = "peak GiB (CUDA)" if cuda else "peak RSS MiB (+ steps)"
    lines = [f"| arm | network | view | B | step s (median) | IQR s | voxels/s | 3D / 2D step | "
             f"3D / 2D voxels/s | {mem} | dominant part |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        view = "x".join(str(s) for s in r.get("view", []))
        if r.get("status") != "ok":
            lines.append(f"| {r['arm']} | {r.get('network', '')} | {view} | {r.get('batch', '')} | "
                         f"{r.get('status')}: {str(r.get('error', ''))[:80]} | | | | | | |")
            continue
        ratio = by_arm.get(r["arm"], {})
        step_ratio = f"{ratio['step_time_3d_over_2d']:.2f}" if ratio else "1.00"
        rate_ratio = f"{ratio['voxels_per_s_3d_over_2d']:.2f}" if ratio else "1.00"
        memory = (f"{r['peak_mem_gib']:.2f}" if cuda
                  else f"{r['rss_peak_mib']:.0f} (+{r['rss_steps_added_mib']:.0f})")
        prof = r.get("profile")
        dominant = (f"{prof['dominant']} {100 * prof['parts'][prof['dominant']]['share']:.0f} %"
                    if prof else "-")
        lines.append(f"| {r['arm']} | {r['network']} | {view} | {r['batch']} | "
                     f"{r['step_s_median']:.3f} | {r['step_s_iqr']:.3f} | {r['voxels_per_s']:,.0f} | "
                     f"{step_ratio} | {rate_ratio} | {memory} | {dominant} |")
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "| arm (ms per step, share) | " + " | ".join(PARTS) + " |",
                  "| --- |" + " ---: |" * len(PARTS)]
        for r in profiled:
            parts = r["profile"]["parts"]
            cells = [f"{1000 * parts[p]['s_mean']:.0f} ms ({100 * parts[p]['share']:.0f} %)"
                     for p in PARTS]
            lines.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_child(argv: list[str], arm: str, plans: Path | None, cap_s: float) -> dict[str, Any]:
    """Run one arm in a child process (``--child``) and read its row."""
    with tempfile.TemporaryDirectory(prefix="lrcseg_bench3d_") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", arm,
               "--child-out", str(out)] + (["--nnunet-plans", str(plans)] if plans else [])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s)
        except subprocess.TimeoutExpired:
            return {"arm": arm, "status": "timeout", "error": f"ran past its {cap_s:.0f} s cap"}
        if done.returncode != 0 or not out.exists():
            return {"arm": arm, "status": "error",
                    "error": (done.stderr or done.stdout)[-3000:] or f"exit {done.returncode}"}
        return json.loads(out.read_text())


def child_main(args: argparse.Namespace, preset: Preset, device: torch.device) -> int:
    """``--child ARM``: time one arm, write its row (status ok or error) to ``--child-out``."""
    row: dict[str, Any] = {"arm": args.child}
    try:
        arm = build_arm(args.child, preset, device, args.nnunet_plans)
        row.update(run_arm(arm, device, preset.warmup, preset.steps, preset.max_s,
                           preset.profile_steps, preset.op_profile), status="ok")
    except Exception as exc:  # a failed arm is a result, not a crash of the run
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                   traceback=traceback.format_exc(limit=8)[-3000:])
    atomic_write_json(Path(args.child_out), row)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput_3d.json",
                        help="JSON file, rewritten after each arm")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--backbone-2d", default=None, help="override the 2D config's backbone")
    parser.add_argument("--image-size", type=int, default=None, help="override the 2D view side")
    parser.add_argument("--batch-2d", type=int, default=None, help="override the 2D batch")
    parser.add_argument("--patch", default=None, help="3D FlexibleUNet view D,H,W (multiples of 32)")
    parser.add_argument("--batch-3d", type=int, default=None)
    parser.add_argument("--backbone-3d", default=None)
    parser.add_argument("--nnunet-plans", type=Path, default=None,
                        help="nnUNetPlans.json with a 3d_fullres configuration (default: plan phantoms)")
    parser.add_argument("--nnunet-phantom-shape", default=None, help="x,y,z voxels of the phantoms")
    parser.add_argument("--nnunet-phantom-spacing", default=None, help="x,y,z mm of the phantoms")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the planned phantoms (kept; default: a temporary one)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm")
    parser.add_argument("--max-s", type=float, default=None, help="timed seconds per arm")
    parser.add_argument("--cap-s", type=float, default=None, help="cap per arm (seconds)")
    parser.add_argument("--op-profile", type=int, default=None,
                        help="steps recorded by torch.profiler per arm (0 = none)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--child", choices=ARMS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _ints(text: str, n: int, what: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != n:
        raise SystemExit(f"{what}: {n} comma-separated integers, got {text!r}")
    return values


def make_preset(args: argparse.Namespace) -> Preset:
    """The preset with the command line's overrides applied."""
    p = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    overrides = json.loads(json.dumps(p.overrides_2d))  # a deep copy
    for section, key, value in (("model", "backbone", args.backbone_2d),
                                ("augment", "image_size", args.image_size),
                                ("run", "batch_size", args.batch_2d)):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    changes["overrides_2d"] = overrides
    if args.patch:
        changes["patch"] = _ints(args.patch, 3, "--patch")
    if args.nnunet_phantom_shape:
        changes["nnunet_shape"] = _ints(args.nnunet_phantom_shape, 3, "--nnunet-phantom-shape")
    if args.nnunet_phantom_spacing:
        changes["nnunet_spacing"] = tuple(float(v) for v in args.nnunet_phantom_spacing.split(","))
    for field, value in (("batch_3d", args.batch_3d), ("backbone_3d", args.backbone_3d),
                         ("warmup", args.warmup), ("steps", args.steps), ("max_s", args.max_s),
                         ("cap_s", args.cap_s), ("op_profile", args.op_profile)):
        if value is not None:
            changes[field] = value
    return dataclasses.replace(p, **changes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    preset = make_preset(args)
    if args.device in ("auto", ""):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args, preset, device)

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "throughput_3d", "preset": args.preset, "command": " ".join(argv),
        "environment": {**environment(device), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "plan": dataclasses.asdict(preset), "results": [], "ratios": [], "complete": False}

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        report["ratios"] = ratios(report["results"])
        if args.out is not None:
            atomic_write_json(args.out, report)

    with tempfile.TemporaryDirectory(prefix="lrcseg_bench3d_") as tmp:
        for arm in arms:
            plans = None
            if arm == "3d_nnunet":
                missing = nnunet_available()
                if missing:
                    report["results"].append({"arm": arm, "status": "skipped", "error": missing})
                    print(f"{arm}: skipped: {missing}", flush=True)
                    save()
                    continue
                plans = args.nnunet_plans
                if plans is None:
                    t = time.perf_counter()
                    plans = plan_phantoms(args.work or Path(tmp), preset.nnunet_shape,
                                          preset.nnunet_spacing)
                    report["nnunet_planning_s"] = round(time.perf_counter() - t, 1)
                report["nnunet_plans"] = str(plans)
            print(f"{arm}: running ...", flush=True)
            row = run_child(_without_plans(argv), arm, plans, preset.cap_s)
            report["results"].append(row)
            print(f"{arm}: {row['status']}"
                  + (f", median {row['step_s_median']:.3f} s/step" if row["status"] == "ok"
                     else f": {str(row.get('error'))[-300:]}"), flush=True)
            save()
    report["complete"] = True
    save()
    print()
    print(markdown(report), flush=True)
    return 0


def _without_plans(argv: list[str]) -> list[str]:
    """argv without ``--nnunet-plans X`` (the child gets the resolved plans instead)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nnunet-plans":
            skip = True
        elif not a.startswith("--nnunet-plans="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
