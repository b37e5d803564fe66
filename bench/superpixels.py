"""Benchmark: our numba Felzenszwalb vs skimage's, per core, at 256^2 and 512^2.

Slices: the real chest CT (``/work/shared/data/chest_ct_dicom`` or --ct) preprocessed to 256^2
and 512^2 canvases, and slices of synthetic abdominal phantoms (lrcseg.phantoms.generate).
Per size and source: median ms per slice for each implementation (one process, one thread),
speed ratio, adjusted Rand index on body pixels (min/median) and exact-match share; then the
region-cache build rate over all cores on the real CT at the default settings.

    python bench/superpixels.py [--ct DIR] [--out bench_superpixels.json] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from lrcseg.config import PreprocessConfig, SuperpixelConfig
from lrcseg.data.layouts import Case
from lrcseg.data.preprocess import preprocess_volume
from lrcseg.data.readers import read_image
from lrcseg.data.slice_cache import SliceCache
from lrcseg.io_utils import atomic_write_json
from lrcseg.phantoms.generate import TISSUES, generate_phantom
from lrcseg.superpixels.felzenszwalb import adjusted_rand_index, felzenszwalb_fast
from lrcseg.superpixels.region_cache import RegionCache
from lrcseg.superpixels.regions import min_size_pixels

DEFAULT_CT = Path("/work/shared/data/chest_ct_dicom")


def real_slices(ct: Path, size: int) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """All slices of the CT preprocessed so that the in-plane canvas is about size^2."""
    volume = read_image(ct)
    spacing = volume.spacing[0] * volume.array.shape[0] / size
    pre = preprocess_volume(volume, PreprocessConfig(spacing_mm=spacing))
    images = [pre.image[z, 0].astype(np.float16).astype(np.float64) for z in range(len(pre.image))]
    return images, list(pre.body), spacing


def phantom_slices(size: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Axial slices of synthetic abdominal phantoms (:func:`lrcseg.phantoms.generate.generate_phantom`)
    on a size^2 canvas at 1.5 mm * 512 / size, 8 slices 20 mm apart per phantom (dome down),
    windowed -175..250 HU and float16-quantised like the slice cache."""
    spacing = 1.5 * 512 / size
    images, bodies = [], []
    seed = 0
    while len(images) < count:
        hu, _, tissue = generate_phantom(np.random.default_rng(seed), (size, size, 8),
                                         (spacing, spacing, 20.0), return_tissues=True)
        seed += 1
        for z in range(hu.shape[2]):
            if len(images) == count:
                break
            img = np.clip((hu[:, :, z] + 175.0) / 425.0, 0.0, 1.0)
            images.append(img.astype(np.float16).astype(np.float64))
            bodies.append(ndimage.binary_fill_holes(tissue[:, :, z] != TISSUES["air"]))
    return images, bodies, spacing


def compare(images, bodies, spacing: float, cfg: SuperpixelConfig, repeat: int) -> dict:
    min_size = min_size_pixels(cfg.min_size_mm2, spacing)
    t_ref, t_ours, aris, exact = [], [], [], 0
    for img, body in zip(images, bodies, strict=True):
        for _ in range(repeat):
            t0 = time.perf_counter()
            ref = felzenszwalb(img, scale=cfg.scale, sigma=cfg.sigma, min_size=min_size)
            t1 = time.perf_counter()
            ours = felzenszwalb_fast(img, scale=cfg.scale, sigma=cfg.sigma, min_size=min_size)
            t2 = time.perf_counter()
            t_ref.append(t1 - t0)
            t_ours.append(t2 - t1)
        aris.append(adjusted_rand_index(ours[body], ref[body]) if body.any() else 1.0)
        exact += int(np.array_equal(ours, ref))
    ms_ref, ms_ours = 1e3 * np.median(t_ref), 1e3 * np.median(t_ours)
    return {"slices": len(images), "ms_skimage": round(ms_ref, 2), "ms_ours": round(ms_ours, 2),
            "speedup": round(ms_ref / ms_ours, 2), "ari_min": round(min(aris), 5),
            "ari_median": round(float(np.median(aris)), 5), "exact_share": round(exact / len(images), 3)}


def cache_build_rate(ct: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        slices = SliceCache(PreprocessConfig(), tmp)
        case = Case("chest_ct", ct)
        slices.get(case)  # time the superpixels only
        stats = RegionCache(slices, SuperpixelConfig()).build([case], workers=0, progress=False)
    return {"workers": os.cpu_count(), **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT)
    parser.add_argument("--out", type=Path, default=Path("bench_superpixels.json"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--phantoms", type=int, default=16, help="phantom slices per size")
    args = parser.parse_args()

    cfg = SuperpixelConfig()
    felzenszwalb_fast(np.zeros((8, 8)))  # compile (or load the numba cache) outside the timing
    rows = []
    for size in (256, 512):
        sources = [("phantom", *phantom_slices(size, args.phantoms))]
        if args.ct.is_dir():
            sources.insert(0, ("real", *real_slices(args.ct, size)))
        for name, images, bodies, spacing in sources:
            row = {"source": name, "size": size, "spacing_mm": round(spacing, 3),
                   **compare(images, bodies, spacing, cfg, args.repeat)}
            rows.append(row)
            print(f"{name:8s} {size:4d}^2  n={row['slices']:3d}  skimage {row['ms_skimage']:7.1f} ms  "
                  f"ours {row['ms_ours']:6.1f} ms  x{row['speedup']:4.1f}  ARI min {row['ari_min']:.4f} "
                  f"median {row['ari_median']:.4f}  exact {row['exact_share']:.0%}", flush=True)
    result = {"superpixels": vars(cfg), "rows": rows,
              "ari_min_overall": min(r["ari_min"] for r in rows),
              "exact_share_overall": round(sum(r["exact_share"] * r["slices"] for r in rows)
                                           / sum(r["slices"] for r in rows), 3)}
    if args.ct.is_dir():
        result["cache_build"] = cache_build_rate(args.ct)
        print(f"region cache build: {result['cache_build']['slices_per_s']} slices/s "
              f"on {result['cache_build']['workers']} cores")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
