"""U-Net builder, projection heads and the pre-training network."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import FlexibleUNet

from lrcseg.config import ModelConfig
from lrcseg.models.heads import GlobalProjectionHead, LocalProjectionHead
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.models.unet import build_unet, encoder_channels, flexible_unet_kwargs


def test_unet_kwargs_and_build():
    cfg = ModelConfig(backbone="resnet10", decoder_channels=(64, 32, 16, 8, 8))
    kwargs = flexible_unet_kwargs(cfg, 3, 5)
    assert kwargs == {"in_channels": 3, "out_channels": 5, "backbone": "resnet10", "pretrained": False,
                      "decoder_channels": [64, 32, 16, 8, 8], "spatial_dims": 2}
    net = build_unet(cfg, 3, 5)
    assert isinstance(net, FlexibleUNet)
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 5, 64, 64)
    assert encoder_channels("resnet18")[-1] == 512 and encoder_channels("resnet50")[-1] == 2048
    with pytest.raises(ValueError, match="in_channels"):
        flexible_unet_kwargs(cfg, 0, 5)


def test_heads_shapes_norms_and_validation():
    g = GlobalProjectionHead(32, 32, 8)
    z = g(torch.randn(3, 32, 2, 2))
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    # pooling inside the head = pooling before it
    f = torch.randn(3, 32, 2, 2)
    torch.testing.assert_close(g(f), g(f.mean(dim=(2, 3))))
    loc = LocalProjectionHead(16, 8)
    z = loc(torch.randn(2, 16, 5, 7))
    assert z.shape == (2, 8, 5, 7)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 5, 7))
    with pytest.raises(ValueError, match="out_dim"):
        GlobalProjectionHead(32, 32, 0)
    with pytest.raises(ValueError, match="in_channels"):
        LocalProjectionHead(0, 8)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_pretrain_network_outputs(backbone, in_channels):
    torch.manual_seed(0)
    net = PretrainNetwork(ModelConfig(backbone=backbone, proj_dim=32, local_levels=(2,)), in_channels)
    out = net(torch.rand(2, in_channels, 64, 64))
    assert out["global"].shape == (2, 32)
    assert out["local"][0].shape == (2, 32, 16, 16)  # 1/4 resolution
    torch.testing.assert_close(out["global"].norm(dim=1), torch.ones(2))
    assert not torch.allclose(out["local"][0].norm(dim=1), torch.ones(2, 16, 16))  # LRCLoss normalises
    keys = net.backbone_state_dict().keys()
    assert not any(k.startswith("segmentation_head") for k in keys)
    assert set(keys) == {k for k in net.unet.state_dict() if not k.startswith("segmentation_head")}


def test_local_features_equal_hooked_decoder_block_and_encode_global():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet10", local_levels=(1, 3), proj_dim=16)
    net = PretrainNetwork(cfg, 1).eval()
    x = torch.rand(2, 1, 64, 64)
    captured = {}
    hooks = [net.unet.decoder.blocks[i].register_forward_hook(
        lambda m, inp, o, i=i: captured.setdefault(i, o)) for i in (1, 3)]
    net.unet(x)  # MONAI's own full forward
    for hook in hooks:
        hook.remove()
    out = net(x)
    assert out["local"][0].shape == (2, 16, 8, 8)  # level 1 = stride 8
    assert out["local"][1].shape == (2, 16, 32, 32)  # level 3 = stride 2
    torch.testing.assert_close(out["local"][0], net.local_heads[0](captured[1]))
    torch.testing.assert_close(out["local"][1], net.local_heads[1](captured[3]))
    torch.testing.assert_close(net.encode_global(x), out["global"])


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    net = PretrainNetwork(ModelConfig(backbone="resnet10", proj_dim=16, local_levels=(2,)),
                          1).to(memory_format=torch.channels_last)
    x = torch.rand(2, 1, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out["global"].dtype == torch.float32 and out["local"][0].dtype == torch.float32
    (out["global"].sum() + out["local"][0].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert net.unet.encoder.conv1.weight.grad.abs().sum() > 0


def test_resolve_checkpoint_prefers_final_then_latest(tmp_path):
    from lrcseg.errors import ConfigError
    from lrcseg.models.load import FINAL, LATEST, find_checkpoint, resolve_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    assert find_checkpoint(run) is None
    with pytest.raises(ConfigError, match="not a fine-tuning run folder"):
        resolve_checkpoint(run, "fine-tuning run")
    with pytest.raises(ConfigError, match="no such pre-training run"):
        resolve_checkpoint(tmp_path / "missing", "pre-training run")
    (run / LATEST).write_bytes(b"")
    assert resolve_checkpoint(run, "run") == run / LATEST
    (run / FINAL).write_bytes(b"")
    assert resolve_checkpoint(run, "run") == run / FINAL
    assert find_checkpoint(run, prefer_final=False) == run / LATEST
    assert resolve_checkpoint(run / LATEST, "run") == run / LATEST  # a file is itself


def test_pretrained_weights_fill_a_plain_unet_but_its_head(tmp_path):
    from lrcseg.errors import ConfigError
    from lrcseg.models.load import load_backbone, load_finetuned, pretrained_unet_weights

    cfg = ModelConfig(backbone="resnet10", proj_dim=8)
    net = PretrainNetwork(cfg, 1)
    state = {"kind": "pretrain", "network": net.state_dict(), "config": {"model": {}}}
    weights = pretrained_unet_weights(state)
    assert weights and not any(k.startswith(("unet.", "segmentation_head.")) for k in weights)
    unet = build_unet(cfg, 1, 3)
    load_backbone(unet, weights, "run")
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(ConfigError, match="run: weights do not fit"):
        load_backbone(build_unet(ModelConfig(backbone="resnet18"), 1, 3), weights, "run")
    with pytest.raises(ConfigError, match="nnU-Net"):
        pretrained_unet_weights({**state, "config": {"model": {"nnunet": {"plans": "p.json"}}}})
    torch.save(state, tmp_path / "final.pt")
    with pytest.raises(ConfigError, match="not a fine-tuned model"):
        load_finetuned(tmp_path)
