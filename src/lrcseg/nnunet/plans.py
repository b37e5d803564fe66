"""nnU-Net's plans file -> the network lrcseg pre-trains, and a pre-training set up for it.

``network_from_plans`` reads ``nnUNetPlans.json`` (``nnUNetv2_plan_and_preprocess``'s output
folder) and the ``dataset.json`` beside it into an ``NnUNetNetworkConfig``: the plans'
"architecture" entry, recorded whole, so ``network.build_nnunet`` builds the network exactly
as nnU-Net's trainer builds it; ``apply_plans`` sets a ``PretrainConfig`` to that network.
Reading plans needs neither torch nor nnunetv2.

Intensities: lrcseg's slice cache holds HU windows mapped to [0, 1]. For an nnU-Net network
the cache gets the plans' CTNormalization clip range as a second window, and
``network.NnUNetInput`` maps that channel back to nnU-Net's input, (clip(HU) - mean) / std, an
affine map of the window channel. Channel 0 stays the soft-tissue window the superpixels are
computed on. nnU-Net's own preprocessing also crops to the non-zero region and resamples with
third-order splines; lrcseg resamples linearly. Both are at the plans' spacing.

Orientation: lrcseg reads volumes into RAS+; nnU-Net uses each file's array order. The two
differ by flips and transposes of the slice, which nnU-Net's training augmentation (mirroring
on both axes, rotations up to 180 degrees in 2D) covers.

3d_fullres: ``network_from_plans`` reads it (the plans' 3D network, its (D, H, W) patch and
spacing), ``apply_plans`` sets a 3D pre-training to it (``model.spatial_dims`` 3, views of the
plans' patch) and ``export.py`` writes and checks its weights. In 3D the axis order is not covered by augmentation: the plans'
kernels and poolings are often anisotropic (kernel [1, 3, 3] and pooling [1, 2, 2] where the
first axis is coarse), so a 3D pre-training must feed (B, 1, D, H, W) in nnU-Net's array order,
D the axis the plans' spacing names first, not RAS+.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from lrcseg.config import NnUNetNetworkConfig, PretrainConfig
from lrcseg.errors import ConfigError, DataError


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(path, "file not found") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(path, "not a JSON object")
    return data


def network_from_plans(plans_path: str | os.PathLike, configuration: str = "2d"
                       ) -> NnUNetNetworkConfig:
    """Read ``nnUNetPlans.json`` (``nnUNetv2_plan_and_preprocess``'s output folder) and the
    ``dataset.json`` beside it into an ``NnUNetNetworkConfig``.

    ``configuration``: "2d" or "3d_fullres" (any configuration with a 2D or 3D patch reads);
    its patch size and spacing are recorded in nnU-Net's axis order ((H, W) for 2d, (D, H, W)
    for 3d_fullres, D the axis nnU-Net's preprocessing puts first), its network is 2D or 3D
    as its "architecture" entry says (``conv_op``), and ``len(patch_size)`` tells which.

    Refused with a message naming the file: a missing configuration, more than one input
    channel, or a normalization other than CTNormalization (lrcseg reads CT in HU).
    """
    plans_path = Path(plans_path)
    if plans_path.is_dir():
        plans_path = plans_path / "nnUNetPlans.json"
    plans = _read_json(plans_path)
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or "dataset_name" not in plans:
        raise DataError(plans_path, "not an nnU-Net v2 plans file (no configurations / dataset_name)")
    if configuration not in configs:
        raise DataError(plans_path, f"no configuration {configuration!r}; it has "
                        f"{', '.join(sorted(configs))}")
    conf = dict(configs[configuration])
    seen = {configuration}
    while "inherits_from" in conf:  # e.g. 3d_cascade_fullres: missing keys come from the parent
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise DataError(plans_path, f"configuration {configuration!r} inherits from "
                            f"{parent!r}, which is missing or circular")
        seen.add(parent)
        conf = {**configs[parent], **conf}
    patch = conf.get("patch_size", [])
    spacing = conf.get("spacing", [])
    if len(patch) not in (2, 3) or len(spacing) < len(patch):
        raise DataError(plans_path, f"configuration {configuration!r} has patch size {patch} and "
                        f"spacing {spacing}: need a 2D or 3D patch with a spacing per axis")
    schemes = conf.get("normalization_schemes", [])
    if len(schemes) != 1:
        raise DataError(plans_path, f"{len(schemes)} input channels; lrcseg pre-trains on "
                        "single-channel CT")
    if schemes[0] != "CTNormalization":
        raise DataError(plans_path, f"normalization {schemes[0]!r}: lrcseg pre-trains on CT in HU "
                        "and reproduces CTNormalization only")
    props = plans.get("foreground_intensity_properties_per_channel", {}).get("0")
    if not props:
        raise DataError(plans_path, "no foreground_intensity_properties_per_channel for channel "
                        "0 (needed by CTNormalization)")
    dataset_json = _read_json(plans_path.parent / "dataset.json")
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(plans_path.parent / "dataset.json", "no labels")
    arch = conf.get("architecture", {})
    if "network_class_name" not in arch:
        raise DataError(plans_path, f"configuration {configuration!r} has no architecture entry "
                        "(plans from nnU-Net < 2.4 are not supported)")
    return NnUNetNetworkConfig(
        plans=str(plans_path.resolve()), configuration=configuration,
        plans_name=str(plans.get("plans_name", plans_path.stem)),
        dataset_name=str(plans["dataset_name"]),
        network_class_name=str(arch["network_class_name"]),
        arch_kwargs=dict(arch["arch_kwargs"]),
        kw_requires_import=list(arch.get("_kw_requires_import", [])),
        num_classes=_num_segmentation_outputs(labels),
        clip_hu=(float(props["percentile_00_5"]), float(props["percentile_99_5"])),
        mean=float(props["mean"]), std=max(float(props["std"]), 1e-8),
        spacing_mm=tuple(float(v) for v in spacing[-len(patch):]),
        patch_size=tuple(int(v) for v in patch))


def _num_segmentation_outputs(labels: dict[str, Any]) -> int:
    """nnU-Net's number of outputs: one per label id (regions: one per region, no background)."""
    values = list(labels.values())
    if any(isinstance(v, (list, tuple)) for v in values):  # region-based training
        return len([k for k in labels if k != "background"])
    return len({int(v) for v in values})


def apply_plans(cfg: PretrainConfig, arch: NnUNetNetworkConfig, image_size: int | None = None
                ) -> PretrainConfig:
    """``cfg`` with the plans' network (2D or 3D), in-plane spacing, patch and intensity
    normalization.

    The cache gets two windows: the soft-tissue window ``preprocess.window_hu`` (superpixels,
    augmentation statistics) and the CT clip range (the network's input, ``NnUNetInput``).
    2d: views are square crops of the patch's shorter side rounded down to a multiple of 32
    (lrcseg's view sizes are), or of ``image_size``. 3d_fullres: ``model.spatial_dims`` 3 and
    views of the plans' (D, H, W) patch (``augment.patch_size``; ``image_size`` is refused).
    2d keeps the volumes' own z spacing; 3d_fullres resamples z to the plans' too
    (``preprocess.slice_spacing_mm``).
    """
    spatial_dims = len(arch.patch_size)
    if cfg.preprocess.context_slices != 1:
        raise ConfigError(f"--nnunet-plans: nnU-Net's {arch.configuration} network takes one "
                          "channel; drop --context-slices")
    if spatial_dims == 3 and image_size:
        raise ConfigError(f"--image-size sets 2D views; {arch.configuration!r} is 3D and its views "
                          f"are the plans' patch {list(arch.patch_size)}: drop --image-size")
    sy, sx = arch.spacing_mm[-2:]
    if abs(sy - sx) > 0.01 * max(sy, sx):
        raise ConfigError(f"{arch.plans}: in-plane spacing {sy} x {sx} mm is anisotropic; lrcseg "
                          "resamples slices to one in-plane spacing")
    if cfg.probe.dataset:
        raise ConfigError("--probe-dataset is not available for nnU-Net networks yet (the probe "
                          "reads FlexibleUNet features); drop it")
    preprocess = dataclasses.replace(
        cfg.preprocess, spacing_mm=(sy + sx) / 2,
        extra_windows_hu=[arch.clip_hu],
        slice_spacing_mm=float(arch.spacing_mm[0]) if spatial_dims == 3 else None)
    if spatial_dims == 3:
        augment = dataclasses.replace(cfg.augment, patch_size=tuple(arch.patch_size))
    else:
        augment = dataclasses.replace(
            cfg.augment, image_size=image_size or max(32, min(arch.patch_size) // 32 * 32))
    return dataclasses.replace(
        cfg, preprocess=preprocess, augment=augment,
        model=dataclasses.replace(cfg.model, nnunet=arch, spatial_dims=spatial_dims))
