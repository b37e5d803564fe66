"""Global objectives: each loss equals a plain reference; BYOL's EMA; supervised Dice + CE."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrcseg.config import PRETRAIN_METHODS, ModelConfig, PretrainConfig, RunConfig
from lrcseg.errors import ConfigError
from lrcseg.losses.byol import BYOL, byol_regression, cosine_momentum
from lrcseg.losses.simclr import SimCLRLoss, nt_xent
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.train.objectives import (
    BYOLObjective,
    NoGlobalObjective,
    SimCLRObjective,
    SupervisedObjective,
    Views,
    build_global_objective,
)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def nt_xent_reference(z1, z2, t):
    """NT-Xent written as the paper's sum over anchors, one term at a time."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n, B = len(z), z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + B) % n
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    return total / n


def test_nt_xent_matches_plain_reference():
    z1, z2 = unit(5, 8, seed=1), unit(5, 8, seed=2)
    for t in (0.1, 0.5):
        loss, acc = nt_xent(z1, z2, t)
        assert loss.item() == pytest.approx(nt_xent_reference(z1, z2, t), rel=1e-5)
        assert 0 <= acc.item() <= 1


def test_nt_xent_known_answers():
    z = unit(4, 16, seed=3)
    matched, acc = nt_xent(z, z, 0.1)
    assert acc.item() == 1.0  # the positive is an exact copy
    shuffled, _ = nt_xent(z, z.roll(1, dims=0), 0.1)
    assert matched.item() < shuffled.item()
    # two orthogonal samples, identical views: positives cos 1, negatives cos 0
    e = torch.eye(2)
    expected = -math.log(math.e ** 10 / (math.e ** 10 + 2))
    assert nt_xent(e, e, 0.1)[0].item() == pytest.approx(expected, rel=1e-3)  # float32 near 0
    with pytest.raises(ValueError, match="temperature"):
        SimCLRLoss(0.0)


def test_simclr_objective_uses_global_embeddings():
    z1, z2 = unit(3, 8, seed=4), unit(3, 8, seed=5)
    loss, stats = SimCLRObjective(0.2)({"global": z1}, {"global": z2}, None)
    assert loss.item() == pytest.approx(nt_xent_reference(z1, z2, 0.2), rel=1e-5)
    assert "simclr_acc" in stats


class TinyOnline(nn.Module):
    """The part of PretrainNetwork BYOL needs: cfg.proj_dim and encode_global."""

    def __init__(self, dim=4):
        super().__init__()
        self.cfg = SimpleNamespace(proj_dim=dim)
        self.proj = nn.Linear(6, dim)

    def encode_global(self, x):
        return F.normalize(self.proj(x.flatten(1)), dim=1)


def test_byol_loss_matches_reference_and_is_symmetric():
    torch.manual_seed(0)
    online = TinyOnline()
    byol = BYOL(online, base_momentum=0.99, hidden_dim=8).eval()  # BN uses running stats
    x1, x2 = torch.randn(5, 6), torch.randn(5, 6)
    z1, z2 = online.encode_global(x1), online.encode_global(x2)
    loss, stats = byol(z1, z2, x1, x2)
    t1, t2 = online.encode_global(x1), online.encode_global(x2)  # target == online at start
    q1, q2 = byol.predictor(z1), byol.predictor(z2)
    ref = 0.0
    for q, t in ((q1, t2), (q2, t1)):
        for i in range(5):
            ref += (F.normalize(q[i], dim=0) - F.normalize(t[i], dim=0)).pow(2).sum().item() / 10
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert byol(z2, z1, x2, x1)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    assert stats["byol_cos"].item() == pytest.approx(1 - ref / 2, rel=1e-5)
    # gradients reach the predictor and the online embeddings, never the target
    loss.backward()
    assert byol.predictor.mlp[0].weight.grad is not None
    assert online.proj.weight.grad is not None
    assert all(p.grad is None for p in byol.target_encoder.parameters())
    assert byol_regression(torch.ones(1, 3), torch.ones(1, 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_regression(torch.ones(1, 3), -torch.ones(1, 3)).item() == pytest.approx(4.0)


def test_byol_momentum_anneals_from_base_to_one_and_updates_target():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    online = TinyOnline()
    objective = BYOLObjective(online, base_momentum=0.9, hidden_dim=8)
    target = objective.byol.target_encoder
    before = target.proj.weight.clone()
    with torch.no_grad():
        online.proj.weight.add_(1.0)
    objective.after_step(0, 10)  # tau = 0.9
    assert torch.allclose(target.proj.weight, 0.9 * before + 0.1 * online.proj.weight)
    frozen = target.proj.weight.clone()
    objective.after_step(10, 10)  # tau = 1: the target stays
    assert torch.equal(target.proj.weight, frozen)
    with pytest.raises(ValueError, match="momentum"):
        BYOL(online, base_momentum=1.0)


def dice_ce_reference(logits, labels, num_classes, smooth=1e-5):
    """Softmax Dice over the whole batch per class (mean over classes) + mean cross-entropy."""
    p = logits.softmax(dim=1)
    dice = 0.0
    for c in range(num_classes):
        y = (labels == c).float()
        inter = (p[:, c] * y).sum()
        dice += 1 - (2 * inter + smooth) / (p[:, c].sum() + y.sum() + smooth)
    ce = -logits.log_softmax(dim=1).gather(1, labels[:, None]).mean()
    return dice / num_classes + ce


def test_supervised_objective_is_dice_plus_ce_on_both_views():
    torch.manual_seed(0)
    objective = SupervisedObjective(decoder_channels=4, num_classes=3)
    d1, d2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    y1, y2 = torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 3, (2, 8, 8))
    g = torch.Generator()
    loss, _ = objective({"decoder": d1}, {"decoder": d2}, Views(None, None, g, g, y1, y2))
    ref = (dice_ce_reference(objective.head(d1), y1, 3) + dice_ce_reference(objective.head(d2), y2, 3)) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="labels"):
        objective({"decoder": d1}, {"decoder": d2}, Views(None, None, g, g))


def test_supervised_objective_uses_only_the_labelled_slices():
    torch.manual_seed(1)
    objective = SupervisedObjective(decoder_channels=4, num_classes=3)
    d1, d2 = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    y1, y2 = torch.randint(0, 3, (3, 8, 8)), torch.randint(0, 3, (3, 8, 8))
    g = torch.Generator()
    mask = torch.tensor([True, False, True])
    loss, _ = objective({"decoder": d1}, {"decoder": d2}, Views(None, None, g, g, y1, y2, labelled=mask))
    ref, _ = objective({"decoder": d1[mask]}, {"decoder": d2[mask]},
                       Views(None, None, g, g, y1[mask], y2[mask]))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    none = torch.zeros(3, dtype=torch.bool)
    zero, _ = objective({"decoder": d1}, {"decoder": d2}, Views(None, None, g, g, y1, y2, labelled=none))
    zero.backward()
    assert zero.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in objective.parameters())


def test_none_objective_is_zero_and_logs_nothing():
    objective = NoGlobalObjective()
    loss, stats = objective({"global": unit(2, 4)}, {"global": unit(2, 4)}, None)
    assert loss.item() == 0.0 and stats == {} and not objective.logs_global


def small_cfg(method, **kw):
    return PretrainConfig(method=method, run=RunConfig(batch_size=4, **kw),
                          model=ModelConfig(backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8),
                                            proj_dim=16))


def test_full_decoder_forward_agrees_with_the_network():
    cfg = small_cfg("supervised")
    torch.manual_seed(0)
    net = PretrainNetwork(cfg.model, 1).eval()
    x = torch.rand(2, 1, 64, 64)
    full, plain = net(x, full_decoder=True), net(x)
    assert torch.allclose(full["global"], plain["global"], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full["local"], plain["local"], strict=True))
    assert full["decoder"].shape == (2, 8, 64, 64)
    with torch.no_grad():
        reference = net.unet.decoder(net.unet.encoder(x), net.unet.skip_connect)
    assert torch.allclose(full["decoder"], reference, atol=1e-6)


def test_build_global_objective_checks():
    net = PretrainNetwork(small_cfg("moco").model, 1)
    for method, kind in [("simclr", SimCLRObjective), ("byol", BYOLObjective),
                         ("none", NoGlobalObjective)]:
        assert isinstance(build_global_objective(small_cfg(method), net, num_slices=40), kind)
    with pytest.raises(ConfigError, match="--labels"):
        build_global_objective(small_cfg("supervised"), net, num_slices=40)
    assert build_global_objective(small_cfg("supervised"), net, 40, num_classes=4).num_classes == 4
    cfg = small_cfg("moco")
    cfg.moco.queue_size = 24  # multiple of 2 x 4, not of 2 x 4 x 2 ranks
    build_global_objective(cfg, net, 40)
    with pytest.raises(ConfigError, match="2 x global batch = 16"):
        build_global_objective(cfg, net, 40, world_size=2, gather_negatives=True)


def test_every_registered_method_is_built():
    net = PretrainNetwork(small_cfg("moco").model, 1)
    for method in PRETRAIN_METHODS:
        assert isinstance(build_global_objective(small_cfg(method), net, 40, num_classes=4),
                          nn.Module)
