"""Export a pre-trained nnU-Net network (2d or 3d_fullres) for nnU-Net's fine-tuning routes.

Two formats (``EXPORT_FORMATS``), each two files written atomically by
``lrcseg.models.export.write_export`` (as the FlexibleUNet export is):

- ``nnunet``: ``torch.save`` of ``{"network_weights": state_dict}``, every key of the plans'
  network (nnU-Net's loader skips the segmentation layers and checks every other shape), for
  nnU-Net 2.8.1's ``nnUNetv2_train DATASET CONFIGURATION FOLD -pretrained_weights FILE``
  (``load_pretrained_weights``). The whole network, decoder included, is loaded.
- ``nnunet-pretrained`` (3d_fullres only): the checkpoint nnU-Net master's
  ``nnUNetv2_plan_like_dynamic`` / ``nnUNetv2_train_pretrained`` route reads (the format nnssl
  writes): ``{"network_weights": state_dict, "nnssl_adaptation_plan": {...}}``, the plan naming
  the plans' architecture, pre-training spacing and patch, and where the encoder and stem sit
  in the state dict (the keys nnU-Net's own network names). Checked against the source of
  nnU-Net master at ``NNUNET_PRETRAINED_SOURCE``, not against a release (2.8.1 has no such
  command); that route loads the encoder and stem only and trains the decoder from scratch.

Beside the weights, ``<stem>.json``: the format, the plans and configuration the network came
from, the plans and configuration it was checked against, the command that loads it, the
preprocessing and superpixel settings of the pre-training, and the weights' SHA-256.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from lrcseg.config import ModelConfig, NnUNetNetworkConfig
from lrcseg.errors import ConfigError
from lrcseg.models.export import backbone_weights, write_export
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.nnunet.network import NNUNET_WEIGHTS_KEY, build_nnunet, check_loads_into
from lrcseg.nnunet.plans import network_from_plans

NNUNET_EXPORT_FORMAT = "lrcseg-nnunet-v1"
NNUNET_PRETRAINED_EXPORT_FORMAT = "lrcseg-nnunet-pretrained-v1"
#: ``lrcseg export --format`` values of this module -> the format recorded in the JSON
EXPORT_FORMATS = {"nnunet": NNUNET_EXPORT_FORMAT, "nnunet-pretrained": NNUNET_PRETRAINED_EXPORT_FORMAT}
#: the nnU-Net source the ``nnunet-pretrained`` format was read from (master, after 2.8.1)
NNUNET_PRETRAINED_SOURCE = ("MIC-DKFZ/nnUNet master, commit 0e495086eb108ff79afe106291e8c15bd2f2bc3a "
                            "(2026-07-13; nnunetv2/experiment_planning/like_nnssl.py, "
                            "training/nnUNetTrainer/pretraining/), not a release")
#: the key of the adaptation plan in an nnssl-format checkpoint
ADAPTATION_PLAN_KEY = "nnssl_adaptation_plan"


def export_nnunet(network: PretrainNetwork, model_cfg: ModelConfig, preprocess: dict[str, Any],
                  superpixels: dict[str, Any] | None, out_path: str | os.PathLike,
                  plans: str | os.PathLike | None = None, configuration: str | None = None,
                  export_format: str = "nnunet") -> tuple[Path, Path]:
    """Export a pre-training run's nnU-Net network (``write_nnunet_weights``). ConfigError when
    the run was not pre-trained for an nnU-Net network or does not fit."""
    if model_cfg.nnunet is None:
        raise ConfigError("this run pre-trained a FlexibleUNet, not an nnU-Net network: pre-train "
                          "with --nnunet-plans to export for nnU-Net")
    return write_nnunet_weights(backbone_weights(network), model_cfg.nnunet, out_path, plans=plans,
                                configuration=configuration, export_format=export_format,
                                preprocess=preprocess, superpixels=superpixels)


def write_nnunet_weights(weights: dict[str, Tensor], arch: NnUNetNetworkConfig,
                         out_path: str | os.PathLike, plans: str | os.PathLike | None = None,
                         configuration: str | None = None, export_format: str = "nnunet",
                         preprocess: dict[str, Any] | None = None,
                         superpixels: dict[str, Any] | None = None,
                         source: str = "the pre-training run") -> tuple[Path, Path]:
    """Write ``weights`` (a state dict of ``arch``'s network) in ``export_format`` and the JSON
    beside it; returns (weights, JSON) paths.

    plans / configuration: the plans file and configuration the weights must load into (e.g.
    the fine-tuning dataset's); by default ``arch``'s own. ConfigError, one line, when they do
    not fit (``network.check_loads_into``: the first key missing or of another shape, 2D
    weights for a 3D network and the reverse included) or the format does not take them.
    """
    out_path = Path(out_path)
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"Illegal nnU-Net export format {export_format!r}: use one of "
                          f"{', '.join(EXPORT_FORMATS)}")
    if out_path.suffix == ".json":
        raise ConfigError(f"{out_path}: the weights file must not end in .json (the metadata goes there)")
    target = arch
    if plans is not None or configuration is not None:
        target = network_from_plans(plans or arch.plans, configuration or arch.configuration)
    check_loads_into(weights, target, source)
    meta = {
        "format": EXPORT_FORMATS[export_format],
        "plans": arch.plans, "configuration": arch.configuration, "plans_name": arch.plans_name,
        "dataset_name": arch.dataset_name, "network_class_name": arch.network_class_name,
        "checked_against_plans": str(target.plans),
        "checked_against_configuration": target.configuration,
        "patch_size": list(target.patch_size), "spacing_mm": list(target.spacing_mm),
        "preprocess": preprocess,
        "superpixels": superpixels,
    }
    if export_format == "nnunet":
        meta["load_with"] = (f"nnUNetv2_train DATASET {target.configuration} FOLD "
                             f"-pretrained_weights {out_path.name}")
        return write_export(out_path, {NNUNET_WEIGHTS_KEY: weights}, meta)
    if len(target.patch_size) != 3:
        raise ConfigError(f"--format nnunet-pretrained: nnU-Net's nnUNetv2_train_pretrained route "
                          f"trains 3d_fullres only, and this network is {target.configuration!r}: "
                          "export it with --format nnunet")
    meta["load_with"] = (f"nnUNetv2_plan_like_dynamic -d DATASET -n NAME -pc {out_path.name} "
                         f"-pl {target.plans_name}; then nnUNetv2_train_pretrained DATASET "
                         "3d_fullres FOLD -p ptPlans_dynamic__NAME -tr DynamicPretrainedTrainer")
    meta["checked_against_source"] = NNUNET_PRETRAINED_SOURCE
    return write_export(out_path, {NNUNET_WEIGHTS_KEY: weights,
                                   ADAPTATION_PLAN_KEY: adaptation_plan(target)}, meta)


def adaptation_plan(arch: NnUNetNetworkConfig) -> dict[str, Any]:
    """The ``nnssl_adaptation_plan`` of an nnssl-format checkpoint of ``arch``'s network, with
    every entry nnU-Net master's ``like_nnssl.py`` and ``PretrainedTrainer`` /
    ``DynamicPretrainedTrainer`` read (``NNUNET_PRETRAINED_SOURCE``): the architecture (the
    plans' own entry under nnssl's names), the pre-training spacing and patch (the plans'), one
    input channel, and the prefixes of the encoder, the stem and its first convolution in the
    state dict as nnU-Net's network names them (no positional embedding: a CNN). Plain
    Python values only: nnU-Net reads the checkpoint with ``torch.load(weights_only=True)``."""
    import torch

    with torch.device("meta"):
        network = build_nnunet(arch)
    keys = {name: getattr(network, name, None)
            for name in ("key_to_encoder", "key_to_stem", "keys_to_in_proj")}
    if None in keys.values():
        raise ConfigError(f"{arch.network_class_name} does not name its encoder and stem "
                          "(key_to_encoder, key_to_stem, keys_to_in_proj): needs "
                          "dynamic-network-architectures >= 0.4")
    patch, spacing = [int(v) for v in arch.patch_size], [float(v) for v in arch.spacing_mm]
    return {
        "architecture_plans": {
            "arch_class_name": arch.network_class_name,
            "arch_kwargs": dict(arch.arch_kwargs),
            "arch_kwargs_requiring_import": list(arch.kw_requires_import),
        },
        "architecture_kwargs": dict(arch.arch_kwargs),  # kernel sizes and depth (dynamic route)
        "pretrain_plan": {"configurations": {arch.configuration: {"spacing": spacing,
                                                                   "patch_size": patch}}},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": patch,
        "key_to_encoder": str(keys["key_to_encoder"]),
        "key_to_stem": str(keys["key_to_stem"]),
        "keys_to_in_proj": [str(k) for k in keys["keys_to_in_proj"]],
        "key_to_lpe": None,
    }
