"""Exported weights load into a plain MONAI FlexibleUNet: only the segmentation head is missing."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import FlexibleUNet

from lrcseg.config import ModelConfig, PreprocessConfig, SuperpixelConfig, to_dict
from lrcseg.errors import ConfigError, DataError
from lrcseg.models.export import export_weights, load_exported, meta_path
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.models.unet import build_unet


def test_export_loads_into_flexible_unet(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet10")
    net = PretrainNetwork(cfg, in_channels=3)
    out = tmp_path / "export" / "model.pt"
    pre = to_dict(PreprocessConfig(context_slices=3))
    weights_path, json_path = export_weights(net, cfg, 3, pre, to_dict(SuperpixelConfig()), out)
    assert weights_path == out and json_path == meta_path(out) == tmp_path / "export" / "model.json"

    # plain torch + MONAI, no lrcseg
    meta = json.loads(json_path.read_text())
    state = torch.load(out, weights_only=True)
    fresh = FlexibleUNet(**meta["flexible_unet"], out_channels=4)
    result = fresh.load_state_dict(state, strict=False)
    head_keys = {k for k in fresh.state_dict() if k.startswith("segmentation_head.")}
    assert head_keys and set(result.missing_keys) == head_keys
    assert result.unexpected_keys == []
    for k, v in net.backbone_state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert meta["preprocess"]["window_hu"] == [-175.0, 250.0] and meta["in_channels"] == 3
    assert meta["superpixels"]["scale"] == 100.0

    sd, meta2 = load_exported(out)
    assert meta2 == meta and sd.keys() == state.keys()
    assert len(list((tmp_path / "export").iterdir())) == 2  # no temporary leftovers


def test_export_from_flexible_unet_and_errors(tmp_path):
    cfg = ModelConfig(backbone="resnet10")
    unet = build_unet(cfg, 1, 3)
    export_weights(unet, cfg, 1, {}, None, tmp_path / "a.pt")
    sd, meta = load_exported(tmp_path / "a.pt")
    assert not any(k.startswith("segmentation_head") for k in sd) and meta["superpixels"] is None
    with pytest.raises(ConfigError, match="wrong shape"):
        export_weights(unet, cfg, 3, {}, None, tmp_path / "b.pt")  # in_channels mismatch
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "b.json").exists()
    with pytest.raises(DataError, match="not found"):
        load_exported(tmp_path / "missing.pt")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(DataError, match="not an lrcseg export"):
        load_exported(tmp_path / "a.pt")
