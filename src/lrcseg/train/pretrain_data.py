"""Pre-training data: the slice pool of the unlabelled (or labelled) datasets with the
superpixel regions of every slice, built once in the slice and region caches; in 3D
(``model.spatial_dims: 3``) boxes of whole volumes with their supervoxels.

    datasets -> cases (``data.splits``) -> SliceCache (windowed slices)
             -> RegionCache (Felzenszwalb regions)  -> PretrainSlices (torch dataset)
             -> SupervoxelCache (3D Felzenszwalb)   -> PretrainBoxes (3D)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrcseg.config import PretrainConfig
from lrcseg.data.boxes import PretrainBoxes
from lrcseg.data.labels import labelled_volumes
from lrcseg.data.layouts import Case
from lrcseg.data.slice_cache import SliceCache
from lrcseg.data.slices import PretrainSlices
from lrcseg.data.splits import pretraining_cases, supervised_cases
from lrcseg.errors import ConfigError, warn_data
from lrcseg.superpixels.region_cache import RegionCache

#: 3D: a Felzenszwalb scale above this gives supervoxels that leak between organs
#: (docs/METHOD.md, "Supervoxels (3D)": ASA 0.931 at 75, 0.922 at 100 on the real CT)
COARSE_SUPERVOXEL_SCALE = 60.0


@dataclass
class PretrainData:
    """dataset: the slices with their regions (and organ labels for supervised runs);
    sources: what was read, for the run card; num_classes: label ids of the ``--labels``
    dataset (supervised) else None; mixed_pool: supervised + LRC with unlabelled slices from
    ``--data`` too."""

    dataset: PretrainSlices | PretrainBoxes
    sources: list[dict[str, Any]]
    num_classes: int | None = None
    mixed_pool: bool = False


def _supervised_pool(cfg: PretrainConfig) -> tuple[list[Case], list[dict[str, Any]], int, int]:
    """Labelled cases of ``cfg.labels``, then the pre-training pool of any other ``cfg.data``
    (LRC only); returns (cases, sources, num_classes, number of labelled cases). sources[0]
    is the labelled dataset's, with its "labels"."""
    if not cfg.labels:
        raise ConfigError("method 'supervised' needs a labelled dataset: pass --labels DATASET")
    cases, sources, num_classes = supervised_cases(cfg.labels)
    labelled = len(cases)
    labelled_dir = str(Path(cfg.labels).resolve())
    extra = [p for p in cfg.data if str(Path(p).resolve()) != labelled_dir]
    if extra:
        if not cfg.lrc.enabled:
            raise ConfigError("--data beside --labels adds unlabelled slices, which only the "
                              "LRC loss uses: enable --lrc or drop --data")
        more, more_sources = pretraining_cases(extra)
        seen = {str(Path(c.image).resolve()) for c in cases}
        cases += [c for c in more if str(Path(c.image).resolve()) not in seen]
        sources += more_sources
    return cases, sources, num_classes, labelled


def build_pretrain_data(cfg: PretrainConfig, progress: bool = True) -> PretrainData:
    """Slice and region caches (built once) and the slice dataset over them.

    Method "supervised" trains on the labelled cases of ``cfg.labels`` (every label id must be
    one the dataset names) and, with ``cfg.data`` too, on the pre-training pool of those
    datasets as well: L_seg on the labelled slices only, L_LRC on all. The other methods use
    the pool of ``cfg.data``.
    """
    num_classes = None
    if cfg.method == "supervised":
        cases, sources, num_classes, labelled = _supervised_pool(cfg)
    else:
        if cfg.labels:
            raise ConfigError(f"--labels is only used by --method supervised (method is {cfg.method})")
        cases, sources = pretraining_cases(cfg.data)
        labelled = 0
    slice_cache = SliceCache(cfg.preprocess, root=cfg.run.cache_dir)
    volumes = (labelled_volumes(slice_cache, cases[:labelled], sources[0]["labels"])
               if labelled else [])
    volumes += [slice_cache.get(c) for c in cases[labelled:]]
    if cfg.model.spatial_dims == 3:
        from lrcseg.superpixels.supervoxel_cache import SupervoxelCache

        if cfg.superpixels.scale > COARSE_SUPERVOXEL_SCALE:
            warn_data(None, f"superpixels.scale {cfg.superpixels.scale:g} in 3D gives coarse "
                            "supervoxels that merge organs (ASA 0.922 at 100 on the real CT, "
                            "docs/METHOD.md); about a third of the 2D scale, e.g. 33, gives the "
                            "2D regions' size")
        region_cache = SupervoxelCache(slice_cache, cfg.superpixels)
    else:
        region_cache = RegionCache(slice_cache, cfg.superpixels)
    region_cache.build(cases, workers=cfg.run.workers, progress=progress)
    regions = [region_cache.get(c) for c in cases]
    if num_classes is not None:  # unlabelled pool slices must not count as all background
        volumes = [v if i < labelled else dataclasses.replace(v, label=None)
                   for i, v in enumerate(volumes)]
    with_organs = any(v.label is not None for v in volumes)
    if cfg.model.spatial_dims == 3:
        dataset = PretrainBoxes(volumes, regions, box_size(cfg), with_organs=with_organs)
        if len(dataset) < 2:
            raise ConfigError(f"only {len(dataset)} boxes of {box_size(cfg)} voxels with body in "
                              f"{cfg.data or cfg.labels}: too few to pre-train")
        return PretrainData(dataset, sources, num_classes,
                            mixed_pool=num_classes is not None and len(cases) > labelled)
    dataset = PretrainSlices(volumes, regions, cfg.preprocess.context_slices,
                             with_organs=with_organs)
    if len(dataset) < 2:
        raise ConfigError(f"only {len(dataset)} body slices in {cfg.data or cfg.labels}: too few "
                          "to pre-train")
    return PretrainData(dataset, sources, num_classes,
                        mixed_pool=num_classes is not None and len(cases) > labelled)


def box_size(cfg: PretrainConfig) -> tuple[int, int, int]:
    """3D: the (d, h, w) box the two views are cut from, ``augment.box_scale`` times the
    view's ``augment.patch_size`` per axis, rounded up."""
    return tuple(int(math.ceil(cfg.augment.box_scale * s)) for s in cfg.augment.patch_size)
