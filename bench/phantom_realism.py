"""Benchmark: how much freshly generated phantoms behave like real abdominal CT (issue 3).

For each requested configuration, writes a phantom dataset (``--cases`` cases, ``--seed``) and
runs :func:`lrcseg.phantoms.realism.realism_report` on it: best single intensity interval per
organ fit on the first case (Dice fit / applied to the others) and Felzenszwalb quality
(``compute_regions``, skimage implementation: regions per slice, ASA, boundary recall) at scale
100 and 200, printed beside the real-CT figures and targets. Configurations (``--presets``):
    default  0.8 x 0.8 x 2.5 mm phantoms, slices at 1.5 mm (the real-CT protocol)
    small    2 x 2 x 5 mm phantoms, slices at 1.5 mm
    demo     3 x 3 x 6 mm phantoms, slices at 3 mm (the demo's PreprocessConfig(spacing_mm=3.0))

    python bench/phantom_realism.py [--presets default small demo] [--cases 4] [--seed 0]
                                    [--anatomy 1] [--json bench_phantom_realism.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lrcseg.io_utils import atomic_write_json
from lrcseg.phantoms.generate import ANATOMY_VERSIONS, PRESETS, default_shape, write_phantom_dataset
from lrcseg.phantoms.realism import format_realism_table, realism_report

CONFIGS: dict[str, dict] = {
    "default": {"spacing_mm": PRESETS["default"]["spacing_mm"], "shape": PRESETS["default"]["shape"],
                "slice_spacing_mm": 1.5},
    "small": {"spacing_mm": PRESETS["small"]["spacing_mm"], "shape": PRESETS["small"]["shape"],
              "slice_spacing_mm": 1.5},
    "demo": {"spacing_mm": (3.0, 3.0, 6.0), "shape": default_shape((3.0, 3.0, 6.0)), "slice_spacing_mm": 3.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=sorted(CONFIGS), default=["default", "small", "demo"])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anatomy", type=int, choices=ANATOMY_VERSIONS, default=1,
                        help="the phantoms' anatomy version (generate.py)")
    parser.add_argument("--json", type=Path, default=Path("bench_phantom_realism.json"))
    args = parser.parse_args()
    if args.cases < 2:
        parser.error("--cases must be >= 2 (one fit case and at least one other)")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            cfg = CONFIGS[name]
            t0 = time.time()
            out = write_phantom_dataset(Path(tmp) / name, args.cases, args.seed, cfg["spacing_mm"],
                                        cfg["shape"], montage=False, anatomy=args.anatomy)
            t_gen = time.time() - t0
            report = realism_report(out, max_cases=args.cases, spacing_mm=cfg["slice_spacing_mm"],
                                    out_json=Path(tmp) / f"{name}_realism.json")
            sp = cfg["spacing_mm"]
            print(f"\n## {name} (anatomy {args.anatomy}): {args.cases} phantoms {'x'.join(map(str, cfg['shape']))} at "
                  f"{sp[0]:g}x{sp[1]:g}x{sp[2]:g} mm (seed {args.seed}), slices at "
                  f"{cfg['slice_spacing_mm']:g} mm; generation {t_gen / args.cases:.1f} s/case\n")
            print(format_realism_table(report))
            failed = [k for k, ok in report["within_targets"].items() if not ok]
            print(f"\nwithin targets: {'all' if not failed else 'NOT ' + ', '.join(failed)}")
            report.pop("dataset")
            results[name] = {"phantom_spacing_mm": list(sp), "shape": list(cfg["shape"]),
                             "seconds_per_case": round(t_gen / args.cases, 2), **report}
    atomic_write_json(args.json, {"cases": args.cases, "seed": args.seed, "anatomy": args.anatomy,
                                  "configs": results})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
