"""MoCo v2 pieces: queue, momentum update, queue size rule, InfoNCE, shuffled BN, the method
and its options (the ``moco:`` section)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lrcseg.config import ModelConfig, PretrainConfig, from_dict
from lrcseg.errors import ConfigError
from lrcseg.losses.infonce import InfoNCELoss, infonce
from lrcseg.methods.base import Views, build_method
from lrcseg.methods.moco import MoCo, MoCoQueue, default_queue_size, shuffled_forward
from lrcseg.methods.moco_options import MocoConfig
from lrcseg.methods.momentum import momentum_update
from lrcseg.models.pretrain_net import PretrainNetwork


def test_queue_enqueue_wraps_around_and_round_trips():
    queue = MoCoQueue(dim=3, size=6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(6))
    batches = [torch.full((2, 3), float(i)) for i in range(1, 5)]
    for i, batch in enumerate(batches[:3]):
        queue.enqueue(batch)
        assert int(queue.ptr) == (2 * (i + 1)) % 6
    assert queue.keys[:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    queue.enqueue(batches[3])  # wraps: overwrites the oldest rows
    assert queue.keys[:, 0].tolist() == [4, 4, 2, 2, 3, 3]
    assert int(queue.ptr) == 2

    restored = MoCoQueue(dim=3, size=6)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and int(restored.ptr) == 2

    with pytest.raises(ValueError, match="not a multiple"):
        queue.enqueue(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        queue.enqueue(torch.zeros(2, 5))


def test_momentum_update_rule():
    torch.manual_seed(0)
    online, target = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.clone() for p in target.parameters()]
    momentum_update(online, target, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
    momentum_update(online, target, 0.9)
    for b, o, t in zip(before, online.parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    momentum_update(online, target, 0.0)
    assert all(torch.equal(o, t) for o, t in zip(online.parameters(), target.parameters(), strict=True))
    with pytest.raises(ValueError, match="different parameters"):
        momentum_update(online, nn.Linear(4, 2), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(online, target, 1.5)


def test_default_queue_size():
    assert default_queue_size(1000, 32) == 224  # 250 rounded down to 7 batches
    assert default_queue_size(100, 32) == 32  # at least one batch
    assert default_queue_size(10**7, 48) == 65520  # capped at 65536, multiple of 48
    assert default_queue_size(10**7, 256) == 65536
    with pytest.raises(ValueError):
        default_queue_size(0, 8)


def test_infonce_equals_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    k = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    t = 0.5
    expected = 0.0
    for i in range(2):
        pos = float(q[i] @ k[i]) / t
        neg = [float(q[i] @ queue[j]) / t for j in range(3)]
        expected += -(pos - math.log(math.exp(pos) + sum(math.exp(n) for n in neg)))
    assert infonce(q, k, queue, t).item() == pytest.approx(expected / 2, rel=1e-6)
    assert InfoNCELoss(t)(q, k, queue).item() == pytest.approx(expected / 2, rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(0.0)


def test_shuffled_forward_keeps_order_and_uses_sub_batch_statistics():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)) * 3 + 1
    gen = torch.Generator().manual_seed(2)
    torch.testing.assert_close(shuffled_forward(lambda c: c * 2, x, 4, gen), x * 2)
    bn = nn.BatchNorm1d(4, affine=False)
    full = bn(x)
    shuffled = shuffled_forward(bn, x, 2, torch.Generator().manual_seed(3))
    assert not torch.allclose(full, shuffled, atol=1e-3)
    # recover the split: each half of the permutation is normalised by its own statistics
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    for half in perm.chunk(2):
        chunk = x[half]
        expected = (chunk - chunk.mean(0)) / torch.sqrt(chunk.var(0, unbiased=False) + bn.eps)
        torch.testing.assert_close(shuffled[half], expected)
    bn.eval()
    torch.testing.assert_close(shuffled_forward(bn, x, 2, gen), bn(x))


def _moco_step(moco: MoCo, online: PretrainNetwork, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.rand(4, 1, 64, 64, generator=gen)
    x2 = torch.rand(4, 1, 64, 64, generator=gen)
    loss, stats = moco(online(x1), online(x2), Views(x1, x2, gen, gen))
    assert 0 <= stats["moco_acc"].item() <= 1
    return loss


def test_mocov2_step_and_exact_resume():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet10", proj_dim=16)
    online = PretrainNetwork(cfg, in_channels=1)
    moco = MoCo(online, queue_size=8, momentum=0.5, seed=0)
    assert not any(p.requires_grad for p in moco.key_encoder.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.01)
    target_before = [p.clone() for p in moco.key_encoder.parameters()]
    loss = _moco_step(moco, online, seed=1)
    assert loss.item() > 0 and math.isfinite(loss.item())
    loss.backward()
    assert online.global_head.mlp[0].weight.grad.abs().sum() > 0
    for b, o, t in zip(target_before, online.parameters(), moco.key_encoder.parameters(), strict=True):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * o)
    assert int(moco.queue.ptr) == 0  # 2 x 4 keys filled the queue of 8 and wrapped
    assert {"queue.keys", "queue.ptr"} <= set(moco.state_dict())

    # a fresh MoCo restored from the state dict continues identically
    resumed = MoCo(online, queue_size=8, momentum=0.5, seed=1)
    resumed.load_state_dict(moco.state_dict())
    a = _moco_step(moco, online, seed=2)
    b = _moco_step(resumed, online, seed=2)
    assert a.item() == b.item()
    assert torch.equal(moco.queue.keys, resumed.queue.keys)
    torch.testing.assert_close(moco.queue.keys.norm(dim=1), torch.ones(8))
    # the keys of step 2 (view 1 then view 2) are the queue: recompute them by hand
    gen = torch.Generator().manual_seed(2)
    x1 = torch.rand(4, 1, 64, 64, generator=gen)
    torch.rand(4, 1, 64, 64, generator=gen)  # x2: advance the generator as the step did
    with torch.no_grad():
        k1 = shuffled_forward(moco.key_encoder.encode_global, x1, 2, gen)
    torch.testing.assert_close(moco.queue.keys[:4], k1)


def test_mocov2_validates():
    online = PretrainNetwork(ModelConfig(backbone="resnet10", proj_dim=8), in_channels=1)
    with pytest.raises(ValueError, match="momentum"):
        MoCo(online, queue_size=8, momentum=1.0)
    with pytest.raises(ValueError, match="temperature"):
        MoCo(online, queue_size=8, temperature=0.0)
    with pytest.raises(ValueError, match="queue size"):
        MoCo(online, queue_size=0)


def test_position_positives_match_the_plain_loss_without_matches_and_a_hand_value_with_them():
    gen = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(2, 4, generator=gen), dim=1)
    k = torch.nn.functional.normalize(torch.randn(2, 4, generator=gen), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen), dim=1)
    plain = infonce(q, k, queue, 0.2)
    unmatched = infonce(q, k, queue, 0.2, torch.tensor([0, 1]), torch.tensor([-1, 5, 7]))
    torch.testing.assert_close(unmatched, plain)
    # query 0 (group 2) has queue key 1 as a second positive; query 1 (group 4) none
    value = infonce(q, k, queue, 0.2, torch.tensor([2, 4]), torch.tensor([-1, 2, 7]))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / 0.2
    log_prob = logits.log_softmax(dim=1)
    expected = (-(log_prob[0, 0] + log_prob[0, 2]) / 2 - log_prob[1, 0]) / 2
    torch.testing.assert_close(value, expected)


def test_grouped_queue_stores_groups_and_moco_needs_them():
    queue = MoCoQueue(dim=3, size=4, grouped=True)
    assert queue.groups.tolist() == [-1, -1, -1, -1]  # initial random keys match nothing
    queue.enqueue(torch.ones(2, 3), torch.tensor([3, 1]))
    assert queue.groups.tolist() == [3, 1, -1, -1]
    with pytest.raises(ValueError, match="groups"):
        queue.enqueue(torch.ones(2, 3))
    torch.manual_seed(0)
    net = PretrainNetwork(ModelConfig(backbone="resnet10", proj_dim=8, local_levels=(1,)), 1)
    moco = MoCo(net, queue_size=8, position_partitions=4)
    x = torch.rand(2, 1, 64, 64)
    out = net(x)
    g = torch.Generator()
    with pytest.raises(ValueError, match="groups"):
        moco(out, out, Views(x, x, g, g))
    loss, _ = moco(out, out, Views(x, x, g, g, groups=torch.tensor([0, 2])))
    assert torch.isfinite(loss)
    assert moco.queue.groups.tolist()[:4] == [0, 2, 0, 2]  # both views' keys, with their groups


def test_moco_is_built_from_its_section_of_the_config():
    cfg = from_dict(PretrainConfig, {
        "method": "moco", "run": {"batch_size": 2},
        "model": {"backbone": "resnet10", "proj_dim": 8, "local_levels": [1]},
        "moco": {"momentum": 0.5, "temperature": 0.1, "queue_size": 12, "shuffle_bn": False,
                 "position_partitions": 3}})
    assert cfg.options() is cfg.moco and MoCo.options is MocoConfig
    moco = build_method(cfg, PretrainNetwork(cfg.model, 1), num_slices=40)
    assert (moco.momentum, moco.loss.temperature, moco.queue.size) == (0.5, 0.1, 12)
    assert (moco.shuffle_splits, moco.position_partitions) == (1, 3)
    cfg.moco.queue_size = 10  # not a multiple of 2 x batch_size = 4
    with pytest.raises(ConfigError, match="moco.queue_size 10 must be a multiple"):
        build_method(cfg, PretrainNetwork(cfg.model, 1), num_slices=40)
