"""The fine-tuning strategy (``FinetuneStrategyConfig``): learning-rate scales of the
pre-trained parts, a head-first phase (LP-FT), a frozen encoder, and exact resume across the
phase switch. Tiny runs: ResNet-10, small decoder, 64 px crops, a few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from lrcseg.config import (
    FinetuneConfig,
    FinetuneStrategyConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    RunConfig,
    from_dict,
    load_config,
    to_dict,
)
from lrcseg.errors import ConfigError
from lrcseg.models.export import export_weights
from lrcseg.models.unet import build_unet
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train import finetune as ft
from lrcseg.train.common import warmup_cosine
from lrcseg.train.finetune import Finetuning, finetune, frozen_parts, group_lrs

SPACING = 4.0
MODEL = ModelConfig(backbone="resnet10", decoder_channels=(32, 16, 16, 8, 8))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Phantoms and a "pre-trained" U-Net export: random weights whose BatchNorm statistics
    were moved off their initial values, so a frozen part's statistics are told apart."""
    root = tmp_path_factory.mktemp("strategy")
    data = write_phantom_dataset(root / "phantoms", cases=4, seed=3,
                                 spacing_mm=(SPACING, SPACING, 8.0), pretrain_fraction=0.25,
                                 train_fraction=0.5, montage=False)
    torch.manual_seed(5)
    unet = build_unet(MODEL, 1, 1).train()
    with torch.no_grad():
        unet(torch.rand(2, 1, 64, 64))
    exported, _ = export_weights(unet, MODEL, 1, to_dict(PreprocessConfig(spacing_mm=SPACING)),
                                 None, root / "init.pt")
    return {"root": root, "data": data, "cache": str(root / "cache"), "init": str(exported)}


def config(ws, out, steps=6, init=None, strategy=None, warmup=2, **kw) -> FinetuneConfig:
    return FinetuneConfig(
        dataset=str(ws["data"]), init=init or ws["init"], labeled=1,
        run=RunConfig(out=str(out), steps=steps, batch_size=4, seed=0, device="cpu",
                      cache_dir=ws["cache"], checkpoint_every=1000, log_every=1),
        preprocess=PreprocessConfig(spacing_mm=SPACING), model=MODEL, image_size=64,
        optim=OptimConfig(lr=1e-3, warmup_steps=warmup), strategy=strategy or FinetuneStrategyConfig(),
        **kw)


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def same(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def single_group_optimiser(monkeypatch):
    """Fine-tuning as it was before the strategy: one parameter group, one learning rate."""
    real_make, real_set = ft.make_optimizer, ft.set_lr
    monkeypatch.setattr(ft, "make_optimizer", lambda groups, cfg, device: real_make(
        [p for group in groups for p in group["params"]], cfg, device))
    monkeypatch.setattr(ft, "set_lr", lambda optimizer, lrs: real_set(optimizer, lrs[-1]))


# --------------------------------------------------------------------------- the defaults


def test_the_default_strategy_gives_the_weights_of_one_group_at_one_rate(workspace, tmp_path,
                                                                        monkeypatch):
    default = finetune(config(workspace, tmp_path / "default"), progress=False)
    single_group_optimiser(monkeypatch)
    before = finetune(config(workspace, tmp_path / "before"), progress=False)
    a, b = weights(default / "final.pt"), weights(before / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(torch.load(default / "final.pt", weights_only=False)["optimizer"]["param_groups"]) == 3


def test_group_lrs_default_is_the_one_rate_of_before():
    optim = OptimConfig(lr=3e-4, warmup_steps=7)
    for step in range(60):
        one = optim.lr * warmup_cosine(step, 60, 7)
        assert group_lrs(step, 60, optim, FinetuneStrategyConfig()) == (one, one, one)
        assert frozen_parts(step, FinetuneStrategyConfig()) == ()


def test_a_run_from_before_the_strategy_resumes_with_the_defaults(workspace, tmp_path,
                                                                 monkeypatch):
    straight = finetune(config(workspace, tmp_path / "straight"), progress=False)
    run_dir = tmp_path / "older"
    with monkeypatch.context() as patched:
        single_group_optimiser(patched)
        finetune(config(workspace, run_dir), progress=False, stop_at=3)
    # what an older lrcseg wrote: one parameter group, no "strategy" in either config
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert len(state["optimizer"]["param_groups"]) == 1
    del state["config"]["strategy"]
    torch.save(state, run_dir / "checkpoint.pt")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["strategy"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    assert cfg.strategy == FinetuneStrategyConfig()
    resumed = finetune(cfg, resume=True, progress=False)
    assert same(weights(straight / "final.pt"), weights(resumed / "final.pt"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["strategy"] == \
        to_dict(FinetuneStrategyConfig())


# --------------------------------------------------------------------------- the options


def test_head_first_phase_leaves_encoder_and_decoder_bit_identical_then_moves_them(
        workspace, tmp_path):
    from lrcseg.models.export import load_exported

    init, _ = load_exported(workspace["init"])
    run = finetune(config(workspace, tmp_path / "lpft", steps=6, snapshots=[1, 3],
                          strategy=FinetuneStrategyConfig(head_first_steps=3)), progress=False)
    first, end_of_phase, final = (weights(run / name) for name in
                                  ("snapshot_1.pt", "snapshot_3.pt", "final.pt"))
    for part in ("encoder.", "decoder."):  # weights and BatchNorm buffers alike
        assert same(init, first, part) and same(init, end_of_phase, part)
        moved = [k for k in init if k.startswith(part) and not torch.equal(init[k], final[k])]
        assert any(k.endswith(".weight") for k in moved)
        assert any(k.endswith(".running_mean") for k in moved)
    assert not same(first, end_of_phase, "segmentation_head.")  # the head trained meanwhile


def test_freeze_encoder_leaves_it_bit_identical_for_the_whole_run(workspace, tmp_path):
    from lrcseg.models.export import load_exported

    init, _ = load_exported(workspace["init"])
    run = finetune(config(workspace, tmp_path / "frozen", steps=4,
                          strategy=FinetuneStrategyConfig(freeze_encoder=True)), progress=False)
    final = weights(run / "final.pt")
    assert same(init, final, "encoder.")
    assert not same(init, final, "decoder.")


def test_learning_rate_and_freezing_of_each_group_at_each_step(workspace, tmp_path):
    strategy = FinetuneStrategyConfig(encoder_lr_scale=0.1, decoder_lr_scale=0.5,
                                      head_first_steps=4)
    run = Finetuning(config(workspace, tmp_path / "groups", steps=8, strategy=strategy),
                     resume=False)
    run.describe()
    run.start(0, None)
    lr = 1e-3  # warm-up 2 steps, then cosine to 0 at the end of each phase
    want = {0: (0, 0, lr / 2), 1: (0, 0, lr), 2: (0, 0, lr), 3: (0, 0, lr / 2),
            4: (lr / 20, lr / 4, lr / 2), 5: (lr / 10, lr / 2, lr), 6: (lr / 10, lr / 2, lr),
            7: (lr / 20, lr / 4, lr / 2)}
    try:
        for step in range(8):
            run.step(step)
            got = [group["lr"] for group in run.optimizer.param_groups]
            assert got == pytest.approx(want[step], rel=1e-12, abs=0), step
            head_first = step < 4
            for part in ("encoder", "decoder"):
                module = getattr(run.model, part)
                assert module.training is not head_first
                assert all(p.requires_grad is not head_first for p in module.parameters())
            assert run.model.segmentation_head.training
    finally:
        run.logger.close()
    frozen = FinetuneStrategyConfig(freeze_encoder=True, decoder_lr_scale=0.3)
    assert group_lrs(0, 10, OptimConfig(lr=1.0, warmup_steps=0), frozen) == (0.0, 0.3, 1.0)
    assert frozen_parts(9, frozen) == ("encoder",)


def test_the_log_has_each_groups_rate(workspace, tmp_path):
    import json

    run = finetune(config(workspace, tmp_path / "logged", steps=4, warmup=0,
                          strategy=FinetuneStrategyConfig(encoder_lr_scale=0.25,
                                                          head_first_steps=1)), progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cosine = [1.0, 0.75, 0.25]  # no warm-up: cosine over the 3 steps after the switch
    got = [rate for r in rows for rate in (r["lr"], r["lr/encoder"], r["lr/decoder"])]
    want = [1e-3, 0.0, 0.0] + [rate for c in cosine for rate in (1e-3 * c, 0.25e-3 * c, 1e-3 * c)]
    assert got == pytest.approx(want)


@pytest.mark.parametrize("stop_at", [2, 3, 5])  # in the head-first phase, at the switch, after
def test_resume_across_the_phase_switch_is_bit_identical(workspace, tmp_path_factory, stop_at):
    strategy = FinetuneStrategyConfig(encoder_lr_scale=0.1, decoder_lr_scale=0.5,
                                      head_first_steps=3)
    root = tmp_path_factory.mktemp("resume")
    straight = root / "straight"
    finetune(config(workspace, straight, steps=7, strategy=strategy), progress=False)
    cfg = config(workspace, root / "stopped", steps=7, strategy=strategy)
    finetune(cfg, progress=False, stop_at=stop_at)
    assert torch.load(root / "stopped" / "checkpoint.pt", weights_only=False)["step"] == stop_at
    resumed = finetune(cfg, resume=True, progress=False)
    a, b = weights(straight / "final.pt"), weights(resumed / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("options,message", [
    ({"encoder_lr_scale": 0}, "Illegal strategy.encoder_lr_scale 0: need a finite number > 0"),
    ({"decoder_lr_scale": -1.0}, "Illegal strategy.decoder_lr_scale -1.0"),
    ({"decoder_lr_scale": math.nan}, "Illegal strategy.decoder_lr_scale nan"),
    ({"encoder_lr_scale": math.inf}, "Illegal strategy.encoder_lr_scale inf"),
    ({"encoder_lr_scale": "1e-1"}, "Illegal strategy.encoder_lr_scale '1e-1'"),
    ({"head_first_steps": -1}, "Illegal strategy.head_first_steps -1: need an integer >= 0"),
    ({"head_first_steps": 2.5}, "Illegal strategy.head_first_steps 2.5"),
    ({"freeze_encoder": True, "encoder_lr_scale": 0.1},
     "encoder_lr_scale 0.1 with freeze_encoder: a frozen encoder has no learning rate"),
])
def test_illegal_strategies_are_refused(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        from_dict(FinetuneStrategyConfig, options)


def test_strategy_is_refused_from_scratch_and_beyond_the_budget():
    with pytest.raises(ConfigError, match="Illegal strategy.decoder_lr_scale 0.1, "
                                          "strategy.freeze_encoder True with init scratch"):
        FinetuneConfig(init="scratch", strategy=FinetuneStrategyConfig(decoder_lr_scale=0.1,
                                                                      freeze_encoder=True))
    with pytest.raises(ConfigError, match="init scratch"):
        FinetuneConfig(strategy=FinetuneStrategyConfig(head_first_steps=10))
    assert FinetuneConfig(init="scratch").strategy == FinetuneStrategyConfig()
    with pytest.raises(ConfigError, match="head_first_steps 10: must be < the budget 10"):
        FinetuneConfig(init="runs/pre", run=RunConfig(steps=10),
                       strategy=FinetuneStrategyConfig(head_first_steps=10))


def test_the_automatic_budget_bounds_the_head_first_phase_and_warm_ups_are_checked(
        workspace, tmp_path):
    too_long = config(workspace, tmp_path / "auto", steps=None,  # automatic: 600 steps here
                      strategy=FinetuneStrategyConfig(head_first_steps=6000))
    with pytest.raises(ConfigError, match="head_first_steps 6000: must be < the budget of 600"):
        Finetuning(too_long, resume=False)
    short = config(workspace, tmp_path / "short", steps=8,
                   strategy=FinetuneStrategyConfig(head_first_steps=2))
    with pytest.warns(UserWarning, match="warm-up of 2 steps >= the 2 steps of the head-first"):
        Finetuning(short, resume=False)


def test_the_strategy_is_saved_and_older_configs_load_with_the_defaults(workspace, tmp_path):
    strategy = FinetuneStrategyConfig(decoder_lr_scale=0.5, head_first_steps=2)
    saved = to_dict(config(workspace, tmp_path / "s", strategy=strategy))
    assert saved["strategy"] == {"encoder_lr_scale": 1.0, "decoder_lr_scale": 0.5,
                                 "head_first_steps": 2, "freeze_encoder": False}
    assert from_dict(FinetuneConfig, saved).strategy == strategy
    del saved["strategy"]
    assert from_dict(FinetuneConfig, saved).strategy == FinetuneStrategyConfig()


# --------------------------------------------------------------------------- the command line


def _cli(ws, out, *flags) -> list[str]:
    return ["finetune", "--dataset", str(ws["data"]), "--out", str(out), "--steps", "3",
            "--batch-size", "2", "--image-size", "64", "--warmup-steps", "0", "--device", "cpu",
            "--cache-dir", ws["cache"], "--no-progress", *flags]


def test_strategy_flags_land_in_the_run_folders_config(workspace, tmp_path):
    from lrcseg.cli import main

    out = tmp_path / "flags"
    assert main(_cli(workspace, out, "--init", workspace["init"], "--freeze", "encoder",
                     "--head-first", "1", "--pretrained-lr-scale", "0.5")) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["strategy"]
    # A frozen encoder has no rate: the scale goes to the decoder, the other pre-trained part.
    assert saved == {"encoder_lr_scale": 1.0, "decoder_lr_scale": 0.5, "head_first_steps": 1,
                     "freeze_encoder": True}
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["lr/encoder"] == 0.0 and last["lr/decoder"] == pytest.approx(0.5 * last["lr"])


def test_strategy_flags_override_the_config_file(workspace, tmp_path, capsys):
    from lrcseg.cli import main

    config_file = tmp_path / "ft.yaml"
    config_file.write_text(yaml.safe_dump({"strategy": {"freeze_encoder": True,
                                                        "head_first_steps": 2}}))
    assert main(_cli(workspace, tmp_path / "p", "--init", workspace["init"], "--config",
                     str(config_file), "--freeze", "none", "--pretrained-lr-scale", "0.1",
                     "--print-config")) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["strategy"]
    assert printed == {"encoder_lr_scale": 0.1, "decoder_lr_scale": 0.1, "head_first_steps": 2,
                       "freeze_encoder": False}
    # Without --freeze, the file's frozen encoder keeps its rate out of the scale.
    assert main(_cli(workspace, tmp_path / "p", "--init", workspace["init"], "--config",
                     str(config_file), "--pretrained-lr-scale", "0.1", "--print-config")) == 0
    assert yaml.safe_load(capsys.readouterr().out)["strategy"]["encoder_lr_scale"] == 1.0


@pytest.mark.parametrize("flags", [["--head-first", "2"], ["--freeze", "encoder"],
                                   ["--pretrained-lr-scale", "0.1"]])
def test_a_strategy_from_scratch_is_one_line_of_error(workspace, tmp_path, capsys, flags):
    from lrcseg.cli import main

    out = tmp_path / "scratch"
    assert main(_cli(workspace, out, "--init", "scratch", *flags)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrcseg finetune: error: ") and len(err.splitlines()) == 1
    assert "with init scratch" in err and "Traceback" not in err
    assert not out.exists()
