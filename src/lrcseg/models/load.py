"""Loading a trained model for inference from its run folder or checkpoint file."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import FlexibleUNet

from lrcseg.config import ModelConfig, PreprocessConfig, from_dict
from lrcseg.errors import ConfigError
from lrcseg.train.checkpoint import load_checkpoint, resolve_checkpoint


def load_finetuned(run_or_file: str | Path, device: torch.device | str = "cpu"):
    """A fine-tuned model ready for inference, with its metadata.

    Returns (model in eval mode, meta) where meta has "preprocess" (PreprocessConfig),
    "labels" (name -> id) and "flexible_unet" (constructor kwargs).
    """
    path = resolve_checkpoint(run_or_file, "fine-tuning run")
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") != "finetune":
        raise ConfigError(f"{path}: not a fine-tuned model (kind={state.get('kind')})")
    model = FlexibleUNet(**state["flexible_unet"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    meta = {"preprocess": from_dict(PreprocessConfig, state["preprocess"]),
            "labels": state["labels"], "flexible_unet": state["flexible_unet"],
            "model_config": from_dict(ModelConfig, state["model_config"])}
    return model, meta
