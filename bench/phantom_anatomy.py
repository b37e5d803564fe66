"""Benchmark (issue 29, item 4): phantom anatomy against a real labelled abdominal CT.

Measures :func:`lrcseg.phantoms.realism.anatomy_report` on the real case
(``../shared/data/real_abdomen_ct/Dataset902_RealAbdomen``, TotalSegmentator labels) and on
``--cases`` phantoms of each anatomy version (one dataset per version, ``--seed``, small preset
2 x 2 x 5 mm, written as NIfTI and read back in RAS+ like the real case), and prints per organ:
centroid offset from the vertebral body (LR, AP mm; + = patient right / anterior), position in
the body outline (LR, AP in [0, 1]; 0 = patient left / posterior), volume (mL), z span below
the liver's top (the real case's liver top is the scan's top slice: the dome is cut off), the
organs enclosing it; then the touching pairs (contact area mm^2). Phantom numbers are means
over the cases. With ``--realism``, also the realism report (intensity-interval Dice,
superpixel ASA; slices at 3 mm) of both versions' datasets. Writes JSON.

    python bench/phantom_anatomy.py [--cases 4] [--seed 0] [--realism]
                                    [--json bench/results/phantom_anatomy.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from lrcseg.io_utils import atomic_write_json
from lrcseg.phantoms.generate import ANATOMY_VERSIONS, LABELS, PRESETS, write_phantom_dataset
from lrcseg.phantoms.realism import anatomy_report, load_canonical_case, realism_report

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_abdomen_ct" / "Dataset902_RealAbdomen"
# the real case's label names -> the phantoms' (organs without a phantom label are kept as-is)
ALIASES = {"inferior_vena_cava": "ivc"}
COLUMNS = (("from_spine_lr_mm", "LR mm", "{:+.0f}"), ("from_spine_ap_mm", "AP mm", "{:+.0f}"),
           ("lr_rel", "LR rel", "{:.2f}"), ("ap_rel", "AP rel", "{:.2f}"),
           ("volume_ml", "mL", "{:.0f}"), ("z_top_mm", "top mm", "{:.0f}"),
           ("z_bottom_mm", "bottom mm", "{:.0f}"))
SPINE_KEYS = ("lr_rel", "ap_rel", "half_width_mm", "half_depth_mm")


def measure(image: Path, label: Path, names: dict[str, int]) -> dict:
    hu, lab, spacing = load_canonical_case(image, label)
    report = anatomy_report(hu, lab, spacing, names)
    report["organs"] = {ALIASES.get(k, k): v for k, v in report["organs"].items()}
    for pair in report["touching"]:
        pair["organs"] = sorted(ALIASES.get(k, k) for k in pair["organs"])
    return report


def summarise(reports: list[dict]) -> dict:
    """Means over cases: organs (each column, enclosure fractions), spine, touching pairs
    (mean area over all cases, and in how many cases they touch)."""
    organs: dict[str, dict] = {}
    for name in LABELS:
        rows = [r["organs"][name] for r in reports if name in r["organs"]]
        if not rows:
            continue
        organs[name] = {key: float(np.mean([row[key] for row in rows])) for key, _, _ in COLUMNS}
        enclosing = {o for row in rows for o in row["enclosed_by"]}
        organs[name]["enclosed_by"] = {o: float(np.mean([row["enclosed_by"].get(o, 0.0) for row in rows]))
                                       for o in sorted(enclosing)}
        organs[name]["cases"] = len(rows)
    touching: dict[str, dict] = {}
    for r in reports:
        for pair in r["touching"]:
            entry = touching.setdefault("-".join(pair["organs"]), {"area_mm2": 0.0, "cases": 0})
            entry["area_mm2"] += pair["area_mm2"] / len(reports)
            entry["cases"] += 1
    spine = {k: float(np.mean([r["spine"][k] for r in reports])) for k in SPINE_KEYS}
    return {"organs": organs, "spine": spine, "touching": touching, "cases": len(reports)}


def format_tables(results: dict[str, dict]) -> str:
    sources = list(results)
    lines = ["Vertebral body: " + "; ".join(
        f"{s} AP rel {results[s]['spine']['ap_rel']:.2f}, half-width {results[s]['spine']['half_width_mm']:.0f} mm"
        for s in sources), "",
        "Per organ, each cell: " + " / ".join(sources), "",
        "| organ | " + " | ".join(label for _, label, _ in COLUMNS) + " | enclosed by |",
        "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name in LABELS:
        if name == "background":
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            cells.append(" / ".join(fmt.format(results[s]["organs"][name][key]) if name in results[s]["organs"]
                                    else "-" for s in sources))
        enclosed = "; ".join(f"{s}: " + ", ".join(f"{o} {f:.2f}" for o, f in results[s]["organs"][name]["enclosed_by"].items())
                             for s in sources if name in results[s]["organs"]
                             and results[s]["organs"][name]["enclosed_by"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {enclosed or '-'} |")
    pairs = sorted({p for s in sources for p in results[s]["touching"]
                    if all(o in LABELS for o in p.split("-"))})
    lines += ["", "Touching pairs: mean contact area mm^2 (cases touching / cases)", "",
              "| pair | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for pair in pairs:
        cells = []
        for s in sources:
            entry = results[s]["touching"].get(pair)
            cells.append(f"{entry['area_mm2']:.0f} ({entry['cases']}/{results[s]['cases']})" if entry
                         else f"0 (0/{results[s]['cases']})")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=Path, default=REAL, help="the real labelled dataset (nnU-Net raw)")
    parser.add_argument("--realism", action="store_true",
                        help="also the realism report (interval Dice, superpixels) of both versions")
    parser.add_argument("--json", type=Path, default=Path("bench/results/phantom_anatomy.json"))
    args = parser.parse_args()
    if args.cases < 2:
        parser.error("--cases must be >= 2")

    real_names = json.loads((args.real / "dataset.json").read_text())["labels"]
    real = measure(args.real / "imagesTr" / "case001_0000.nii.gz", args.real / "labelsTr" / "case001.nii.gz",
                   real_names)
    results = {"real": summarise([real])}
    realism = {}
    preset = PRESETS["small"]
    with tempfile.TemporaryDirectory() as tmp:
        for version in ANATOMY_VERSIONS:
            data = write_phantom_dataset(Path(tmp) / f"anatomy{version}", args.cases, args.seed,
                                         preset["spacing_mm"], preset["shape"], montage=False,
                                         anatomy=version)
            reports = [measure(data / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz",
                               data / "labelsTr" / f"phantom_{i:03d}.nii.gz", LABELS)
                       for i in range(args.cases)]
            results[f"anatomy{version}"] = summarise(reports)
            if args.realism:
                report = realism_report(data, max_cases=args.cases, spacing_mm=3.0,
                                        out_json=Path(tmp) / f"realism{version}.json")
                realism[f"anatomy{version}"] = {"intensity_interval": report["intensity_interval"],
                                                "superpixels": report["superpixels"],
                                                "within_targets": report["within_targets"]}
    print(f"Real case vs {args.cases} phantoms per anatomy version (seed {args.seed}, small preset)\n")
    print(format_tables(results))
    if realism:
        print("\nRealism (slices at 3 mm): intensity-interval Dice fit / other; superpixel ASA, "
              "boundary recall\n")
        print("| | " + " | ".join(realism) + " |\n|---|" + "---|" * len(realism))
        for organ in realism["anatomy1"]["intensity_interval"]:
            print(f"| {organ} Dice fit / other | " + " | ".join(
                f"{r['intensity_interval'][organ]['dice_fit']:.3f} / {r['intensity_interval'][organ]['dice_other']:.3f}"
                for r in realism.values()) + " |")
        for scale in realism["anatomy1"]["superpixels"]:
            print(f"| {scale} ASA / recall / regions | " + " | ".join(
                f"{r['superpixels'][scale]['asa']:.3f} / {r['superpixels'][scale]['boundary_recall']:.3f}"
                f" / {r['superpixels'][scale]['regions_median']:.0f}" for r in realism.values()) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, {"cases": args.cases, "seed": args.seed, "preset": "small",
                                  "real_dataset": str(args.real), "anatomy": results, "realism": realism})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
