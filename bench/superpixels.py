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
    python bench/superpixels.py --supervoxels-only [--abdomen DIR] --out bench/results/supervoxels.json

The supervoxel cache row (``supervoxel_cache_rate``, also in the full run; alone with
``--supervoxels-only``): the labelled real abdominal CT (``--abdomen``, Dataset902_RealAbdomen
beside the checkout; a generated phantom volume if absent) at the default preprocessing,
through ``SupervoxelCache`` at scale 33, one thread, best of ``--repeat``: M voxels per second of
the first ``get`` (compute, store, check), of a fresh cache object's ``get`` (SHA-256 check,
memory map, full read) and of a repeated ``get`` on the same object (no SHA-256, full read).
Run once with OMP_NUM_THREADS=1 on the 2-core AMD EPYC VM busy with other jobs (load ~7, so
the compute rate is loose): 112 x 244 x 202 = 5.5 M voxels at 1.5 x 1.5 x 3 mm, 7881 regions
(uint16, 11 MB): compute+store 0.63 M voxels/s (8.8 s), checked load 258 M voxels/s (21 ms),
repeated load 885 M voxels/s (6 ms) (bench/results/supervoxels.json).

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
from lrcseg.superpixels.region_cache import RegionCache, record_path
from lrcseg.superpixels.regions import compute_regions, min_size_pixels
from lrcseg.superpixels.supervoxel_cache import SupervoxelCache
from lrcseg.superpixels.supervoxels import compute_supervoxels

DEFAULT_CT = Path("/work/shared/data/chest_ct_dicom")
DEFAULT_ABDOMEN = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                   / "real_abdomen_ct" / "Dataset902_RealAbdomen")


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


def supervoxel_cache_rate(abdomen: Path, repeat: int) -> dict:
    """The supervoxel cache on one volume, M voxels/s, best of ``repeat`` (module docstring):
    ``compute_store`` (first get: compute_supervoxels, np.save, record, SHA-256 check),
    ``load_checked`` (a new SupervoxelCache: SHA-256, memory map, np.asarray) and
    ``load_again`` (the same object again: memory map, np.asarray). The slice cache entry is
    built before any timing."""
    from lrcseg.data.layouts import load_dataset
    from lrcseg.phantoms.generate import write_phantom_dataset

    cfg = SuperpixelConfig(scale=33.0)
    with tempfile.TemporaryDirectory() as tmp:
        if abdomen.is_dir():
            source, case = "real_abdomen_ct", load_dataset(abdomen).cases[0]
        else:  # 400 x 400 x 192 mm at the default 1.5 mm in-plane: 64 x 267 x 267 voxels
            write_phantom_dataset(Path(tmp) / "phantom", 1, seed=0, spacing_mm=(1.5, 1.5, 3.0),
                                  shape=(267, 267, 64), montage=False)
            source, case = "phantom", load_dataset(Path(tmp) / "phantom").cases[0]
        slices = SliceCache(PreprocessConfig(), Path(tmp) / "cache")
        vol = slices.get(case)
        compute_supervoxels(np.asarray(vol.image[:2, 0], np.float32), vol.body[:2],
                            vol.spacing_mm, cfg)  # compile outside the timing
        timings: dict[str, list[float]] = {"compute_store": [], "load_checked": [], "load_again": []}
        for _ in range(repeat):
            cache = SupervoxelCache(slices, cfg)
            path = cache.path(vol)
            path.unlink(missing_ok=True)
            record_path(path).unlink(missing_ok=True)
            t0 = time.perf_counter()
            regions = np.asarray(cache.get(case))
            timings["compute_store"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.asarray(SupervoxelCache(slices, cfg).get(case)).max()
            timings["load_checked"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.asarray(cache.get(case)).max()
            timings["load_again"].append(time.perf_counter() - t0)
        row = {"source": source, "shape_zhw": list(regions.shape),
               "spacing_mm": list(vol.spacing_mm), "voxels": int(regions.size),
               "scale": cfg.scale, "regions": int(regions.max()), "dtype": regions.dtype.name,
               "file_bytes": path.stat().st_size, "repeat": repeat}
    for name, seconds in timings.items():
        row[f"s_{name}"] = round(min(seconds), 4)
        row[f"m_voxels_per_s_{name}"] = round(row["voxels"] / min(seconds) / 1e6, 2)
    return row


def _print_supervoxel_row(row: dict) -> None:
    print(f"supervoxel cache on {row['source']} {'x'.join(map(str, row['shape_zhw']))} "
          f"({row['regions']} regions, {row['dtype']}), M voxels/s: compute+store "
          f"{row['m_voxels_per_s_compute_store']} ({row['s_compute_store']} s), load checked "
          f"{row['m_voxels_per_s_load_checked']} ({row['s_load_checked']} s), load again "
          f"{row['m_voxels_per_s_load_again']} ({row['s_load_again']} s)", flush=True)


def _machine() -> dict:
    """What the numbers were measured on: CPU, cores, load, threads."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT)
    parser.add_argument("--out", type=Path, default=Path("bench_superpixels.json"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--phantoms", type=int, default=16, help="phantom slices per size")
    parser.add_argument("--abdomen", type=Path, default=DEFAULT_ABDOMEN,
                        help="nnU-Net dataset whose first case the supervoxel cache row uses")
    parser.add_argument("--supervoxels-only", action="store_true",
                        help="run the supervoxel cache row alone")
    args = parser.parse_args()

    if args.supervoxels_only:
        machine = _machine()
        row = supervoxel_cache_rate(args.abdomen, args.repeat)
        _print_supervoxel_row(row)
        atomic_write_json(args.out, {"machine": machine, "supervoxel_cache": row})
        print(f"wrote {args.out}")
        return

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
    row = result["supervoxel_cache"] = supervoxel_cache_rate(args.abdomen, args.repeat)
    _print_supervoxel_row(row)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
