"""Does fine-tuning generalise? The CPU preset fine-tuned on held-out data that is not a test split.

Two checks (issue 28), each run with the chosen augmentation variants (``--variants``; the
variants differ only in the sections ``VARIANTS`` sets, so their difference is that
augmentation's effect in one run): the intensity augmentation off / on, and on with the
organ contrast augmentation (``organ_contrast``: shift 100 HU, the default; ``_150``):

- ``phantoms``: cross-phase. The CPU-protocol phantoms (30 cases, seed 0, 2 x 2 x 5 mm) are
  written once; from their *pool* split (never the evidence's test split) one portal-venous
  case is fine-tuned on and the other pool cases are scored, grouped by contrast phase
  (dataset.json records each phantom's phase); then the same from one unenhanced case.
  Reported: mean Dice per phase and the gap between the phases.
- ``real``: the one labelled real CT (``../shared/data/real_abdomen_ct``, or
  ``$LRCSEG_REAL_CT``) split at the middle of its labelled slab (the axial slices that hold
  any label; the scan reaches further, into the pelvis, unlabelled): fine-tuned on the upper
  half of the slab, scored on the lower half, and the reverse. The halves share the organs
  that cross the cut (liver, kidneys, aorta, IVC, ...); an organ in neither the reference nor
  the prediction of a half is not scored. Labels are
  TotalSegmentator predictions: Dice is agreement with it.

Each fine-tune runs in its own process (peak memory = that process's maximum RSS) and prints
Dice per organ, wall time and peak memory; everything lands in ``--out`` (JSON) and a table.

    python bench/finetune_generalisation.py --out bench/results/finetune_generalisation.json \
        [--checks phantoms,real] [--config configs/finetune_cpu.yaml] [--steps N] [--work DIR]
        [--first-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lrcseg.io_utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = Path(os.environ.get("LRCSEG_REAL_CT", ROOT.parent / "shared" / "data" / "real_abdomen_ct"
                              / "Dataset902_RealAbdomen"))
PHANTOMS = {"cases": 30, "seed": 0, "spacing_mm": (2.0, 2.0, 5.0)}  # the CPU evidence's
#: variant -> the fine-tuning config sections it sets (everything else is the preset's)
VARIANTS = {
    "intensity_on": {"intensity": {"enabled": True}, "organ_contrast": {"enabled": False}},
    "intensity_off": {"intensity": {"enabled": False}, "organ_contrast": {"enabled": False}},
    "organ_contrast": {"intensity": {"enabled": True}, "organ_contrast": {"enabled": True}},
    "organ_contrast_150": {"intensity": {"enabled": True},
                           "organ_contrast": {"enabled": True, "shift_hu": 150.0}},
}
FIRST = ("from_portal_venous", "from_upper")  # the usual direction of each check


def _link_case(src: Path, dst: Path, case_id: str, new_id: str) -> None:
    for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        os.symlink(src / sub / f"{case_id}{suffix}", dst / sub / f"{new_id}{suffix}")


def _dataset(dst: Path, labels: dict, train: list[str], test: list[str]) -> Path:
    """An nnU-Net raw dataset whose splits.json fixes the labelled and the scored cases."""
    (dst / "dataset.json").write_text(json.dumps({
        "name": dst.name, "channel_names": {"0": "CT"}, "labels": labels,
        "numTraining": len(train) + len(test), "file_ending": ".nii.gz"}))
    (dst / "splits.json").write_text(json.dumps({"pretrain": [], "train": train, "test": test}))
    return dst


def phantom_tasks(work: Path) -> list[dict]:
    """Cross-phase tasks on the pool split: one case of each phase trains, the rest score."""
    from lrcseg.phantoms.generate import write_phantom_dataset

    source = work / "phantoms"
    if not source.exists():
        write_phantom_dataset(source, PHANTOMS["cases"], seed=PHANTOMS["seed"],
                              spacing_mm=PHANTOMS["spacing_mm"], montage=False)
    meta = json.loads((source / "dataset.json").read_text())
    pool = json.loads((source / "splits.json").read_text())["pretrain"]
    phases = meta["phantoms"]["phases"]
    tasks = []
    for phase in ("portal_venous", "unenhanced"):
        train = [c for c in pool if phases[c] == phase][:1]
        if not train:
            continue
        test = [c for c in pool if c not in train]
        dst = work / f"phantoms_from_{phase}"
        if not dst.exists():
            for case_id in train + test:
                _link_case(source, dst, case_id, case_id)
            _dataset(dst, meta["labels"], train, test)
        tasks.append({"check": "phantoms", "name": f"from_{phase}", "dataset": str(dst),
                      "groups": {c: phases[c] for c in test}, "train": train})
    return tasks


def _write_half(image, label, z: slice, dst: Path, case_id: str) -> None:
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([0, 0, z.start]) + image.affine[:3, 3]
    for sub, suffix, vol in (("imagesTr", "_0000.nii.gz", image), ("labelsTr", ".nii.gz", label)):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        data = np.asanyarray(vol.dataobj)[:, :, z]
        nib.save(nib.Nifti1Image(data, affine, vol.header), dst / sub / f"{case_id}{suffix}")


def real_tasks(work: Path) -> list[dict]:
    """The real case's labelled slab split in an upper and a lower half (RAS: +z superior),
    each half training once."""
    if not REAL_CT.is_dir():
        print(f"real check skipped: {REAL_CT} not found (set LRCSEG_REAL_CT)", file=sys.stderr)
        return []
    meta = json.loads((REAL_CT / "dataset.json").read_text())
    case = sorted(p.name[: -len("_0000.nii.gz")] for p in (REAL_CT / "imagesTr").iterdir())[0]
    image = nib.as_closest_canonical(nib.load(REAL_CT / "imagesTr" / f"{case}_0000.nii.gz"))
    label = nib.as_closest_canonical(nib.load(REAL_CT / "labelsTr" / f"{case}.nii.gz"))
    labelled = np.flatnonzero(np.asanyarray(label.dataobj).any(axis=(0, 1)))
    low, high = int(labelled[0]), int(labelled[-1]) + 1
    mid = (low + high) // 2
    halves = {"lower": slice(low, mid), "upper": slice(mid, high)}
    tasks = []
    for train, test in (("upper", "lower"), ("lower", "upper")):
        dst = work / f"real_from_{train}"
        if not dst.exists():
            for name in (train, test):
                _write_half(image, label, halves[name], dst, name)
            _dataset(dst, meta["labels"], [train], [test])
        tasks.append({"check": "real", "name": f"from_{train}", "dataset": str(dst),
                      "groups": {test: "held-out half"}, "train": [train]})
    return tasks


def run_one(task: dict, variant: str, config: str, steps: int | None, out_dir: Path) -> dict:
    """Fine-tune and score in this process (``--one``); returns the JSON row."""
    import torch

    from lrcseg.config import FinetuneConfig, absolute_paths, load_config
    from lrcseg.evaluate.run import evaluate_model
    from lrcseg.train.finetune import finetune

    overrides = {"dataset": task["dataset"], "labeled": len(task["train"]), "init": "scratch",
                 **VARIANTS[variant],
                 "run": {"out": str(out_dir), "device": "cpu"}}
    if steps is not None:
        overrides["run"]["steps"] = steps
    cfg = absolute_paths(load_config(FinetuneConfig, config, overrides))
    start = time.perf_counter()
    run_dir = finetune(cfg, progress=False)
    train_s = time.perf_counter() - start
    result = evaluate_model(run_dir, task["dataset"], "test", "cpu", progress=False)
    by_group: dict[str, list[float]] = {}
    for case_id, scores in result["cases"].items():
        dice = [s["dice"] for s in scores.values() if s["dice"] is not None]
        by_group.setdefault(task["groups"][case_id], []).append(float(np.mean(dice)))
    return {"check": task["check"], "task": task["name"], "variant": variant,
            "train_cases": task["train"], "steps": cfg.run.steps, "threads": torch.get_num_threads(),
            "train_seconds": round(train_s, 1), "wall_seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "mean_dice": result["mean_dice"],
            "dice_by_group": {g: float(np.mean(v)) for g, v in sorted(by_group.items())},
            "organ_dice": {o: m["dice"] for o, m in result["mean"].items()}}


def table(rows: list[dict]) -> str:
    lines = ["| check | task | variant | steps | mean Dice by group | big organs | wall s | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        groups = ", ".join(f"{g} {v:.3f}" for g, v in r["dice_by_group"].items())
        big = ", ".join(f"{o} {r['organ_dice'][o]:.2f}" for o in
                        ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "aorta",
                         "inferior_vena_cava") if r["organ_dice"].get(o) is not None)
        lines.append(f"| {r['check']} | {r['task']} | {r['variant']} | {r['steps']} | {groups} | "
                     f"{big} | {r['wall_seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/finetune_generalisation.json")
    parser.add_argument("--checks", default="phantoms,real")
    parser.add_argument("--variants", default="intensity_on,intensity_off",
                        help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--config", default=str(ROOT / "configs" / "finetune_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="override the preset's budget")
    parser.add_argument("--work", default=None, help="folder for datasets and runs (default: temp)")
    parser.add_argument("--first-only", action="store_true",
                        help="only the usual direction (train on portal-venous / the upper half)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: a task JSON
    args = parser.parse_args()
    if args.one:
        task, variant, run_out = json.loads(args.one)
        print(json.dumps(run_one(task, variant, args.config, args.steps, Path(run_out))))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="lrcseg_ft_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    checks = args.checks.split(",")
    tasks = (phantom_tasks(work) if "phantoms" in checks else []) + (
        real_tasks(work) if "real" in checks else [])
    # the phase / half that trains first from each check, then the reverse ones
    tasks = [t for t in tasks if t["name"] in FIRST] + [t for t in tasks if t["name"] not in FIRST]
    if args.first_only:
        tasks = [t for t in tasks if t["name"] in FIRST]
    rows = []
    out = Path(args.out)
    for task in tasks:
        for variant in args.variants.split(","):
            run_out = work / "runs" / f"{task['check']}_{task['name']}_{variant}"
            shutil.rmtree(run_out, ignore_errors=True)  # the bench's own scratch folder
            command = [sys.executable, __file__, "--one", json.dumps([task, variant, str(run_out)]),
                       "--config", args.config] + (["--steps", str(args.steps)] if args.steps else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            atomic_write_json(out, {"config": args.config, "cpu": _cpu(), "rows": rows})
    print(table(rows))
    return 0


def _cpu() -> str:
    from lrcseg.runtime import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
