"""Global methods: each loss equals a plain reference; BYOL's EMA; supervised Dice + CE; the
registry (names and options without torch, a toy method with its own options dataclass added
by one registered class: read from YAML, validated, saved in config.yaml, fixed on --resume,
run through ``lrcseg pretrain`` on an unnormalised global output); old checkpoints' method
state loads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lrcseg.cli import main
from lrcseg.config import (
    InitSpec,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from lrcseg.errors import ConfigError
from lrcseg.losses.byol import BYOLLoss, byol_regression
from lrcseg.losses.simclr import SimCLRLoss, nt_xent
from lrcseg.methods.base import GlobalMethod, Views, build_method
from lrcseg.methods.byol import BYOL, cosine_momentum
from lrcseg.methods.none import NoGlobal
from lrcseg.methods.registry import (
    FREE_ON_RESUME,
    method_class,
    method_names,
    options_class,
    options_fixed_on_resume,
    register_method,
)
from lrcseg.methods.simclr import SimCLR
from lrcseg.methods.supervised import Supervised
from lrcseg.models.load import load_checkpoint, upgrade_checkpoint
from lrcseg.models.pretrain_net import PretrainNetwork
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train.resume import check_resume_compatible


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
    loss, stats = SimCLR(0.2)({"global": z1}, {"global": z2}, None)
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
    g = torch.Generator()
    loss, stats = byol({"global": z1}, {"global": z2}, Views(x1, x2, g, g))
    t1, t2 = online.encode_global(x1), online.encode_global(x2)  # target == online at start
    q1, q2 = byol.predictor(z1), byol.predictor(z2)
    ref = 0.0
    for q, t in ((q1, t2), (q2, t1)):
        for i in range(5):
            ref += (F.normalize(q[i], dim=0) - F.normalize(t[i], dim=0)).pow(2).sum().item() / 10
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert byol({"global": z2}, {"global": z1}, Views(x2, x1, g, g))[0].item() == pytest.approx(
        loss.item(), rel=1e-6)
    assert stats["byol_cos"].item() == pytest.approx(1 - ref / 2, rel=1e-5)
    # gradients reach the predictor and the online embeddings, never the target
    loss.backward()
    assert byol.predictor.mlp[0].weight.grad is not None
    assert online.proj.weight.grad is not None
    assert all(p.grad is None for p in byol.target_encoder.parameters())
    assert byol_regression(torch.ones(1, 3), torch.ones(1, 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_regression(torch.ones(1, 3), -torch.ones(1, 3)).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"\(B, P\)"):
        BYOLLoss()(q1, q2, t1, t2[:, :2])


def test_byol_momentum_anneals_from_base_to_one_and_updates_target():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    online = TinyOnline()
    objective = BYOL(online, base_momentum=0.9, hidden_dim=8)
    target = objective.target_encoder
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
    objective = Supervised(decoder_channels=4, num_classes=3)
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
    objective = Supervised(decoder_channels=4, num_classes=3)
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
    objective = NoGlobal()
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


def test_build_method_checks():
    net = PretrainNetwork(small_cfg("moco").model, 1)
    for method, kind in [("simclr", SimCLR), ("byol", BYOL), ("none", NoGlobal)]:
        assert isinstance(build_method(small_cfg(method), net, num_slices=40), kind)
    with pytest.raises(ConfigError, match="--labels"):
        build_method(small_cfg("supervised"), net, num_slices=40)
    assert build_method(small_cfg("supervised"), net, 40, num_classes=4).num_classes == 4
    cfg = small_cfg("moco")
    cfg.moco.queue_size = 24  # multiple of 2 x 4, not of 2 x 4 x 2 ranks
    build_method(cfg, net, 40)
    with pytest.raises(ConfigError, match="2 x global batch = 16"):
        build_method(cfg, net, 40, world_size=2, gather_negatives=True)


def test_every_registered_method_is_built():
    net = PretrainNetwork(small_cfg("moco").model, 1)
    for method in method_names():
        assert isinstance(build_method(small_cfg(method), net, 40, num_classes=4), nn.Module)


@dataclass
class ToyOptions:
    """The toy method's options, its config section ``toy:``. weight: w > 0 of the gap;
    log_norm: also log the mean norm of the global embeddings (free on --resume: it changes
    nothing that is trained)."""

    weight: float = 1.0
    log_norm: bool = field(default=False, metadata=FREE_ON_RESUME)

    def __post_init__(self):
        if self.weight <= 0:  # a plain ValueError: the config reports it as a ConfigError
            raise ValueError(f"Illegal toy.weight {self.weight}: need > 0")


@register_method("toy")
class ToyMethod(GlobalMethod):
    """A toy global method, added by this one registered class: L = w mean_b |z1_b - z2_b|^2
    of the raw (unnormalised) global projections (B, P), scaled by a learned positive factor."""

    options = ToyOptions
    normalized_global = False

    def __init__(self, weight: float = 1.0, log_norm: bool = False):
        super().__init__()
        self.weight, self.log_norm = weight, log_norm
        self.log_scale = nn.Parameter(torch.zeros(()))

    @classmethod
    def from_config(cls, cfg, online, context):
        options = cfg.options()
        return cls(options.weight, options.log_norm)

    def forward(self, out1, out2, views):
        gap = (out1["global"] - out2["global"]).pow(2).sum(dim=1).mean()
        stats = {"toy_gap": gap.detach()}
        if self.log_norm:
            stats["toy_norm"] = out1["global"].norm(dim=1).mean().detach()
        return self.weight * self.log_scale.exp() * gap, stats


def test_the_registry_names_the_built_in_methods_first_without_importing_torch():
    assert method_names()[:5] == ("moco", "simclr", "byol", "none", "supervised")
    assert "toy" in method_names()
    code = ("import sys, lrcseg.config as c, lrcseg.methods as m\n"
            "cfg = c.from_dict(c.PretrainConfig, {'method': 'byol', 'moco': {'momentum': 0.9}})\n"
            "assert cfg.options().predictor_hidden == 512 and cfg.moco.momentum == 0.9\n"
            "assert [m.options_class(n) is not None for n in m.method_names()] == "
            "[True, True, True, False, False]\n"
            "print(m.method_names()[:5], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["('moco',", "'simclr',", "'byol',", "'none',", "'supervised')",
                                   "False"]


def test_register_method_refuses_clashes_and_bad_classes():
    class Other(ToyMethod):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("toy")(Other)
    with pytest.raises(ValueError, match="built in"):
        register_method("moco")(Other)
    with pytest.raises(ValueError, match="reserved"):
        register_method("scratch")
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_method("My-Method")
    with pytest.raises(TypeError, match="from_config"):
        register_method("plain")(object)
    with pytest.raises(TypeError, match="options must be a dataclass"):
        register_method("unclear")(type("Unclear", (ToyMethod,), {"options": dict}))
    assert register_method("toy")(ToyMethod) is ToyMethod  # the same class again is fine
    assert method_class("toy") is ToyMethod and method_class("moco").__name__ == "MoCo"
    with pytest.raises(ConfigError, match="one of moco, simclr"):
        method_class("mocov9")


def test_a_registered_method_is_accepted_by_the_config_and_the_experiment():
    assert PretrainConfig(method="toy").method == "toy"
    assert InitSpec(name="t", method="toy").pretrained


def test_each_built_in_method_declares_the_options_its_config_section_holds():
    cfg = PretrainConfig()
    for name in method_names()[:5]:
        options = options_class(name)
        assert method_class(name).options is options
        if options is not None:  # the built-in sections are PretrainConfig fields
            assert type(getattr(cfg, name)) is options and cfg.options(name) is getattr(cfg, name)
            assert all(options_fixed_on_resume(name).values())  # each changes the objective
    assert cfg.options("none") is None and options_fixed_on_resume("supervised") == {}


def test_a_method_reads_its_options_from_its_own_yaml_section(tmp_path):
    """ToyOptions is declared beside the toy method only: the config reads the ``toy:``
    section, validates it (the bad key is named), saves it, and fills in the defaults."""
    path = tmp_path / "toy.yaml"
    path.write_text("method: toy\ntoy: {weight: 2.5}\n")
    cfg = load_config(PretrainConfig, path)
    assert cfg.options() == ToyOptions(weight=2.5) and cfg.method_sections == {"toy": cfg.options()}
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved["toy"] == {"weight": 2.5, "log_norm": False} and "method_sections" not in saved
    assert list(saved)[list(saved).index("byol") + 1] == "toy"  # beside the built-in sections
    assert load_config(PretrainConfig, tmp_path / "saved.yaml") == cfg
    assert to_dict(PretrainConfig(method="toy"))["toy"] == {"weight": 1.0, "log_norm": False}
    # another method's section is kept too, as moco's is when the method is simclr
    other = from_dict(PretrainConfig, {"method": "simclr", "toy": {"log_norm": True}})
    assert other.options("toy") == ToyOptions(log_norm=True) and other.options().temperature == 0.2
    for text, message in [("toy: {weight: -1.0}", r"toy\.weight -1\.0"),
                          ("toy: {wieght: 2.0}", r"unknown key\(s\) \['wieght'\]"),
                          ("toy: 3", "toy: a mapping of options"),
                          ("vicreg: {sim_coeff: 25.0}", "no installed method is called 'vicreg'"),
                          ("optm: {lr: 0.1}", "unknown key 'optm'"),
                          ("none: {}", "method 'none' takes no options")]:
        path.write_text(f"method: toy\n{text}\n")
        with pytest.raises(ConfigError, match=message) as exc:
            load_config(PretrainConfig, path)
        assert str(path) in str(exc.value)


def test_resume_keeps_a_methods_options_unless_its_dataclass_frees_them():
    saved = to_dict(from_dict(PretrainConfig, {"method": "toy", "toy": {"weight": 2.0}}))
    changed = to_dict(from_dict(PretrainConfig, {"method": "toy", "toy": {"weight": 3.0}}))
    with pytest.raises(ConfigError, match=r"toy\.weight 2\.0 -> 3\.0 \(changes the objective\)"):
        check_resume_compatible(saved, changed, "pretrain")
    logging = to_dict(from_dict(PretrainConfig, {"method": "toy", "toy": {"weight": 2.0,
                                                                          "log_norm": True}}))
    assert check_resume_compatible(saved, logging, "pretrain") == []
    moco = to_dict(from_dict(PretrainConfig, {"moco": {"momentum": 0.9}}))
    with pytest.raises(ConfigError, match=r"moco\.momentum 0\.99 -> 0\.9 \(changes the objective\)"):
        check_resume_compatible(to_dict(PretrainConfig()), moco, "pretrain")


def test_the_network_leaves_the_global_output_unnormalised_when_the_method_asks():
    model = small_cfg("toy").model
    torch.manual_seed(0)
    raw = PretrainNetwork(model, 1, normalize_global=ToyMethod.normalized_global).eval()
    unit_net = PretrainNetwork(model, 1).eval()
    unit_net.load_state_dict(raw.state_dict())  # the flag holds no weights
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        z, z_unit = raw(x)["global"], unit_net(x)["global"]
        assert torch.allclose(F.normalize(z, dim=1), z_unit, atol=1e-6)
        assert not torch.allclose(z.norm(dim=1), torch.ones(2))
        assert torch.equal(raw.encode_global(x), z)


def test_a_registered_method_runs_through_lrcseg_pretrain(tmp_path, capsys):
    data = write_phantom_dataset(tmp_path / "ph", cases=3, seed=0, spacing_mm=(4.0, 4.0, 8.0),
                                 montage=False)
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {backbone: resnet10, decoder_channels: [32, 16, 16, 8, 8], proj_dim: 16}\n"
                      "run: {log_every: 1, checkpoint_every: 100}\noptim: {warmup_steps: 0}\n"
                      "toy: {weight: 2.0, log_norm: true}\n")
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["pretrain", "--data", str(data), "--method", "toy", "--no-lrc",
                     "--config", str(config), "--steps", "2", "--batch-size", "4",
                     "--image-size", "64", "--spacing", "4", "--device", "cpu", "--no-progress",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["loss/global"] == pytest.approx(row["loss/total"])
        assert row["loss/global"] > 0 and row["global/toy_gap"] > 0
        assert abs(row["global/toy_norm"] - 1.0) > 1e-3  # the raw projection, as the toy asks
    state = load_checkpoint(out / "final.pt")
    assert state["config"]["method"] == "toy" and set(state["global_objective"]) == {"log_scale"}
    assert float(state["global_objective"]["log_scale"]) != 0.0  # the optimiser trained it
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["toy"] == state["config"]["toy"] == {"weight": 2.0, "log_norm": True}
    # --resume with another weight would continue a different run: refused, nothing written
    recorded["toy"]["weight"] = 3.0
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(recorded))
    before = (out / "checkpoint.pt").stat().st_mtime_ns
    assert main(["pretrain", "--out", str(out), "--resume", "--config", str(changed),
                 "--no-progress"]) == 1
    assert "toy.weight 2.0 -> 3.0 (changes the objective)" in capsys.readouterr().err
    assert (out / "checkpoint.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_method_state_of_an_older_checkpoint_loads(method):
    """Before lrcseg.methods, MoCo's and BYOL's state sat under "moco." / "byol."."""
    cfg = small_cfg(method)
    cfg.moco.queue_size = 8
    net = PretrainNetwork(cfg.model, 1)
    saved = build_method(cfg, net, 40)
    today = saved.state_dict()
    old = OrderedDict((f"{method}.{k}", v) for k, v in today.items())
    old._metadata = OrderedDict([("", {"version": 1})] + [
        (method if k == "" else f"{method}.{k}", v) for k, v in today._metadata.items()])
    state = upgrade_checkpoint({"config": {"method": method}, "global_objective": old})
    assert list(state["global_objective"]) == list(today)
    assert state["global_objective"]._metadata == today._metadata
    build_method(cfg, net, 40).load_state_dict(state["global_objective"])  # strict
    unchanged = upgrade_checkpoint({"config": {"method": method}, "global_objective": today})
    assert unchanged["global_objective"] is today


def test_an_installed_entry_point_method_is_listed_and_built_on_first_use(tmp_path, monkeypatch):
    """A package's ``lrcseg.methods`` entry point: its name is known without importing it,
    and building the method loads and registers the class (a fresh process, as on --resume)."""
    from importlib.metadata import EntryPoint

    from lrcseg.methods import registry

    (tmp_path / "lrcseg_plugin_ep.py").write_text(
        "from dataclasses import dataclass\n"
        "from lrcseg.methods.base import GlobalMethod\n"
        "@dataclass\n"
        "class PluggedOptions:\n"
        "    alpha: float = 1.0\n"
        "class Plugged(GlobalMethod):\n"
        "    options = PluggedOptions\n"
        "    @classmethod\n"
        "    def from_config(cls, cfg, online, context):\n"
        "        return cls()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint("plugged", "lrcseg_plugin_ep:Plugged", registry.ENTRY_POINT_GROUP)
    shadow = EntryPoint("moco", "lrcseg_plugin_ep:Plugged", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point, shadow])
    monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    assert "plugged" in method_names() and "lrcseg_plugin_ep" not in sys.modules
    assert PretrainConfig(method="plugged", run=RunConfig(steps=1)).method == "plugged"
    cls = method_class("plugged")
    assert cls.__name__ == "Plugged" and method_names().count("plugged") == 1
    assert method_class("moco").__module__ == "lrcseg.methods.moco"  # built-ins win
    # its options come from YAML like a built-in method's (the entry point is loaded for them)
    cfg = from_dict(PretrainConfig, {"method": "plugged", "plugged": {"alpha": 0.5}})
    assert cfg.options().alpha == 0.5 and to_dict(cfg)["plugged"] == {"alpha": 0.5}
