"""Export a pre-trained nnU-Net network for ``nnUNetv2_train -pretrained_weights``.

Two files, both written atomically by ``lrcseg.models.export.write_export`` (as the
FlexibleUNet export is):

- ``lrc_nnunet.pth``: ``torch.save`` of ``{"network_weights": state_dict}``, every key of the
  plans' network (nnU-Net's loader skips the segmentation layers and checks every other shape);
- ``lrc_nnunet.json`` (same stem): format ``lrcseg-nnunet-v1``, the plans and configuration the
  network came from, the plans it was checked against, the preprocessing and superpixel
  settings of the pre-training, and the weights' SHA-256.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lrcseg.config import ModelConfig
from lrcseg.errors import ConfigError
from lrcseg.models.export import backbone_weights, write_export
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.nnunet.network import NNUNET_WEIGHTS_KEY, check_loads_into
from lrcseg.nnunet.plans import network_from_plans

NNUNET_EXPORT_FORMAT = "lrcseg-nnunet-v1"


def export_nnunet(network: PretrainNetwork, model_cfg: ModelConfig, preprocess: dict[str, Any],
                  superpixels: dict[str, Any] | None, out_path: str | os.PathLike,
                  plans: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``{"network_weights": state_dict}`` for nnU-Net's ``-pretrained_weights`` and a
    JSON description beside it. ``plans``: another plans file the weights must load into
    (e.g. the fine-tuning dataset's); by default the plans the run was pre-trained with.
    ConfigError when the run was not pre-trained for an nnU-Net network or does not fit.
    """
    out_path = Path(out_path)
    if model_cfg.nnunet is None:
        raise ConfigError("this run pre-trained a FlexibleUNet, not an nnU-Net network: pre-train "
                          "with --nnunet-plans to export for nnU-Net")
    if out_path.suffix == ".json":
        raise ConfigError(f"{out_path}: the weights file must not end in .json (the metadata goes there)")
    arch = model_cfg.nnunet
    target = network_from_plans(plans, arch.configuration) if plans else arch
    weights = backbone_weights(network)
    check_loads_into(weights, target, "the pre-training run")
    meta = {
        "format": NNUNET_EXPORT_FORMAT,
        "load_with": "nnUNetv2_train DATASET CONFIGURATION FOLD -pretrained_weights "
                     f"{out_path.name}",
        "plans": arch.plans, "configuration": arch.configuration, "plans_name": arch.plans_name,
        "dataset_name": arch.dataset_name, "network_class_name": arch.network_class_name,
        "checked_against_plans": str(target.plans),
        "preprocess": preprocess,
        "superpixels": superpixels,
    }
    return write_export(out_path, {NNUNET_WEIGHTS_KEY: weights}, meta)
