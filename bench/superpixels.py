"""Benchmark: our numba Felzenszwalb vs skimage's, per core, at 256^2 and 512^2.

Slices: the real chest CT (``/work/shared/data/chest_ct_dicom`` or --ct) preprocessed to 256^2
and 512^2 canvases, and slices of synthetic abdominal phantoms (lrcseg.phantoms.generate).
Per size and source: median ms per slice for each implementation (one process, one thread),
speed ratio, adjusted Rand index on body pixels (min/median) and exact-match share; then the
region-cache build rate over all cores on the real CT at the default settings; then a 3D row
(``volume_rate``): the whole real CT at the default preprocessing, M pixels (voxels) per second
of its slices through ``compute_regions``, of the same slices tiled into one 2D image, and of
the volume through ``compute_supervoxels`` at scale 33 (about as many voxels per region as the
2D defaults give, docs/METHOD.md), one thread each.

    python bench/superpixels.py [--ct DIR] [--out bench_superpixels.json] [--repeat 3]

The 3D row, run once on its own (``volume_rate(DEFAULT_CT, 3)``) on a 2-core AMD EPYC VM
busy with other jobs (load ~3.7, so absolute rates are loose; an earlier, quieter run of the
same code gave 8.2 for the slices and 2.9 for the volume): chest CT at 1.5 x 1.5 x 5 mm,
64 x 287 x 287 = 5.3 M voxels; slices 5.3 M pixels/s, slices tiled into one image 1.4 M
pixels/s, volume 1.7 M voxels/s (5500 regions in 2D, 4245 in 3D). Per element the shared core
runs as fast in 3D as in 2D on a graph of the same size; a slice is faster because its graph
fits the CPU caches.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from lrcseg.superpixels.regions import compute_regions, min_size_pixels
from lrcseg.superpixels.supervoxels import compute_supervoxels

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


def volume_rate(ct: Path, repeat: int) -> dict:
    """The whole CT at the default preprocessing, one thread, best of ``repeat`` runs, in M
    pixels (voxels) per second, body masking and renumbering included: its slices one by one
    (``compute_regions``, defaults), the same slices tiled into one 2D image (a graph as large
    as the volume's: what the caches see) and the volume (``compute_supervoxels`` at scale 33,
    about as many voxels per region as the 2D defaults give)."""
    pre = preprocess_volume(read_image(ct), PreprocessConfig())
    volume = pre.image[:, 0].astype(np.float16).astype(np.float32)
    cfg = SuperpixelConfig()
    cfg_3d = dataclasses.replace(cfg, scale=33.0)
    side = int(np.ceil(np.sqrt(len(volume))))
    pad = side * side - len(volume)

    def tile(a: np.ndarray) -> np.ndarray:
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(side, side, *a.shape[1:]).transpose(0, 2, 1, 3).reshape(side * a.shape[1], -1)

    runs = {
        "slices_2d": lambda: sum(int(compute_regions(img, body, pre.spacing_mm[0], cfg).max())
                                 for img, body in zip(volume, pre.body, strict=True)),
        "tiled_2d": lambda: int(compute_regions(tile(volume), tile(pre.body), pre.spacing_mm[0], cfg).max()),
        "volume_3d": lambda: int(compute_supervoxels(volume, pre.body, pre.spacing_mm, cfg_3d).max()),
    }
    compute_supervoxels(volume[:2], pre.body[:2], pre.spacing_mm, cfg_3d)  # compile outside the timing
    row = {"shape_zhw": list(volume.shape), "spacing_mm": list(pre.spacing_mm), "scale_3d": cfg_3d.scale}
    for name, run in runs.items():
        seconds = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            row[f"regions_{name}"] = run()
            seconds.append(time.perf_counter() - t0)
        row[f"s_{name}"] = round(min(seconds), 3)
        row[f"m_per_s_{name}"] = round(volume.size / min(seconds) / 1e6, 3)
    return row


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
        row = result["volume"] = volume_rate(args.ct, args.repeat)
        print(f"whole volume {'x'.join(map(str, row['shape_zhw']))}, M pixels (voxels)/s: 2D slices "
              f"{row['m_per_s_slices_2d']}, 2D slices tiled into one image {row['m_per_s_tiled_2d']}, "
              f"3D {row['m_per_s_volume_3d']} ({row['regions_slices_2d']} regions in 2D, "
              f"{row['regions_volume_3d']} in 3D)", flush=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
