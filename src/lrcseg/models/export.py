"""Export pre-trained U-Net weights that load into MONAI's FlexibleUNet without lrcseg.

Two files, both written atomically:

- ``model.pt``: ``torch.save`` of a plain dict {name: tensor} with the encoder + decoder
  weights under FlexibleUNet's own keys (no segmentation head, no projection heads).
- ``model.json`` (same stem): ``flexible_unet``: ``flexible_unet_kwargs`` (every FlexibleUNet argument except
  ``out_channels``, which the user picks), the preprocessing (window, spacing, input channels)
  and the superpixel settings used in pre-training, and ``weights_sha256``, the SHA-256 of
  ``model.pt`` (``sha256sum model.pt`` shows the same), checked by :func:`load_exported`.

The export for nnU-Net (``lrcseg export --format nnunet``) is ``lrcseg.nnunet.export``; it
writes through ``backbone_weights`` and ``write_export`` too.

Loading without lrcseg::

    meta = json.load(open("model.json"))
    net = FlexibleUNet(**meta["flexible_unet"], out_channels=num_classes)
    net.load_state_dict(torch.load("model.pt"), strict=False)   # missing: segmentation_head.*
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import FlexibleUNet
from torch import Tensor

from lrcseg.config import ModelConfig
from lrcseg.errors import ConfigError, DataError
from lrcseg.io_utils import (
    atomic_torch_save,
    atomic_write_json,
    file_sha256,
    first_line,
    zip_archive_fault,
)
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.models.unet import SEGMENTATION_HEAD_PREFIX, flexible_unet_kwargs

EXPORT_FORMAT = "lrcseg-flexibleunet-v1"


def meta_path(out_path: str | os.PathLike) -> Path:
    """The JSON beside an exported weights file: ``model.pt`` -> ``model.json``."""
    return Path(out_path).with_suffix(".json")


def nonfinite_tensors(weights: Any) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf ([] for
    anything that is not a dict)."""
    if not isinstance(weights, dict):
        return []
    return [name for name, value in weights.items()
            if isinstance(value, Tensor) and value.is_floating_point()
            and not bool(torch.isfinite(value).all())]


def backbone_weights(network: PretrainNetwork | FlexibleUNet) -> dict[str, Tensor]:
    """The U-Net's weights to export (``PretrainNetwork.backbone_state_dict``, or a
    FlexibleUNet's without its segmentation head): detached, contiguous CPU copies."""
    if isinstance(network, PretrainNetwork):
        state = network.backbone_state_dict()
    elif isinstance(network, FlexibleUNet):
        state = {k: v for k, v in network.state_dict().items() if not k.startswith(SEGMENTATION_HEAD_PREFIX)}
    else:
        raise TypeError(f"cannot export a {type(network).__name__}: need PretrainNetwork or FlexibleUNet")
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _check_against_flexible_unet(weights: dict[str, Tensor], kwargs: dict[str, Any]) -> None:
    """The weights must fill a FlexibleUNet built from kwargs, except its segmentation head."""
    with torch.device("meta"):
        reference = FlexibleUNet(**kwargs, out_channels=1).state_dict()
    expected = {k: v.shape for k, v in reference.items() if not k.startswith(SEGMENTATION_HEAD_PREFIX)}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise ConfigError(
            f"weights do not match FlexibleUNet({kwargs}): missing {missing}, unexpected {extra}, "
            f"wrong shape {wrong} (is the model configuration / in_channels right?)"
        )


def export_weights(network: PretrainNetwork | FlexibleUNet, model_cfg: ModelConfig, in_channels: int,
                   preprocess: dict[str, Any], superpixels: dict[str, Any] | None,
                   out_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the U-Net weights (``out_path``) and their description (``meta_path(out_path)``).

    preprocess / superpixels: the settings to record (e.g. ``config.to_dict(cfg.preprocess)``).
    Raises ConfigError if the network does not match ``model_cfg`` and ``in_channels``.
    Returns (weights path, JSON path).
    """
    out_path = Path(out_path)
    if out_path.suffix == ".json":
        raise ConfigError(f"{out_path}: the weights file must not end in .json (the metadata goes there)")
    if model_cfg.nnunet is not None:
        raise ConfigError("this run pre-trained an nnU-Net network: export it with --format nnunet")
    kwargs = flexible_unet_kwargs(model_cfg, in_channels, out_channels=1)
    kwargs.pop("out_channels")
    weights = backbone_weights(network)
    _check_against_flexible_unet(weights, kwargs)
    meta = {
        "format": EXPORT_FORMAT,
        "flexible_unet": kwargs,
        "missing_keys_on_load": "segmentation_head.* (created for your number of classes)",
        "in_channels": in_channels,
        "preprocess": preprocess,
        "superpixels": superpixels,
    }
    return write_export(out_path, weights, meta)


def write_export(out_path: Path, obj: Any, meta: dict[str, Any]) -> tuple[Path, Path]:
    """``torch.save(obj)`` to ``out_path``, then ``meta`` (its "format" first, then "weights"
    and "weights_sha256" naming and fingerprinting the file) to the JSON beside it; both
    atomic, and never weights without their description. Returns (weights, JSON) paths."""
    atomic_torch_save(out_path, obj)
    json_path = meta_path(out_path)
    try:
        described = {"format": meta.pop("format"), "weights": out_path.name,
                     "weights_sha256": file_sha256(out_path), **meta}
        atomic_write_json(json_path, described)
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return out_path, json_path


def load_exported(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an export: (state_dict of CPU tensors, metadata dict).

    DataError naming the file if it is missing or unreadable, if the weights file differs from
    the ``weights_sha256`` its JSON records (altered, or replaced by another file) or, for an
    export written before that field, if its zip archive fails its CRC-32 check, and if a
    weight is NaN or inf.
    """
    path = Path(path)
    json_path = meta_path(path)
    if not path.is_file():
        raise DataError(path, "exported weights file not found")
    if not json_path.is_file():
        raise DataError(json_path, f"metadata for {path.name} not found (expected beside it)")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(json_path, f"cannot read export metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise DataError(json_path, f"not an lrcseg export (format should be {EXPORT_FORMAT!r})")
    _check_weights_file(path, meta.get("weights_sha256"), json_path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise DataError(path, f"cannot read exported weights: {first_line(exc)}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(path, "exported weights are not a dict of tensors")
    bad = nonfinite_tensors(state)
    if bad:
        raise DataError(path, f"exported weights hold NaN or inf in {len(bad)} tensors (first: "
                              f"{bad[0]}): export them again from a good run")
    return state, meta


def _check_weights_file(path: Path, sha256: Any, json_path: Path) -> None:
    """DataError unless ``path`` is the weights file its JSON describes: its SHA-256 is
    ``sha256`` (exports of an older lrcseg have none: their zip CRC-32s are checked)."""
    if sha256 is not None:
        if file_sha256(path) != sha256:
            raise DataError(path, f"exported weights differ from the SHA-256 recorded in "
                                  f"{json_path.name} (altered after the export, or replaced by "
                                  "another file): export them again")
        return
    fault = zip_archive_fault(path)
    if fault is not None:
        raise DataError(path, f"exported weights are damaged ({fault}): export them again")
