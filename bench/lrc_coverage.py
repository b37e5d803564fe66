"""What the LRC loss sees: valid and sampled regions per organ, per configuration (no training).

The LRC loss only ever contrasts the regions it samples. This bench replays the pre-training
data path (two augmented views of pool slices, region maps brought to the local head's
resolution, validity, weighted sampling) for each configuration and counts, per organ, how
often the loss can see it: the share of views in which a valid region whose majority label
is that organ exists ("valid") and in which such a region is among the N sampled ones
("sampled"), plus the background share of the sampled regions and of the negative pairs.
Nothing here depends on the network, so it runs in seconds and can be used to choose the
level, ``min_pixels`` and sampling before any pre-training. Labels are those of the
pre-training pool (phantoms: their labels are never used in training; here they only count).

    python bench/lrc_coverage.py [--data DATASET] [--out bench_lrc_coverage.json] [--3d]

``--3d`` does the same for 3D pre-training (``model.spatial_dims: 3``): boxes of the pool
volumes with their supervoxels, two views of ``--patch`` voxels (``PairedVolumeAugment``,
spacing in mm), regions brought to the local head's resolution on every axis; sizes in voxels
(an organ counts as present with >= 8 x MIN_ORGAN_PIXELS voxels); the settings of
``SETTINGS_3D`` (supervoxel scale: a third of the 2D scale gives the 2D regions' voxels).

Without --data it writes the CPU-protocol phantoms (30 cases, seed 0, 2 x 2 x 5 mm) to a
temporary folder and uses their "pretrain" split.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrcseg.augment import PairedViewAugment
from lrcseg.augment3d import PairedVolumeAugment
from lrcseg.config import (
    AugmentConfig,
    ModelConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
    SuperpixelConfig,
)
from lrcseg.data.layouts import load_dataset
from lrcseg.io_utils import atomic_write_json
from lrcseg.losses.lrc import (
    downsample_regions,
    intensity_bins,
    organ_statistics,
    region_majority,
    sample_regions,
)
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train.pretrain_data import build_pretrain_data

#: an organ counts as present in a view if it covers at least this many pixels of it
MIN_ORGAN_PIXELS = 32


@dataclass(frozen=True)
class Setting:
    name: str
    stride: int           # local head stride: 4 = 1/4 resolution (level 2), 2 = 1/2 (level 3)
    min_pixels: int
    sampling: str
    num_regions: int = 16
    zoom: bool = True     # views at native scale (zoom 0.8-1.25) vs the old canvas crop
    scale: float = 100.0  # Felzenszwalb scale and minimum region size (superpixels.*)
    min_size_mm2: float = 110.0


SETTINGS = [
    Setting("old: 1/4, p4, area, N16, canvas crop", 4, 4, "area", zoom=False),
    Setting("1/4, p4, area, N16", 4, 4, "area"),
    Setting("1/2, p4, area, N16", 2, 4, "area"),
    Setting("1/2, p4, uniform, N16", 2, 4, "uniform"),
    Setting("1/2, p4, intensity, N16", 2, 4, "intensity"),
    Setting("1/2, p4, uniform, N32", 2, 4, "uniform", 32),
    Setting("1/2, p2, uniform, N48", 2, 2, "uniform", 48),
    Setting("1/1, p8, uniform, N48", 1, 8, "uniform", 48),
    Setting("1/2, p4, uniform, N32, fz 50/60mm2", 2, 4, "uniform", 32, scale=50.0, min_size_mm2=60.0),
    Setting("1/2, p4, uniform, N48, fz 25/60mm2", 2, 4, "uniform", 48, scale=25.0, min_size_mm2=60.0),
    Setting("1/2, p2, uniform, N64, fz 25/30mm2", 2, 2, "uniform", 64, scale=25.0, min_size_mm2=30.0),
]


#: 3D: supervoxel scale a third of the 2D one (docs/METHOD.md); min_pixels in voxels
SETTINGS_3D = [
    Setting("3D 1/2, p8, uniform, N48, sv 33/110mm2", 2, 8, "uniform", 48, scale=33.0),
    Setting("3D 1/2, p8, uniform, N48, sv 8/60mm2", 2, 8, "uniform", 48, scale=8.0,
            min_size_mm2=60.0),
    Setting("3D 1/2, p4, uniform, N64, sv 8/60mm2", 2, 4, "uniform", 64, scale=8.0,
            min_size_mm2=60.0),
    Setting("3D 1/4, p2, uniform, N48, sv 8/60mm2", 4, 2, "uniform", 48, scale=8.0,
            min_size_mm2=60.0),
]


def measure(setting: Setting, dataset, organ_names: dict[int, str], image_size: int, batches: int,
            batch_size: int, patch: tuple[int, int, int] | None = None) -> dict:
    """Coverage of one setting; ``patch`` (d, h, w) = 3D views of that size (dataset of boxes)."""
    aug_cfg = AugmentConfig(image_size=image_size) if setting.zoom else \
        AugmentConfig(image_size=image_size, zoom=None)
    augment = PairedViewAugment(aug_cfg) if patch is None else PairedVolumeAugment(aug_cfg, patch)
    present_min = MIN_ORGAN_PIXELS if patch is None else 8 * MIN_ORGAN_PIXELS
    num_ids = dataset.max_region_id + 1
    valid_seen = {o: 0 for o in organ_names}
    sampled_seen = {o: 0 for o in organ_names}
    present_counts = {o: 0 for o in organ_names}  # the denominators
    views = 0
    totals: dict[str, list[float]] = {"valid_regions": [], "neg_same_organ": [],
                                      "neg_background": [], "sampled_background": []}
    order = np.random.default_rng(0).permutation(len(dataset))
    for b in range(batches):
        items = [dataset[int(i)] for i in order[b * batch_size:(b + 1) * batch_size]]
        images = torch.stack([it["image"] for it in items]).float()
        regions = torch.stack([it["regions"] for it in items]).long()
        organs = torch.stack([it["organs"] for it in items]).long()
        g = torch.Generator().manual_seed(1000 + b)
        geometry = {} if patch is None else {"spacing_mm": torch.stack([it["spacing"] for it in items])}
        view1, regions1, _, regions2 = augment(images, regions, g, **geometry)
        labels1, _ = augment.labels_in_views(organs, torch.Generator().manual_seed(1000 + b),
                                             **geometry)
        sides = (image_size, image_size) if patch is None else patch
        size = tuple(side // setting.stride for side in sides)
        r1, r2 = downsample_regions(regions1, size), downsample_regions(regions2, size)
        bins = intensity_bins(view1[:, 0], regions1, num_ids, 8)
        sample = sample_regions(r1, r2, setting.num_regions, 8, setting.min_pixels,
                                torch.Generator().manual_seed(b), num_ids, setting.sampling, bins)
        majority = region_majority(labels1, r1, num_ids)  # (B, num_ids)
        sampled_majority = majority.gather(1, sample.region_ids)
        for organ in organ_names:
            present = (labels1 == organ).flatten(1).sum(1) >= present_min  # in view 1
            valid_hit = ((majority == organ) & sample.valid_regions).any(1)
            sampled_hit = ((sampled_majority == organ) & sample.valid).any(1)
            present_counts[organ] += int(present.sum())
            valid_seen[organ] += int((valid_hit & present).sum())
            sampled_seen[organ] += int((sampled_hit & present).sum())
        views += len(items)
        stats = organ_statistics(sample, labels1, r1, per_image=True)
        totals["valid_regions"].append(float(sample.valid_regions.sum()) / len(items))
        for key in ("neg_same_organ", "neg_background", "sampled_background"):
            totals[key].append(float(stats[key]))
    per_organ = {organ_names[o]: {"valid": valid_seen[o] / max(present_counts[o], 1),
                                  "sampled": sampled_seen[o] / max(present_counts[o], 1),
                                  "views_with_organ": present_counts[o]} for o in organ_names}
    return {"setting": setting.__dict__, "views": views, "per_organ": per_organ,
            **{k: float(np.nanmean(v)) for k, v in totals.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="labelled dataset with a pretrain split")
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="bench_lrc_coverage.json")
    parser.add_argument("--3d", dest="three_d", action="store_true",
                        help="3D pre-training: boxes, supervoxels and 3D views (SETTINGS_3D)")
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64),
                        help="with --3d: view size d h w in voxels")
    args = parser.parse_args()
    patch = tuple(args.patch) if args.three_d else None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else write_phantom_dataset(
            Path(tmp) / "phantoms", cases=30, seed=0, spacing_mm=(2.0, 2.0, 5.0), montage=False)
        labels = load_dataset(data).labels or {}
        organ_names = {i: n for n, i in labels.items() if i > 0}
        datasets = {}
        rows = []
        three_d = {} if patch is None else {
            "model": ModelConfig(spatial_dims=3), "augment": AugmentConfig(patch_size=patch)}
        for s in (SETTINGS_3D if patch else SETTINGS):
            key = (s.scale, s.min_size_mm2)
            if key not in datasets:
                cfg = PretrainConfig(data=[str(data)], run=RunConfig(cache_dir=str(Path(tmp) / "cache")),
                                     preprocess=PreprocessConfig(spacing_mm=args.spacing),
                                     superpixels=SuperpixelConfig(scale=s.scale, min_size_mm2=s.min_size_mm2),
                                     **three_d)
                datasets[key] = build_pretrain_data(cfg, progress=False).dataset
            rows.append(measure(s, datasets[key], organ_names, args.image_size, args.batches,
                                args.batch_size, patch))
        dataset = next(iter(datasets.values()))
    names = list(organ_names.values())
    short = [n[:7] for n in names]
    what = "slices" if patch is None else f"boxes ({patch} voxel views)"
    print(f"pool: {len(dataset)} {what}; {rows[0]['views']} views per setting; "
          f"{args.image_size if patch is None else patch} at {args.spacing} mm in-plane")
    present = MIN_ORGAN_PIXELS if patch is None else 8 * MIN_ORGAN_PIXELS
    print(f"share of the views where the organ covers >= {present} px in which a region "
          "with that majority label is VALID / SAMPLED")
    print("| setting | valid/img | bg sampled | neg bg-bg | neg same organ | "
          + " | ".join(short) + " |")
    print("|---" * (5 + len(names)) + "|")
    for r in rows:
        cells = [f"{r['per_organ'][n]['valid']:.2f}/{r['per_organ'][n]['sampled']:.2f}" for n in names]
        print(f"| {r['setting']['name']} | {r['valid_regions']:.1f} | {r['sampled_background']:.2f} | "
              f"{r['neg_background']:.2f} | {r['neg_same_organ']:.3f} | " + " | ".join(cells) + " |")
    atomic_write_json(args.out, {"args": vars(args), "rows": rows})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
