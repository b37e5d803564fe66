"""Reading trained weights for use: run-folder checkpoints, pre-trained U-Nets, fine-tuned models.

A run folder holds ``checkpoint.pt`` (:data:`LATEST`, the latest complete checkpoint) and, once
the run has finished, ``final.pt`` (:data:`FINAL`); both are written by
``lrcseg.train.checkpoint.save_checkpoint``. Everything that *reads* them goes through this
module: inference and evaluation (:func:`load_finetuned`), the probe, export
(:func:`load_pretrain_network`) and the initialisation of fine-tuning
(:func:`load_initialisation`), so none of those imports ``lrcseg.train``.

Pre-trained weights reach a plain ``FlexibleUNet`` in two forms: a pre-training checkpoint
(``PretrainNetwork.unet.*`` keys, :func:`pretrained_unet_weights`) or an export
(``lrcseg export``: a ``.pt`` state dict with its ``.json`` beside it, ``models.export``).
Neither holds a segmentation head; :func:`load_backbone` checks that everything else fits.

Integrity: every checkpoint is checked when it is loaded (:func:`load_checkpoint`): the CRC-32
of each record of its zip archive, which torch writes but ``torch.load`` never checks, then its
weights must be finite. A damaged file is refused with one line naming it (``DataError``), never
trained on or scored. A fine-tuned model for inference also refuses to output NaN or inf logits
(:class:`FiniteOutputGuard`), which an argmax would turn into all-background masks.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import FlexibleUNet

from lrcseg.config import (
    ModelConfig,
    PreprocessConfig,
    PretrainConfig,
    from_dict,
    read_config_file,
    to_dict,
    upgrade_model_dict,
)
from lrcseg.errors import ConfigError, DataError
from lrcseg.io_utils import first_line, zip_archive_fault
from lrcseg.models.export import load_exported, nonfinite_tensors
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.models.unet import SEGMENTATION_HEAD_PREFIX

LATEST = "checkpoint.pt"
FINAL = "final.pt"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` after checking that it is intact.

    The zip archive's CRC-32s are verified first (about 1.5 GB/s; a checkpoint of every lrcseg
    version has them), then the weights ("model", "network") must be finite. A damaged or
    unreadable file raises DataError naming it; for ``checkpoint.pt`` the message says that
    ``--resume`` cannot continue from it. Checkpoints of an older lrcseg are upgraded in
    memory (``upgrade_checkpoint``).
    """
    path = Path(path)
    try:
        fault = zip_archive_fault(path)
        if fault is None:
            state = torch.load(path, map_location=map_location, weights_only=False)
    except OSError as exc:
        raise DataError(path, f"cannot read checkpoint: {exc.strerror or first_line(exc)}") from exc
    except Exception as exc:  # torch raises many types for a damaged archive
        fault = f"{type(exc).__name__}: {first_line(exc)}"
    if fault is not None:
        raise DataError(path, f"checkpoint is damaged ({fault}){_damage_advice(path)}")
    if isinstance(state, dict):
        for key in ("model", "network"):
            bad = nonfinite_tensors(state.get(key))
            if bad:
                raise DataError(path, f"checkpoint holds NaN or inf in {len(bad)} weight tensors "
                                      f"of {key!r} (first: {bad[0]}){_damage_advice(path)}")
        state = upgrade_checkpoint(state)
    return state


def _damage_advice(path: Path) -> str:
    """What a user can do about a damaged checkpoint at ``path``."""
    if path.name == LATEST:
        return (": it was altered after it was written (disk, copy or transfer fault), so "
                "--resume cannot continue this run from it; restore checkpoint.pt from a copy, "
                "or run again with another --out")
    return (": it was altered after it was written (disk, copy or transfer fault) and cannot "
            "be used; restore it from a copy, or train it again")


def upgrade_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """Today's keys for a checkpoint of an older lrcseg.

    Before multi-level LRC: the model config's ``local_level`` becomes ``local_levels`` and
    the pre-training network's ``local_head.*`` weights become ``local_heads.0.*``. Before
    ``lrcseg.methods``: MoCo's and BYOL's state was nested in a loss module, so their
    "global_objective" keys ``moco.*`` / ``byol.*`` (``moco.queue.keys``,
    ``byol.target_encoder...``) lose that prefix (``queue.keys``, ``target_encoder...``).
    """
    config = state.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        config["model"] = upgrade_model_dict(config["model"])
    if isinstance(state.get("model_config"), dict):
        state["model_config"] = upgrade_model_dict(state["model_config"])
    network = state.get("network")
    if isinstance(network, dict) and any(k.startswith("local_head.") for k in network):
        state["network"] = {("local_heads.0." + k[len("local_head."):]
                             if k.startswith("local_head.") else k): v for k, v in network.items()}
    method = config.get("method") if isinstance(config, dict) else None
    objective = state.get("global_objective")
    if (method in ("moco", "byol") and isinstance(objective, dict) and objective
            and all(k.startswith(f"{method}.") for k in objective)):
        state["global_objective"] = _strip_prefix(objective, method)
    return state


def _strip_prefix(module_state: dict[str, Any], name: str) -> OrderedDict[str, Any]:
    """The state dict of submodule ``name`` from its parent's ``module_state`` (all keys under
    ``name.``), with the per-module metadata ``load_state_dict`` reads (versions) kept."""
    prefix = f"{name}."
    inner = OrderedDict((k[len(prefix):], v) for k, v in module_state.items())
    metadata = getattr(module_state, "_metadata", None)
    if metadata is not None:
        inner._metadata = OrderedDict(
            ("" if k == name else k[len(prefix):], v) for k, v in metadata.items()
            if k == name or k.startswith(prefix))
    return inner


def find_checkpoint(run_dir: Path, prefer_final: bool = True) -> Path | None:
    """The final checkpoint if present (and preferred), else the latest, else None."""
    run_dir = Path(run_dir)
    names = [FINAL, LATEST] if prefer_final else [LATEST]
    for name in names:
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def resolve_checkpoint(path: str | Path, what: str) -> Path:
    """A run folder's checkpoint (final.pt, else checkpoint.pt), or ``path`` itself if a file.

    what: the kind of run expected, for the error message ("pre-training run", ...).
    """
    path = Path(path)
    if path.is_dir():
        found = find_checkpoint(path)
        if found is None:
            raise ConfigError(f"{path}: not a {what} folder (no final.pt or checkpoint.pt)")
        return found
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} folder or checkpoint file")
    return path


def load_pretrain_network(path: str | Path) -> tuple[PretrainNetwork, PretrainConfig, dict[str, Any]]:
    """(PretrainNetwork with the checkpoint's weights, its PretrainConfig, the checkpoint) of a
    pre-training run folder or checkpoint file; ConfigError if it is not a pre-training one."""
    ckpt = resolve_checkpoint(path, "pre-training run")
    state = load_checkpoint(ckpt)
    if state.get("kind") != "pretrain":
        raise ConfigError(f"{ckpt}: not a pre-training checkpoint (kind={state.get('kind')})")
    cfg = from_dict(PretrainConfig, state["config"])
    net = PretrainNetwork(cfg.model, cfg.preprocess.in_channels)
    net.load_state_dict(state["network"])
    state["path"] = str(ckpt)
    return net, cfg, state


def pretrained_unet_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The U-Net weights of a pre-training checkpoint (``PretrainNetwork.unet``), keyed as in
    a plain ``FlexibleUNet``, without the segmentation head (pre-training never trains it)."""
    if (state.get("config", {}).get("model") or {}).get("nnunet"):
        raise ConfigError("this run pre-trained an nnU-Net plans network: fine-tune it with "
                          "nnU-Net (lrcseg export RUN --format nnunet --out FILE.pth, then "
                          "nnUNetv2_train ... -pretrained_weights FILE.pth)")
    return {k[len("unet."):]: v for k, v in state["network"].items()
            if k.startswith("unet.") and not k.startswith("unet." + SEGMENTATION_HEAD_PREFIX)}


def load_backbone(unet: FlexibleUNet, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load encoder + decoder ``weights`` into ``unet``; every key but the segmentation head's
    must fit (ConfigError naming ``source`` otherwise)."""
    result = unet.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(SEGMENTATION_HEAD_PREFIX)]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{source}: weights do not fit the FlexibleUNet (missing {missing[:5]}, "
                          f"unexpected {list(result.unexpected_keys)[:5]})")


def load_initialisation(init: str, model_cfg: ModelConfig, preprocess: PreprocessConfig,
                        allow_mismatch: bool) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """U-Net weights (without segmentation head) and their provenance from ``init``.

    init: "scratch"; a pre-training run folder (final.pt or checkpoint.pt); a pre-training
    checkpoint file; or an exported ``.pt`` with its ``.json`` beside it. Window, spacing and
    input channels must match the fine-tuning preprocessing (ConfigError, or a warning with
    ``allow_mismatch``); the backbone must match (always an error).
    """
    if init == "scratch":
        return None, {"init": "scratch"}
    path = resolve_checkpoint(init, "pre-training run")
    if path.with_suffix(".json").is_file():
        weights, meta = load_exported(path)
        their_pre = from_dict(PreprocessConfig, meta["preprocess"])
        their_backbone = meta["flexible_unet"]["backbone"]
        if meta["flexible_unet"].get("spatial_dims", 2) != model_cfg.spatial_dims:
            raise ConfigError(f"{path}: {meta['flexible_unet']['spatial_dims']}D weights; lrcseg "
                              f"fine-tunes {model_cfg.spatial_dims}D slices")
    else:
        state = load_checkpoint(path)
        if state.get("kind") != "pretrain":
            raise ConfigError(f"{path}: not a pre-training checkpoint (kind={state.get('kind')})")
        their_pre = from_dict(PreprocessConfig, state["config"]["preprocess"])
        their_backbone = state["config"]["model"]["backbone"]
        if state["config"]["model"].get("spatial_dims", 2) != model_cfg.spatial_dims:
            raise ConfigError(
                f"{path}: a {state['config']['model']['spatial_dims']}D pre-training; lrcseg "
                f"fine-tunes {model_cfg.spatial_dims}D slices. A 3D pre-training initialises "
                "nnU-Net's 3d_fullres: lrcseg export RUN --format nnunet, then nnUNetv2_train "
                "... 3d_fullres ... -pretrained_weights")
        weights = pretrained_unet_weights(state)
    if their_backbone != model_cfg.backbone:
        raise ConfigError(f"{path}: was trained with backbone {their_backbone}, fine-tuning asks "
                          f"for {model_cfg.backbone}; pass --backbone {their_backbone}")
    mismatches = [f"{name}: pre-training {a}, fine-tuning {b}" for name, a, b in [
        ("window_hu", their_pre.windows, preprocess.windows),
        ("spacing_mm", their_pre.spacing_mm, preprocess.spacing_mm),
        ("in_channels", their_pre.in_channels, preprocess.in_channels)] if a != b]
    if mismatches:
        message = f"{path}: preprocessing differs from the initialising run: " + "; ".join(mismatches)
        if not allow_mismatch:
            raise ConfigError(message + " (use the same settings, or --allow-mismatch)")
        warnings.warn(message, stacklevel=2)
    return weights, {"init": str(path), "pretrain_preprocess": to_dict(their_pre)}


class FiniteOutputGuard:
    """A forward hook that raises DataError naming the model file when the network outputs
    NaN or inf: an argmax would turn such logits into all-background masks (Dice 0) without a
    word. One ``isfinite`` reduction per batch of slices."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
            raise DataError(self.path, "the model outputs NaN or inf logits: its weights are "
                                       "unusable (diverged or altered), so it cannot predict or "
                                       "be evaluated; fine-tune it again")


def load_finetuned(run_or_file: str | Path, device: torch.device | str = "cpu"
                   ) -> tuple[FlexibleUNet, dict[str, Any]]:
    """A fine-tuned model ready for inference, with its metadata.

    Returns (model in eval mode, meta) where meta has "preprocess" (PreprocessConfig),
    "labels" (name -> id), "flexible_unet" (constructor kwargs) and "model_config"
    (ModelConfig). The checkpoint is checked by :func:`load_checkpoint`; the model carries a
    :class:`FiniteOutputGuard`, so a forward pass that gives NaN or inf raises DataError.
    """
    path = resolve_checkpoint(run_or_file, "fine-tuning run")
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") != "finetune":
        raise ConfigError(f"{path}: not a fine-tuned model (kind={state.get('kind')})")
    model = FlexibleUNet(**state["flexible_unet"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    model.register_forward_hook(FiniteOutputGuard(path))
    meta = {"preprocess": from_dict(PreprocessConfig, state["preprocess"]),
            "labels": state["labels"], "flexible_unet": state["flexible_unet"],
            "model_config": from_dict(ModelConfig, state["model_config"])}
    return model, meta


#: what an initialising run fixes for fine-tuning (its weights only fit with these)
FIXED_BY_INIT = {"model": ("backbone", "decoder_channels"), "preprocess": tuple(
    f.name for f in PreprocessConfig.__dataclass_fields__.values())}


def initialisation_settings(init: str) -> dict[str, dict[str, Any]]:
    """The settings ``init`` fixes for a fine-tuning from it, as nested config overrides:
    {"model": {backbone, decoder_channels}, "preprocess": {every preprocessing field}}.

    Fine-tuning starts from them (``load_config(..., base=...)``), so ``finetune --init RUN``
    needs no repeated ``--backbone`` or ``--spacing``; a value the user sets explicitly still
    wins and :func:`load_initialisation` refuses it if it conflicts. A run folder is read from
    its config.yaml (no weights loaded); "scratch" fixes nothing.
    """
    if init == "scratch":
        return {}
    source = Path(init)
    if source.is_dir() and (source / "config.yaml").is_file():
        config = read_config_file(source / "config.yaml")
        model, preprocess = upgrade_model_dict(config.get("model") or {}), config.get("preprocess") or {}
    else:
        path = resolve_checkpoint(init, "pre-training run")
        if path.with_suffix(".json").is_file():
            _, meta = load_exported(path)
            model, preprocess = meta["flexible_unet"], meta["preprocess"]
        else:
            state = load_checkpoint(path)
            model, preprocess = state["config"]["model"], state["config"]["preprocess"]
    settings = {section: {key: source_dict[key] for key in keys if key in source_dict}
                for section, keys, source_dict in (("model", FIXED_BY_INIT["model"], model),
                                                   ("preprocess", FIXED_BY_INIT["preprocess"],
                                                    preprocess))}
    if model.get("nnunet") is not None:
        return {"preprocess": settings["preprocess"]}  # an nnU-Net network: no FlexibleUNet keys
    return settings
