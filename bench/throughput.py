"""Benchmark: pre-training throughput (pairs/s) against the network's compute floor.

Definitions (issue 9):

- a *pair* is one sample of a MoCo(+LRC) step: both views forward+backward through the online
  U-Net, both views forward through the momentum key encoder, losses, optimiser step.
- the *floor* is measured in the same run with the same settings (device, backbone, size,
  batch, bf16 autocast, channels_last, eager or compiled):

      t_floor = 2 t_supervised + 2 t_key          (seconds per batch of B)

  with t_supervised one supervised U-Net step (one view, full decoder + segmentation head,
  forward+backward with Dice+CE, clip, AdamW) and t_key one momentum-encoder forward
  (encoder + global head, no grad). ``floor_ratio = t_step / t_floor`` (target <= 1.15 for
  MoCo+LRC) and ``pairs_per_s = B / t_step``.

Configurations per setting (backbone, image side S, batch B):

    supervised, key_forward, floor (derived), moco, moco_lrc_pixel, moco_lrc_region
        model-only steps on synthetic inputs prepared on the device once (random images
        (B, 1, S, S), Voronoi region maps with about ``regions`` regions inside an elliptic
        body, view 2 = view 1 shifted), each as in ``lrcseg.train.pretrain``; eager, and with
        ``torch.compile`` of the online network where the preset asks for it.
    augment
        ``PairedViewAugment`` alone on a (B, 1, canvas, canvas) batch on the device.
    lrc_pixel, lrc_region (issue 18)
        ``LRCLoss`` alone, forward + backward w.r.t. a (B, 128, S/4, S/4) feature map (row
        mode "alone"), in up to three modes timed *interleaved* (one call of each per round,
        so a loaded machine slows all alike) and reported as ratios: "raw" (the map as a head with
        ``normalize=False`` gives it: the loss normalises only the sampled pixels),
        "normmap" (the head normalises every pixel first, as ``PretrainNetwork`` does) and,
        with ``--lrc-baseline FILE`` (an older ``losses/lrc.py``, e.g. from ``git show``),
        "baseline" (that file's loss on the normalised map). Rounds: max(steps, 20).
    e2e
        ``lrcseg.train.pretrain.pretrain`` on a generated phantom dataset (slice + region
        caches, DataLoader workers, paired augmentation, organ statistics, logging): the rate
        comes from its metrics.jsonl over the steps after warm-up. Mode "noprefetch" runs it
        again with ``DevicePrefetcher`` replaced by the plain per-step copy (issue 18).

Each configuration is time-capped: ``warmup`` steps (or ``warmup_s``), then timed steps until
``steps`` or ``max_s`` seconds, every step synchronised (the real loop synchronises too, on its
finiteness check); a SIGALRM guard stops a configuration (a stuck compile) after ``cap_s``, and
configurations past the run's ``budget_s`` are recorded as skipped. On CUDA: bf16 autocast,
channels_last; peak memory is ``torch.cuda.max_memory_allocated`` per configuration. On CPU
peak memory is None and ``rss_mib`` the process's peak resident set so far.

The JSON (``--out``) is rewritten after every configuration, so a run cut short keeps its rows.

    python bench/throughput.py --preset cpu|h100|full [--out FILE.json] [--device auto|cpu|cuda]
        [--backbone resnet18 --image-size 128 --batch 8] [--compile/--no-compile] [--no-e2e]
        [--only CONFIG,...] [--lrc-baseline OLD_LRC.py]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch


def _ensure_numba() -> str:
    """The superpixel implementation this machine can run: "fast" (numba) or "skimage".

    ``lrcseg.superpixels.felzenszwalb`` imports numba at import time; where numba is missing
    (the GPU image may lack it), a stand-in module whose ``njit`` is the identity lets the
    package import, and the caches are built with skimage's Felzenszwalb instead.
    """
    try:
        import numba  # noqa: F401
        return "fast"
    except Exception:  # ImportError, or a numba that does not match the installed numpy
        shim = types.ModuleType("numba")

        def njit(*args: Any, **kwargs: Any) -> Any:
            if args and callable(args[0]):
                return args[0]
            return lambda fn: fn

        shim.njit = njit  # type: ignore[attr-defined]
        shim.jit = njit  # type: ignore[attr-defined]
        sys.modules["numba"] = shim
        return "skimage"


SUPERPIXEL_IMPLEMENTATION = _ensure_numba()

from lrcseg.augment import PairedViewAugment  # noqa: E402
from lrcseg.config import (  # noqa: E402
    AugmentConfig,
    LRCConfig,
    MocoConfig,
    ModelConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
    SuperpixelConfig,
)
from lrcseg.io_utils import atomic_write_json  # noqa: E402
from lrcseg.losses.lrc import LRCLoss  # noqa: E402
from lrcseg.methods.base import Views, build_method  # noqa: E402
from lrcseg.models.pretrain_net import PretrainNetwork  # noqa: E402
from lrcseg.models.unet import build_unet  # noqa: E402
from lrcseg.train.common import step_generator  # noqa: E402

#: LRC at 1/4 resolution, as in every figure of bench/NOTES.md so far (the pre-training
#: default moved to 1/2 resolution later; pass a different level to measure that)
BENCH_LOCAL_LEVELS = (2,)
#: LRC's regions drawn in proportion to area, as in every figure of bench/NOTES.md so far and
#: the only sampling of an older losses/lrc.py (``--lrc-baseline``); pre-training's default
#: (``LRCConfig.sampling``) is uniform
BENCH_LRC_SAMPLING = "area"

#: segmentation classes of the supervised step (background + 7 phantom organs)
NUM_CLASSES = 8
MODEL_CONFIGS = ("supervised", "key_forward", "moco", "moco_lrc_pixel", "moco_lrc_region")
#: the LRC loss alone (issue 18), timed interleaved in these modes (see the module docstring)
LRC_CONFIGS = ("lrc_pixel", "lrc_region")
LRC_MODES = ("raw", "normmap")
LRC_MIN_ROUNDS = 20
#: local feature width of the LRC-alone rows (the configs' proj_dim)
LRC_DIM = 128


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Setting:
    """One network/input size: backbone, view side S (multiple of 32), batch B, regions/image."""

    backbone: str
    image_size: int
    batch: int
    regions: int = 50

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.image_size}px-b{self.batch}"


@dataclass(frozen=True)
class E2E:
    """The end-to-end run: phantom cases (shape x, y, z at spacing_mm), workers, steps."""

    cases: int
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    preprocess_spacing_mm: float
    workers: int
    warmup: int
    steps: int
    log_every: int


@dataclass(frozen=True)
class Preset:
    settings: tuple[Setting, ...]
    warmup: int
    steps: int
    warmup_s: float
    max_s: float
    cap_s: float
    budget_s: float
    compile: tuple[str, ...]
    e2e: E2E | None
    threads: int | None = None


def _workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 2))


PRESETS: dict[str, Preset] = {
    # Test-suite smoke run: a few seconds per configuration on a shared CPU.
    "cpu": Preset(
        settings=(Setting("resnet10", 64, 4, regions=12),),
        warmup=1, steps=3, warmup_s=10.0, max_s=10.0, cap_s=120.0, budget_s=600.0,
        compile=(), threads=1,
        e2e=E2E(cases=4, shape=(100, 75, 16), spacing_mm=(4.0, 4.0, 12.5),
                preprocess_spacing_mm=4.0, workers=0, warmup=2, steps=3, log_every=1),
    ),
    # One 10-minute device command: about 6 minutes of benchmarking after start-up.
    "h100": Preset(
        settings=(Setting("resnet50", 224, 128),),
        warmup=20, steps=30, warmup_s=40.0, max_s=25.0, cap_s=150.0, budget_s=330.0,
        compile=("supervised", "moco_lrc_pixel"),
        e2e=E2E(cases=10, shape=(200, 150, 40), spacing_mm=(2.0, 2.0, 5.0),
                preprocess_spacing_mm=1.5, workers=_workers(), warmup=10, steps=20, log_every=5),
    ),
    "full": Preset(
        settings=(Setting("resnet18", 224, 128), Setting("resnet50", 224, 128),
                  Setting("resnet18", 512, 32), Setting("resnet50", 512, 32)),
        warmup=20, steps=50, warmup_s=60.0, max_s=60.0, cap_s=300.0, budget_s=3600.0,
        compile=MODEL_CONFIGS,
        e2e=E2E(cases=10, shape=(200, 150, 40), spacing_mm=(2.0, 2.0, 5.0),
                preprocess_spacing_mm=1.5, workers=_workers(), warmup=10, steps=40, log_every=5),
    ),
}


# ----------------------------------------------------------------------------- inputs


def synthetic_regions(batch: int, size: int, regions: int, generator: torch.Generator) -> torch.Tensor:
    """Voronoi region maps inside an elliptic body: (B, S, S) long, ids 1..regions, 0 outside.

    Seeds are drawn uniformly inside the ellipse ((x/0.45)^2 + (y/0.35)^2 < 1 in [-0.5, 0.5]^2
    canvas units); every body pixel takes the id of its nearest seed.
    """
    if batch < 1 or size < 1 or regions < 1:
        raise ValueError(f"Illegal synthetic regions batch={batch} size={size} regions={regions}")
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    body = (xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1
    pixels = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # (S*S, 2)
    maps = []
    for _ in range(batch):
        r = torch.rand(regions, generator=generator).sqrt()
        phi = torch.rand(regions, generator=generator) * 2 * math.pi
        seeds = torch.stack([0.45 * r * torch.cos(phi), 0.35 * r * torch.sin(phi)], dim=1)
        nearest = torch.cdist(pixels, seeds).argmin(dim=1).view(size, size) + 1
        maps.append(torch.where(body, nearest, torch.zeros_like(nearest)))
    return torch.stack(maps)


@dataclass
class Inputs:
    """Synthetic batch on the device: two views (B, 1, S, S), region maps (B, S, S), labels."""

    view1: torch.Tensor
    view2: torch.Tensor
    regions1: torch.Tensor
    regions2: torch.Tensor
    labels: torch.Tensor


def make_inputs(setting: Setting, device: torch.device, channels_last: bool, seed: int = 0) -> Inputs:
    """View 2 and its regions are view 1's shifted by S/16 pixels (ids keep corresponding)."""
    g = torch.Generator().manual_seed(seed)
    b, s = setting.batch, setting.image_size
    regions1 = synthetic_regions(b, s, setting.regions, g)
    shift = max(1, s // 16)
    regions2 = torch.roll(regions1, shifts=(shift, shift), dims=(1, 2))
    view1 = torch.rand(b, 1, s, s, generator=g)
    view2 = torch.roll(view1, shifts=(shift, shift), dims=(2, 3)) + 0.05 * torch.randn(b, 1, s, s, generator=g)
    labels = (regions1 % NUM_CLASSES).long()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return Inputs(view1.to(device).contiguous(memory_format=fmt),
                  view2.to(device).contiguous(memory_format=fmt),
                  regions1.to(device), regions2.to(device), labels.to(device))


# ----------------------------------------------------------------------------- steps


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pretrain_config(setting: Setting, variant: str | None, device: torch.device) -> PretrainConfig:
    """The PretrainConfig of a model-only MoCo(+LRC) step (variant None = no LRC)."""
    per_step = 2 * setting.batch
    return PretrainConfig(
        data=[],
        run=RunConfig(batch_size=setting.batch, device=device.type, amp=True,
                      channels_last=device.type == "cuda"),
        model=ModelConfig(backbone=setting.backbone, local_levels=BENCH_LOCAL_LEVELS),
        augment=AugmentConfig(image_size=setting.image_size),
        lrc=LRCConfig(enabled=variant is not None, variant=variant or "pixel",
                      sampling=BENCH_LRC_SAMPLING),
        moco=MocoConfig(queue_size=per_step * max(1, 16384 // per_step)),
    )


def call_objective(objective: torch.nn.Module, out1: dict[str, torch.Tensor],
                   out2: dict[str, torch.Tensor], view1: torch.Tensor, view2: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Call a global method as the loop does, with its ``Views``."""
    return objective(out1, out2, Views(view1=view1, view2=view2, generator=generator,
                                       shared_generator=generator))


def build_step(name: str, setting: Setting, inputs: Inputs, device: torch.device,
               compiled: bool) -> Callable[[int], None]:
    """A closure running one training step of configuration ``name`` (step index -> None)."""
    channels_last = device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    autocast = _autocast(device)
    model_cfg = ModelConfig(backbone=setting.backbone, local_levels=BENCH_LOCAL_LEVELS)

    if name == "supervised":
        from monai.losses import DiceCELoss

        model = build_unet(model_cfg, 1, NUM_CLASSES).to(device).to(memory_format=fmt)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        forward = torch.compile(model) if compiled else model

        def supervised_step(step: int) -> None:
            with autocast:
                logits = forward(inputs.view1)
            loss = loss_fn(logits.float(), inputs.labels[:, None])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite supervised loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            optimizer.step()

        return supervised_step

    if name == "key_forward":
        key = PretrainNetwork(model_cfg, 1).to(device).to(memory_format=fmt)
        key.requires_grad_(False)
        encode = torch.compile(key.encode_global) if compiled else key.encode_global

        def key_step(step: int) -> None:
            with torch.no_grad(), autocast:
                keys = encode(inputs.view1)
            if not torch.isfinite(keys).all():
                raise FloatingPointError(f"non-finite keys at step {step}")

        return key_step

    if name in ("moco", "moco_lrc_pixel", "moco_lrc_region"):
        variant = {"moco": None, "moco_lrc_pixel": "pixel", "moco_lrc_region": "region"}[name]
        cfg = pretrain_config(setting, variant, device)
        net = PretrainNetwork(cfg.model, 1).to(device).to(memory_format=fmt)
        objective = build_method(cfg, net, num_slices=1_000_000).to(device)
        lrc = LRCLoss(cfg.lrc)
        params = [p for p in list(net.parameters()) + list(objective.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        forward = torch.compile(net) if compiled else net

        def pretrain_step(step: int) -> None:
            g = step_generator(cfg.run.seed, step)
            with autocast:
                out1, out2 = forward(inputs.view1), forward(inputs.view2)
                loss, _ = call_objective(objective, out1, out2, inputs.view1, inputs.view2, g)
                if variant is not None:
                    loss_lrc, _ = lrc(out1["local"][0].float(), out2["local"][0].float(),
                                      inputs.regions1, inputs.regions2, generator=g)
                    loss = loss + cfg.lrc.weight * loss_lrc
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite {name} loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            objective.after_step(step, 1000)

        return pretrain_step

    if name == "augment":
        canvas = int(math.ceil(setting.image_size * 1.25 / 32) * 32)
        g = torch.Generator().manual_seed(1)
        images = torch.rand(setting.batch, 1, canvas, canvas, generator=g).to(device)
        regions = synthetic_regions(setting.batch, canvas, setting.regions, g).to(device)
        augment = PairedViewAugment(AugmentConfig(image_size=setting.image_size))

        def augment_step(step: int) -> None:
            view1, _, view2, _ = augment(images, regions, step_generator(0, step))
            if not (torch.isfinite(view1).all() and torch.isfinite(view2).all()):
                raise FloatingPointError(f"non-finite augmented views at step {step}")

        return augment_step

    raise ValueError(f"unknown configuration {name!r}")


def load_lrc_module(path: Path) -> types.ModuleType:
    """Another version of ``lrcseg/losses/lrc.py`` (it imports only torch at run time), for
    the baseline."""
    spec = importlib.util.spec_from_file_location("lrc_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--lrc-baseline {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lrc_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def baseline_loss(module: types.ModuleType, cfg: LRCConfig) -> torch.nn.Module:
    """``module.LRCLoss`` configured as ``cfg``: built from the config where its constructor
    takes one, else (a file from before issue 26) from the config's fields it knows as
    keywords (a file without ``sampling`` draws by area)."""
    params = inspect.signature(module.LRCLoss).parameters
    if "cfg" in params:
        return module.LRCLoss(cfg)
    return module.LRCLoss(**{k: v for k, v in asdict(cfg).items() if k in params})


def build_lrc_steps(name: str, setting: Setting, inputs: Inputs, device: torch.device,
                    baseline: types.ModuleType | None = None
                    ) -> tuple[dict[str, Callable[[int], None]], float]:
    """The LRC loss alone (forward + backward w.r.t. the map), one closure per mode.

    Modes: "raw" (current loss on the unnormalised map), "normmap" (current loss on the map
    L2-normalised per pixel, as the normalising head gives it: the normalisation is timed) and
    "baseline" (``baseline.LRCLoss`` on the normalised map). Every mode draws its sample from
    ``step_generator(0, step)``, so a round's calls sample the same regions and pixels.
    Returns (steps, the largest |loss - raw loss| of the other modes at step 0).
    """
    import torch.nn.functional as F

    variant = {"lrc_pixel": "pixel", "lrc_region": "region"}[name]
    cfg = pretrain_config(setting, variant, device).lrc
    side = setting.image_size // 2 ** (4 - BENCH_LOCAL_LEVELS[0])
    g = torch.Generator().manual_seed(2)
    raw1, raw2 = (torch.randn(setting.batch, LRC_DIM, side, side, generator=g).to(device)
                  .requires_grad_() for _ in (0, 1))
    num_ids = setting.regions + 1
    autocast = _autocast(device)  # the loop calls the loss inside the step's autocast

    def make(loss_fn: torch.nn.Module, normalise: bool) -> Callable[[int], torch.Tensor]:
        def call(step: int) -> torch.Tensor:
            with autocast:
                f1, f2 = (F.normalize(raw1, dim=1), F.normalize(raw2, dim=1)) if normalise else (raw1, raw2)
                loss, _ = loss_fn(f1, f2, inputs.regions1, inputs.regions2,
                                  generator=step_generator(0, step), num_ids=num_ids)
            raw1.grad = raw2.grad = None
            loss.backward()
            return loss
        return call

    calls = {"raw": make(LRCLoss(cfg), False), "normmap": make(LRCLoss(cfg), True)}
    if baseline is not None:
        calls["baseline"] = make(baseline_loss(baseline, cfg), True)
    values = {mode: float(call(0).detach()) for mode, call in calls.items()}
    diff = max(abs(v - values["raw"]) for v in values.values())

    def step_of(call: Callable[[int], torch.Tensor]) -> Callable[[int], None]:
        def step(i: int) -> None:
            if not torch.isfinite(call(i)):
                raise FloatingPointError(f"non-finite {name} loss at step {i}")
        return step

    return {mode: step_of(call) for mode, call in calls.items()}, diff


# ----------------------------------------------------------------------------- timing


class ConfigTimeout(Exception):
    """A configuration ran past its cap (e.g. a compile that does not finish)."""


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise ConfigTimeout in the main thread after ``seconds`` (no-op where SIGALRM is missing)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise ConfigTimeout(f"configuration ran past its {seconds:.0f} s cap")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device: torch.device) -> dict[str, float | None]:
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_mem_gib": None if peak is None else round(peak, 3), "rss_mib": round(rss_mib, 1)}


def time_steps(step: Callable[[int], None], device: torch.device, warmup: int, steps: int,
               warmup_s: float, max_s: float) -> dict[str, Any]:
    """Warm up (``warmup`` steps or ``warmup_s``), then time until ``steps`` or ``max_s``.

    Returns first_step_s (includes any compile), warmup_steps, per-step seconds (synchronised),
    their mean and median.
    """
    t0 = time.perf_counter()
    step(0)
    _sync(device)
    first = time.perf_counter() - t0
    done = 1
    t_warm = time.perf_counter()
    while done < warmup and time.perf_counter() - t_warm < warmup_s:
        step(done)
        _sync(device)
        done += 1
    times: list[float] = []
    while len(times) < steps and sum(times) < max_s:
        t = time.perf_counter()
        step(done + len(times))
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"first_step_s": round(first, 3), "warmup_steps": done, "timed_steps": len(times),
            "step_s_mean": statistics.fmean(times), "step_s_median": statistics.median(times),
            "step_s_min": min(times)}


def time_interleaved(steps: dict[str, Callable[[int], None]], device: torch.device, warmup: int,
                     rounds: int, max_s: float) -> dict[str, dict[str, Any]]:
    """Time several step functions in alternation: each round calls every one once (the
    order rotates from round to round) with the same step index, until ``rounds`` rounds or
    ``max_s`` seconds. Returns per name the statistics of ``time_steps``."""
    names = list(steps)
    for i in range(warmup):
        for name in names:
            steps[name](i)
            _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    r = 0
    while r < rounds and (r == 0 or time.perf_counter() - started < max_s):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            steps[name](warmup + r)
            _sync(device)
            times[name].append(time.perf_counter() - t)
        r += 1
    return {name: {"warmup_steps": warmup, "timed_steps": len(t), "step_s_mean": statistics.fmean(t),
                   "step_s_median": statistics.median(t), "step_s_min": min(t)}
            for name, t in times.items()}


# ----------------------------------------------------------------------------- end to end


@contextlib.contextmanager
def plain_batches() -> Iterator[None]:
    """``pretrain()`` without ``DevicePrefetcher``: each batch copied when the step needs it."""
    from lrcseg.train import pretrain as pretrain_module

    def plain(batches: Iterator[Any], device: torch.device) -> Iterator[Any]:
        for batch in batches:
            yield {k: v.to(device, non_blocking=True).float() if v.dtype == torch.float16
                   else v.to(device, non_blocking=True) for k, v in batch.items()}

    original = pretrain_module.DevicePrefetcher
    pretrain_module.DevicePrefetcher = plain
    try:
        yield
    finally:
        pretrain_module.DevicePrefetcher = original


def run_e2e(setting: Setting, e2e: E2E, device: torch.device, workdir: Path,
            compiled: bool = False, prefetch: bool = True) -> dict[str, Any]:
    """``pretrain()`` on freshly generated phantoms; the rate over the steps after warm-up.

    The rate is B x (steps between the first and last logged row after warm-up) / (their
    logger-time difference), i.e. it includes data loading, augmentation and logging.
    """
    from lrcseg.phantoms.generate import write_phantom_dataset
    from lrcseg.train.pretrain import pretrain
    from lrcseg.train.runlog import read_metrics

    data = workdir / "phantoms"
    t0 = time.perf_counter()
    if not data.exists():
        write_phantom_dataset(data, e2e.cases, seed=0, spacing_mm=e2e.spacing_mm, shape=e2e.shape,
                              montage=False)
    t_data = time.perf_counter() - t0
    total = e2e.warmup + e2e.steps
    cfg = PretrainConfig(
        data=[str(data)],
        run=RunConfig(out=str(workdir / f"run_{'compiled' if compiled else 'eager'}"
                              f"{'' if prefetch else '_noprefetch'}"), steps=total,
                      batch_size=setting.batch, device=device.type, workers=e2e.workers,
                      amp=True, channels_last=device.type == "cuda", compile=compiled,
                      checkpoint_every=10 * total, log_every=e2e.log_every,
                      cache_dir=str(workdir / "cache")),
        preprocess=PreprocessConfig(spacing_mm=e2e.preprocess_spacing_mm),
        superpixels=SuperpixelConfig(implementation=SUPERPIXEL_IMPLEMENTATION),
        augment=AugmentConfig(image_size=setting.image_size),
        model=ModelConfig(backbone=setting.backbone, local_levels=BENCH_LOCAL_LEVELS),
    )
    t1 = time.perf_counter()
    with contextlib.nullcontext() if prefetch else plain_batches():
        run_dir = pretrain(cfg, progress=False)
    wall = time.perf_counter() - t1
    rows = [r for r in read_metrics(run_dir) if r["step"] >= e2e.warmup]
    if len(rows) < 2:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has {len(rows)} rows after warm-up; need 2")
    steps = rows[-1]["step"] - rows[0]["step"]
    seconds = rows[-1]["time"] - rows[0]["time"]
    if seconds <= 0:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: no time elapsed between steps "
                           f"{rows[0]['step']} and {rows[-1]['step']}")
    card = json.loads((run_dir / "run_card.json").read_text())
    return {"warmup_steps": rows[0]["step"], "timed_steps": steps, "step_s_mean": seconds / steps,
            "step_s_median": None, "step_s_min": None,
            "data_generation_s": round(t_data, 2), "pretrain_wall_s": round(wall, 2),
            "slices": card.get("slices"), "canvas": card.get("canvas"), "workers": e2e.workers,
            "superpixels": SUPERPIXEL_IMPLEMENTATION, "prefetch": prefetch}


# ----------------------------------------------------------------------------- driver


@dataclass
class Plan:
    """What one run does: a named preset with the command line's overrides applied."""

    name: str
    preset: Preset
    device: torch.device
    out: Path | None
    cudnn_benchmark: bool = False
    only: tuple[str, ...] | None = None  # run only these configurations
    lrc_baseline: Path | None = None  # an older losses/lrc.py for the LRC-alone rows


def environment(device: torch.device) -> dict[str, Any]:
    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device),
           "superpixels": SUPERPIXEL_IMPLEMENTATION}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    for name in ("monai", "numpy", "numba", "scikit-image"):
        with contextlib.suppress(Exception):
            env[name] = importlib.metadata.version(name)
    return env


def _finish_row(row: dict[str, Any], floor_s: float | None) -> dict[str, Any]:
    mean = row.get("step_s_mean")
    if mean:
        row["pairs_per_s"] = round(row["batch"] / mean, 2)
        row["step_ms"] = round(1000 * mean, 2)
        if floor_s:
            row["floor_ratio"] = round(mean / floor_s, 4)
    return row


def format_row(row: dict[str, Any]) -> str:
    def f(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    return (f"{row['setting']:<24} {row['config']:<16} {row['mode']:<8} {row['status']:<8} "
            f"{f('step_ms', '10.1f')} {f('pairs_per_s', '10.1f')} {f('floor_ratio', '8.3f')} "
            f"{f('peak_mem_gib', '8.2f')}")


HEADER = (f"{'setting':<24} {'config':<16} {'mode':<8} {'status':<8} {'step_ms':>10} "
          f"{'pairs/s':>10} {'/floor':>8} {'mem_GiB':>8}")


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, per setting, from the best (eager or compiled) rows."""
    out = []
    for setting in sorted({r["setting"] for r in rows}):
        ok = [r for r in rows if r["setting"] == setting and r["status"] == "ok"]
        lrc = [r for r in ok if r["config"] == "moco_lrc_pixel" and r.get("floor_ratio")]
        e2e = [r for r in ok if r["config"] == "e2e" and r["mode"] == "eager"]
        if lrc:
            best_ratio = min(lrc, key=lambda r: r["floor_ratio"])
            out.append({"setting": setting, "target": "MoCo+LRC step <= 1.15 x floor",
                        "value": best_ratio["floor_ratio"], "mode": best_ratio["mode"],
                        "met": best_ratio["floor_ratio"] <= 1.15})
            best_rate = max(lrc, key=lambda r: r["pairs_per_s"])
            if (best_rate["backbone"], best_rate["image_size"]) == ("resnet50", 224):
                    out.append({"setting": setting, "target": ">= 1000 pairs/s (resnet50, 224px)",
                            "value": best_rate["pairs_per_s"], "mode": best_rate["mode"],
                            "met": best_rate["pairs_per_s"] >= 1000})
        eager_lrc = [r for r in lrc if r["mode"] == "eager"]
        if e2e and eager_lrc:
            share = e2e[0]["pairs_per_s"] / eager_lrc[0]["pairs_per_s"]
            out.append({"setting": setting, "target": "end-to-end >= 90% of synthetic (eager)",
                        "value": round(share, 4), "mode": "eager", "met": share >= 0.9})
    return out


def run_lrc_alone(config: str, setting: Setting, inputs: Inputs, plan: Plan,
                  baseline: types.ModuleType | None) -> dict[str, Any]:
    """One LRC-alone row: the "raw" mode's figures, and every mode's in ``modes`` with its
    median relative to raw's (all timed interleaved in one run)."""
    p = plan.preset
    steps, diff = build_lrc_steps(config, setting, inputs, plan.device, baseline)
    stats = time_interleaved(steps, plan.device, max(p.warmup, 2), max(p.steps, LRC_MIN_ROUNDS),
                             p.max_s)
    raw = stats["raw"]["step_s_median"]
    for mode_stats in stats.values():
        mode_stats["median_ratio_to_raw"] = round(mode_stats["step_s_median"] / raw, 4)
    return {**stats["raw"], "modes": stats, "loss_max_abs_diff_to_raw": diff,
            "feature_map": [setting.batch, LRC_DIM, *(2 * [setting.image_size // 4])]}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same-run ratios of issue 18: the LRC-alone modes against "raw" (median per call) and
    the end-to-end step time without / with the prefetcher."""
    out = []
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        for mode, stats in r.get("modes", {}).items():
            if mode != "raw":
                out.append({"setting": r["setting"], "what": f"{r['config']}: {mode} / raw (median)",
                            "value": stats["median_ratio_to_raw"]})
    for setting in sorted({r["setting"] for r in ok}):
        e2e = {r["mode"]: r for r in ok if r["setting"] == setting and r["config"] == "e2e"}
        if "eager" in e2e and "noprefetch" in e2e:
            out.append({"setting": setting, "what": "e2e step time: no prefetcher / prefetcher",
                        "value": round(e2e["noprefetch"]["step_s_mean"] / e2e["eager"]["step_s_mean"], 4)})
    return out


def floor_seconds(floors: dict[tuple[str, str], float], mode: str) -> float | None:
    """t_floor = 2 t_supervised + 2 t_key for ``mode`` (eager/compile), or None if unmeasured.

    The pre-training loop compiles only the online network, so without a compiled key-forward
    row the compiled floor uses the eager key forward.
    """
    sup = floors.get((mode, "supervised"))
    key = floors.get((mode, "key_forward")) or floors.get(("eager", "key_forward"))
    return 2 * sup + 2 * key if sup and key else None


def run_plan(plan: Plan) -> dict[str, Any]:
    started = time.perf_counter()
    p = plan.preset
    report: dict[str, Any] = {"preset": plan.name, "environment": environment(plan.device),
                              "plan": {"warmup": p.warmup, "steps": p.steps,
                                       "warmup_s": p.warmup_s, "max_s": p.max_s,
                                       "cap_s": p.cap_s, "budget_s": p.budget_s,
                                       "compile": list(p.compile),
                                       "e2e": asdict(p.e2e) if p.e2e else None,
                                       "cudnn_benchmark": plan.cudnn_benchmark,
                                       "threads": p.threads},
                              "results": [], "targets": [], "complete": False}

    lrc_baseline = load_lrc_module(plan.lrc_baseline) if plan.lrc_baseline else None
    if plan.lrc_baseline:
        report["plan"]["lrc_baseline"] = str(plan.lrc_baseline)

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        report["targets"] = targets(report["results"])
        report["ratios"] = ratios(report["results"])
        if plan.out is not None:
            atomic_write_json(plan.out, report)

    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="lrcseg_bench_") as tmp:
        for setting in p.settings:
            inputs = make_inputs(setting, plan.device, channels_last=plan.device.type == "cuda")
            floors: dict[tuple[str, str], float] = {}
            jobs: list[tuple[str, str]] = [(c, "eager") for c in MODEL_CONFIGS]
            jobs += [("augment", "eager")] + [(c, "alone") for c in LRC_CONFIGS]
            if p.e2e is not None:
                jobs += [("e2e", "eager"), ("e2e", "noprefetch")]
            jobs += [(c, "compile") for c in MODEL_CONFIGS if c in p.compile]
            if plan.only is not None:
                jobs = [job for job in jobs if job[0] in plan.only]
            for config, mode in jobs:
                row: dict[str, Any] = {"setting": setting.name, "backbone": setting.backbone,
                                       "image_size": setting.image_size, "batch": setting.batch,
                                       "config": config, "mode": mode, "status": "ok"}
                remaining = p.budget_s - (time.perf_counter() - started)
                if remaining <= 0:
                    row.update(status="skipped", error="run time budget spent")
                else:
                    _reset_memory(plan.device)
                    try:
                        cap = p.cap_s * (1.5 if config == "e2e" else 1.0)  # + data prep
                        with time_cap(min(cap, remaining + 30)):
                            if config == "e2e":
                                row.update(run_e2e(setting, p.e2e, plan.device, Path(tmp),
                                                   prefetch=mode != "noprefetch"))
                            elif config in LRC_CONFIGS:
                                row.update(run_lrc_alone(config, setting, inputs, plan, lrc_baseline))
                            else:
                                step = build_step(config, setting, inputs, plan.device,
                                                  compiled=mode == "compile")
                                row.update(time_steps(step, plan.device, p.warmup, p.steps,
                                                      p.warmup_s, p.max_s))
                                del step
                        row.update(_memory(plan.device))
                    except Exception as exc:  # a failed compile or run is a result, not a crash
                        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                                   traceback=traceback.format_exc(limit=6)[-3000:])
                    _reset_memory(plan.device)
                if row["status"] == "ok" and config in ("supervised", "key_forward"):
                    floors[(mode, config)] = row["step_s_mean"]
                floor_s = floor_seconds(floors, "compile" if mode == "compile" else "eager")
                report["results"].append(_finish_row(row, floor_s))
                print(format_row(row), flush=True)
                for name, stats in row.get("modes", {}).items():
                    print(f"    {name:<10} median {1000 * stats['step_s_median']:9.2f} ms  "
                          f"x{stats['median_ratio_to_raw']:.3f} of raw", flush=True)
                if row["status"] == "error":
                    print(f"    {row['error'][:300]}", flush=True)
                if config == "key_forward" and floor_s:
                    for earlier in report["results"]:  # supervised ran before the floor was known
                        if (earlier["setting"], earlier["mode"]) == (setting.name, mode):
                            _finish_row(earlier, floor_s)
                    floor_row = {"setting": setting.name, "backbone": setting.backbone,
                                 "image_size": setting.image_size, "batch": setting.batch,
                                 "config": "floor", "mode": mode, "status": "ok",
                                 "step_s_mean": floor_s, "floor_definition":
                                 "2 x supervised + 2 x key_forward"}
                    report["results"].append(_finish_row(floor_row, floor_s))
                    print(format_row(floor_row), flush=True)
                save()
            del inputs
    report["complete"] = True
    save()
    print("\nratios (same run):", flush=True)
    for r in report["ratios"]:
        print(f"  {r['setting']:<24} {r['what']:<52} {r['value']:>8.3f}", flush=True)
    print("\ntargets:", flush=True)
    for t in report["targets"]:
        print(f"  {t['setting']:<24} {t['target']:<42} {t['value']:>10} ({t['mode']}) "
              f"{'MET' if t['met'] else 'not met'}", flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after each row")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--backbone", default=None, help="override: one setting with this backbone")
    parser.add_argument("--image-size", type=int, default=None, help="override the view side")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--regions", type=int, default=None, help="override regions per image")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--max-s", type=float, default=None, help="timed seconds per configuration")
    parser.add_argument("--budget-s", type=float, default=None, help="whole-run budget (seconds)")
    parser.add_argument("--cap-s", type=float, default=None, help="cap per configuration (seconds)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also torch.compile every model configuration")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (cpu preset: 1, steadier on a shared machine)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (the loops leave it off)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end pretrain run")
    parser.add_argument("--only", default=None,
                        help="comma-separated configurations to run (e.g. lrc_pixel,lrc_region)")
    parser.add_argument("--lrc-baseline", type=Path, default=None,
                        help="an older losses/lrc.py: adds the 'baseline' mode to the LRC-alone rows")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    preset = PRESETS[args.preset]
    if args.device in ("auto", ""):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine")
    settings = preset.settings
    if any(v is not None for v in (args.backbone, args.image_size, args.batch, args.regions)):
        base = settings[0]
        settings = (replace(base, backbone=args.backbone or base.backbone,
                            image_size=args.image_size or base.image_size,
                            batch=args.batch or base.batch,
                            regions=args.regions or base.regions),)
    for s in settings:
        if s.image_size % 32 or s.batch < 2:
            raise SystemExit(f"setting {s.name}: image size must be a multiple of 32, batch >= 2")
    compile_ = preset.compile
    if args.compile is True:
        compile_ = MODEL_CONFIGS
    elif args.compile is False:
        compile_ = ()
    overridden = replace(
        preset, settings=settings,
        warmup=args.warmup if args.warmup is not None else preset.warmup,
        steps=args.steps or preset.steps, max_s=args.max_s or preset.max_s,
        budget_s=args.budget_s or preset.budget_s, cap_s=args.cap_s or preset.cap_s,
        compile=tuple(compile_),
        e2e=None if args.no_e2e else preset.e2e, threads=args.threads or preset.threads)
    only = None
    if args.only:
        only = tuple(c.strip() for c in args.only.split(",") if c.strip())
        known = (*MODEL_CONFIGS, "augment", *LRC_CONFIGS, "e2e")
        unknown = [c for c in only if c not in known]
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {unknown}; known: {', '.join(known)}")
    return Plan(name=args.preset, preset=overridden, device=device, out=args.out,
                cudnn_benchmark=bool(args.cudnn_benchmark), only=only,
                lrc_baseline=args.lrc_baseline)


def main(argv: list[str] | None = None) -> int:
    plan = make_plan(parse_args(argv))
    # Off by default, as in the training loops; on with --cudnn-benchmark (an optimisation).
    torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    if plan.preset.threads:
        torch.set_num_threads(plan.preset.threads)
    run_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
