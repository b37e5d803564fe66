"""Benchmark (issue 3, third criterion): a small U-Net trained briefly on 2 phantom cases must
beat the best intensity-interval model fit on the same 2 cases by >= 0.15 Dice on liver and
spleen, both evaluated on other phantom cases.

1. Writes a phantom dataset (small preset, 2 x 2 x 5 mm) whose splits.json has 2 "train"
   cases and the rest "test" (no pre-training pool).
2. Intervals: per organ, the single HU interval ``[lo, hi]`` (5 HU grid, window -175..250)
   maximising the Dice of ``body & lo <= HU <= hi`` on the 2 train cases pooled
   (:func:`lrcseg.phantoms.realism.interval_dice_table`), applied to each test case; on slices
   preprocessed like the network's input (``--spacing`` mm in-plane, body mask).
3. U-Net: ResNet-18 FlexibleUNet from scratch, ``lrcseg.train.finetune.finetune`` with
   labeled=2, evaluated with ``lrcseg.evaluate.run.evaluate_model`` on the test split
   (prediction mapped back to the original grid).
Prints a table (mean Dice over the test cases) and writes JSON.

    python bench/unet_vs_intervals.py [--work /tmp/unet_vs_intervals] [--cases 6] [--steps 300]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from lrcseg.config import FinetuneConfig, ModelConfig, OptimConfig, PreprocessConfig, RunConfig
from lrcseg.data.layouts import load_dataset
from lrcseg.io_utils import atomic_write_json
from lrcseg.phantoms.generate import LABELS, PRESETS, write_phantom_dataset
from lrcseg.phantoms.realism import HU_STEP, WINDOW_HU, _hu_bins, _load_case, interval_dice_table

ORGANS = ("liver", "spleen")
MARGIN = 0.15


def fit_intervals(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, tuple[int, int]]:
    """Best bin interval (i, j) per organ on the pooled cases [(hu (Z,H,W), body, label)]."""
    hu = np.concatenate([c[0][c[1]] for c in cases])
    lab = np.concatenate([c[2][c[1]] for c in cases])
    out = {}
    for name in ORGANS:
        dice, _ = interval_dice_table(hu, lab == LABELS[name], np.ones(hu.shape, bool))
        i, j = np.unravel_index(np.nanargmax(dice), dice.shape)
        out[name] = (int(i), int(j))
    return out


def interval_dice(intervals: dict[str, tuple[int, int]], hu: np.ndarray, body: np.ndarray,
                  lab: np.ndarray) -> dict[str, float]:
    n_bins = len(np.arange(*WINDOW_HU, HU_STEP))
    bins = _hu_bins(hu, HU_STEP, n_bins)
    result = {}
    for name, (i, j) in intervals.items():
        pred = body & (bins >= i) & (bins <= j)
        ref = lab == LABELS[name]
        denom = pred.sum() + ref.sum()
        result[name] = float(2.0 * (pred & ref).sum() / denom) if denom else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/unet_vs_intervals"))
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--spacing", type=float, default=3.0, help="preprocessed in-plane spacing, mm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=Path("bench_unet_vs_intervals.json"))
    args = parser.parse_args()
    if args.cases < 3:
        parser.error("--cases must be >= 3 (2 train + >= 1 test)")

    t0 = time.time()
    if args.work.exists():
        shutil.rmtree(args.work)
    data = args.work / "phantoms"
    preset = PRESETS["small"]
    write_phantom_dataset(data, args.cases, args.seed, preset["spacing_mm"], preset["shape"],
                          pretrain_fraction=0.0, train_fraction=2.0 / args.cases + 1e-6, montage=False)
    dataset = load_dataset(data)
    train_ids, test_ids = dataset.splits["train"], dataset.splits["test"]
    assert len(train_ids) == 2, dataset.splits
    t_data = time.time() - t0

    pre_cfg = PreprocessConfig(window_hu=WINDOW_HU, spacing_mm=args.spacing)

    def load(case_id: str):
        hu, _, body, lab = _load_case(data / "imagesTr" / f"{case_id}_0000.nii.gz",
                                      data / "labelsTr" / f"{case_id}.nii.gz", pre_cfg)
        return hu, body, lab

    intervals = fit_intervals([load(c) for c in train_ids])
    interval_cases = {c: interval_dice(intervals, *load(c)) for c in test_ids}
    edges = np.arange(*WINDOW_HU, HU_STEP)
    interval_hu = {n: [float(edges[i]), float(edges[j] + HU_STEP)] for n, (i, j) in intervals.items()}

    from lrcseg.evaluate.run import evaluate_model
    from lrcseg.runtime import resolve_device
    from lrcseg.train.finetune import finetune

    t1 = time.time()
    run_out = args.work / "runs" / "unet_scratch"
    cfg = FinetuneConfig(
        dataset=str(data), init="scratch", labeled=2, split_seed=args.seed,
        run=RunConfig(out=str(run_out), steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      device=args.device, checkpoint_every=args.steps, log_every=max(1, args.steps // 10),
                      cache_dir=str(args.work / "cache")),
        preprocess=PreprocessConfig(spacing_mm=args.spacing), model=ModelConfig(backbone="resnet18"),
        image_size=args.image_size, optim=OptimConfig(lr=1e-3, warmup_steps=10))
    finetune(cfg, progress=False)
    t_train = time.time() - t1
    result = evaluate_model(run_out, data, "test", resolve_device(args.device), progress=False)

    rows = {}
    for name in ORGANS:
        unet = float(result["mean"][name]["dice"])
        intv = float(np.nanmean([interval_cases[c][name] for c in test_ids]))
        rows[name] = {"unet": unet, "interval": intv, "difference": unet - intv,
                      "pass": bool(unet - intv >= MARGIN), "interval_hu": interval_hu[name]}
    print(f"U-Net (ResNet-18, scratch, {args.steps} steps, {args.image_size} px, {args.spacing:g} mm) vs "
          f"best intensity interval, both fit on {train_ids}, Dice on {len(test_ids)} test cases")
    print("| organ | interval HU | interval Dice | U-Net Dice | difference | >= 0.15 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        lo, hi = r["interval_hu"]
        print(f"| {name} | {lo:.0f}..{hi:.0f} | {r['interval']:.3f} | {r['unet']:.3f} "
              f"| {r['difference']:+.3f} | {'yes' if r['pass'] else 'NO'} |")
    atomic_write_json(args.json, {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_cases": train_ids, "test_cases": test_ids, "organs": rows,
        "interval_per_case": interval_cases,
        "unet_per_case": {c: {n: result["cases"][c][n]["dice"] for n in ORGANS} for c in test_ids}
        if isinstance(result.get("cases"), dict) else None,
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(time.time() - t0, 1)},
    })
    print(f"wrote {args.json} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
