"""The frozen-feature linear probe: trained features beat random ones, runs are reproducible,
the level-wise prediction is the full computation, every level set reads what it names,
BatchNorm is re-estimated without touching a weight, the CLI and the online probe behave."""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrcseg.cli import main
from lrcseg.config import FinetuneConfig, ModelConfig, OptimConfig, PreprocessConfig, RunConfig
from lrcseg.errors import ConfigError
from lrcseg.evaluate.predict import pad_amounts
from lrcseg.evaluate.probe import (
    DEFAULT_LEVELS,
    LEVEL_SETS,
    DenseFeatures,
    OnlineProbe,
    ProbeModel,
    choose_pixels,
    evaluate_probe,
    gather_features,
    level_set_name,
    load_probe_network,
    parse_levels,
    reestimate_batchnorm,
)
from lrcseg.models.unet import SEGMENTATION_HEAD_PREFIX, build_unet
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train.finetune import finetune

SPACING = 4.0
PIXELS = 4000
DECODER = "dec4,dec2,dec1"   # what fine-tuning trains last; cheap to run
SCRATCH = {"backbone": "resnet10", "spacing_mm": SPACING}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = root / "phantoms"
    # 1 pre-training, 2 labelled-candidate and 2 test phantoms of 100 x 75 x 25 voxels
    write_phantom_dataset(data, cases=5, seed=3, spacing_mm=(SPACING, SPACING, 8.0),
                          pretrain_fraction=0.2, train_fraction=0.4, montage=False)
    return {"root": root, "data": data, "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def trained(workspace):
    """A U-Net fine-tuned on the labels (the one labelled case the probe fits on, too); 150
    steps: after 60 its probe is no better than a random network's."""
    cfg = FinetuneConfig(
        dataset=str(workspace["data"]), init="scratch", labeled=1,
        run=RunConfig(out=str(workspace["root"] / "ft"), steps=150, batch_size=4, seed=0, device="cpu",
                      cache_dir=workspace["cache"], checkpoint_every=1000, log_every=20),
        preprocess=PreprocessConfig(spacing_mm=SPACING), model=ModelConfig(backbone="resnet10"),
        image_size=64, optim=OptimConfig(lr=1e-3, warmup_steps=5))
    return finetune(cfg, progress=False)


def probe(workspace, model="scratch", **kw):
    args = {**(SCRATCH if model == "scratch" else {}), "pixels": PIXELS, "levels": DECODER, **kw}
    return evaluate_probe(str(model), workspace["data"], device="cpu",
                          cache_dir=workspace["cache"], progress=False, **args)


@pytest.fixture(scope="module")
def scratch_result(workspace):
    return probe(workspace)


def without_timing(result):
    return {**result, "probe": {k: v for k, v in result["probe"].items() if k != "fit_seconds"}}


def test_trained_features_probe_better_than_random_ones(workspace, trained, scratch_result):
    tuned = probe(workspace, trained)
    assert tuned["probe"]["kind"] == "finetune"
    assert tuned["probe"]["labelled_cases"] == scratch_result["probe"]["labelled_cases"]
    # measured (2 test phantoms, BatchNorm re-estimated): mean Dice 0.297 / 0.322 fine-tuned
    # (1 / 2 torch threads) vs 0.161 random, liver 0.64 / 0.66 vs 0.41 (stored statistics, the
    # probe before re-estimation: 0.329 / 0.340 vs 0.207, liver 0.67 vs 0.53)
    assert tuned["mean_dice"] > scratch_result["mean_dice"] + 0.06
    assert tuned["mean"]["liver"]["dice"] > scratch_result["mean"]["liver"]["dice"]
    # the random network is not useless: the probe finds the liver in its features
    assert scratch_result["mean"]["liver"]["dice"] > 0.3


def test_two_runs_give_identical_metrics(workspace, scratch_result, tmp_path):
    again = probe(workspace)
    assert without_timing(again) == without_timing(scratch_result)
    record = scratch_result["probe"]
    assert record["levels"] == ["dec4", "dec2", "dec1"] and record["level_set"] == "decoder"
    assert record["batchnorm"] == "reestimate"
    assert record["batchnorm_layers"] == 22 and record["batchnorm_slices"] > 0  # the whole U-Net
    assert record["pixels_used"] <= PIXELS and record["lbfgs_iterations"] > 0
    assert 0.5 < record["train_accuracy"] <= 1.0
    counts = record["pixels_per_class"]
    assert max(counts.values()) == PIXELS // len(counts)   # class-balanced budget


def test_choose_pixels_is_class_balanced_and_seeded():
    rng = np.random.default_rng(0)
    labels = [rng.choice(3, size=(4, 10, 10), p=[0.9, 0.08, 0.02]) for _ in range(2)]
    picks = choose_pixels(labels, 3, 90, np.random.default_rng(1))
    drawn = np.concatenate([lab.reshape(-1)[p] for lab, p in zip(labels, picks, strict=True)])
    available = np.bincount(np.concatenate([lab.reshape(-1) for lab in labels]), minlength=3)
    assert np.bincount(drawn, minlength=3).tolist() == np.minimum(available, 30).tolist()
    assert all(np.all(np.diff(p) > 0) for p in picks)  # sorted, no repeats
    again = choose_pixels(labels, 3, 90, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(picks, again, strict=True))
    with pytest.raises(ConfigError, match="smaller than"):
        choose_pixels(labels, 3, 2, np.random.default_rng(1))


def test_levels_are_validated():
    assert parse_levels("dec1, enc4") == ("enc4", "dec1")
    assert parse_levels("encoder") == ("enc4", "enc8", "enc16", "enc32")
    assert parse_levels("decoder") == ("dec4", "dec2", "dec1")
    assert parse_levels("all") == DEFAULT_LEVELS == LEVEL_SETS["encoder"] + LEVEL_SETS["decoder"]
    assert level_set_name(parse_levels("enc32,enc16,enc8,enc4")) == "encoder"
    assert level_set_name(("enc4", "dec1")) == "custom"
    for bad, message in (("enc3", "unknown"), ("", "no probe levels"), ("enc4,enc4", "repeated"),
                         ("encoder,dec1", "unknown")):
        with pytest.raises(ConfigError, match=message):
            parse_levels(bad)


def _random_volume(slices=3, h=50, w=70, points=40):
    """A (Z, 1, H, W) stand-in for a cached volume and ``points`` sorted flat indices into it."""
    image = np.random.default_rng(0).random((slices, 1, h, w)).astype(np.float32)
    flat = np.sort(np.random.default_rng(1).choice(slices * h * w, points, replace=False))
    return SimpleNamespace(image=image), flat


def test_default_features_include_the_bottleneck():
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(backbone="resnet10"), 1, 2)
    features = DenseFeatures(unet)
    assert features.levels == ("enc4", "enc8", "enc16", "enc32", "dec4", "dec2", "dec1")
    maps = features(torch.rand(2, 1, 64, 96))
    assert [tuple(f.shape) for f in maps] == [
        (2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3),   # resnet10 encoder
        (2, 64, 16, 24), (2, 32, 32, 48), (2, 16, 64, 96)]                 # decoder blocks 2-4
    volume, flat = _random_volume()
    stack = gather_features(features, [volume], [flat], context_slices=1)
    assert [tuple(f.shape) for f in stack] == [(40, c) for c in (64, 128, 256, 512, 64, 32, 16)]
    assert torch.cat(stack, dim=1).shape == (40, 1072) and stack[3].std() > 0


def test_encoder_levels_run_and_read_the_encoder_only():
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(backbone="resnet10"), 1, 2)
    calls = []
    for block in unet.decoder.blocks:
        block.register_forward_hook(lambda *_: calls.append(1))
    features = DenseFeatures(unet, "encoder")
    assert features.path() == [unet.encoder]
    maps = features(torch.rand(1, 1, 64, 64))
    assert [f.shape[1] for f in maps] == [64, 128, 256, 512] and not calls
    decoder = copy.deepcopy(unet.decoder.state_dict())
    volume, flat = _random_volume()
    assert reestimate_batchnorm(features, [volume], [flat], 1)["layers"] == 12  # encoder's only
    assert not calls
    assert all(torch.equal(v, decoder[k]) for k, v in unet.decoder.state_dict().items())


def test_batchnorm_reestimation_sets_every_layer_and_touches_no_weight():
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(backbone="resnet10"), 1, 2)
    block = unet.decoder.blocks[4]                # dec1: no pre-training runs it in train mode
    bn = next(m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    reference = copy.deepcopy(unet)
    parameters = {k: v.clone() for k, v in unet.named_parameters()}
    momenta = [m.momentum for m in unet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    features = DenseFeatures(unet)
    volume, flat = _random_volume(slices=5)
    info = reestimate_batchnorm(features, [volume], [flat], context_slices=1, batch_size=2)
    assert info == {"layers": 22, "slices": 5}
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean), atol=1e-3)
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var), atol=1e-3)
    assert all(torch.equal(v, parameters[k]) for k, v in unet.named_parameters())  # bit-identical
    assert [m.momentum for m in unet.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta
    assert not any(m.training for m in unet.modules())

    # the same statistics as train-mode passes with momentum=None over the same padded batches
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    zs = np.unique(flat // (50 * 70))
    (top, bottom), (left, right) = pad_amounts(50), pad_amounts(70)
    reference.train()
    with torch.no_grad():
        for start in range(0, len(zs), 2):
            reference(F.pad(torch.from_numpy(volume.image[zs[start:start + 2]]),
                            (left, right, top, bottom)))
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in unet.state_dict().items())

    # deterministic: a second re-estimation from any state gives the same bits
    first = {k: v.clone() for k, v in unet.state_dict().items()}
    reestimate_batchnorm(features, [volume], [flat], context_slices=1, batch_size=2)
    assert all(torch.equal(v, first[k]) for k, v in unet.state_dict().items())


def test_levelwise_prediction_equals_upsample_concat_linear():
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(backbone="resnet10"), 1, 2)
    features = DenseFeatures(unet, "enc2,enc4,enc16,enc32,dec8,dec2,dec1")
    x = torch.rand(2, 1, 64, 96)
    maps = features(x)
    channels = [f.shape[1] for f in maps]
    d, k = sum(channels), 4
    weight, bias = torch.randn(k, d), torch.randn(k)
    mean, std = torch.randn(d), torch.rand(d) + 0.5
    model = ProbeModel(features, channels, weight, bias, mean, std)
    stack = torch.cat([F.interpolate(f, size=(64, 96), mode="bilinear", align_corners=False)
                       for f in maps], dim=1)                                   # (B, D, H, W)
    explicit = torch.einsum("kd,bdhw->bkhw", weight, (stack - mean[:, None, None])
                            / std[:, None, None]) + bias[:, None, None]
    out = model(x)
    assert out.shape == (2, k, 64, 96)
    torch.testing.assert_close(out, explicit, rtol=1e-4, atol=1e-4)

    # the fitting features at chosen pixels are the same upsampled stack, read at those pixels
    volume, flat = _random_volume()                                              # (Z, W_n, H, W)
    image = volume.image
    gathered = torch.cat(gather_features(features, [volume], [flat], context_slices=1), dim=1)
    (top, bottom), (left, right) = pad_amounts(50), pad_amounts(70)
    padded = F.pad(torch.from_numpy(image[:, :]), (left, right, top, bottom))
    full = torch.cat([F.interpolate(f, size=padded.shape[-2:], mode="bilinear",
                                    align_corners=False) for f in features(padded)], dim=1)
    z, rest = np.divmod(flat, 50 * 70)
    row, col = np.divmod(rest, 70)
    expected = full[z, :, row + top, col + left]                                 # (N, D)
    torch.testing.assert_close(gathered, expected, rtol=1e-4, atol=1e-5)


def test_online_probe_leaves_rng_and_modes_alone(workspace):
    online = OnlineProbe(workspace["data"], PreprocessConfig(spacing_mm=SPACING), labeled=1,
                         max_cases=1, pixels=2000, cache_dir=workspace["cache"],
                         levels="enc4,enc8,dec4")
    assert online.score_ids and not set(online.score_ids) & set(online.fit_ids)
    torch.manual_seed(123)
    unet = build_unet(ModelConfig(backbone="resnet10"), 1, 2).train()
    unet.decoder.blocks[0].eval()   # a mixed state must come back as it was
    modes = {name: m.training for name, m in unet.named_modules()}
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    rng = torch.get_rng_state()
    scores = online.score(unet)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in unet.named_modules()} == modes
    assert all(p.requires_grad for p in unet.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())  # BN stats too
    organs = [k for k in json.loads((workspace["data"] / "dataset.json").read_text())["labels"]
              if k != "background"]
    assert set(scores) == {"probe/mean_dice", *(f"probe/dice/{o}" for o in organs)}
    assert all(np.isfinite(v) for v in scores.values())
    assert 0 < scores["probe/mean_dice"] < 1
    assert online.score(unet) == scores


def test_cli_writes_metrics_and_reports_errors_in_one_line(workspace, trained, tmp_path, capsys):
    common = ["--dataset", str(workspace["data"]), "--pixels", "2000", "--levels", "encoder",
              "--cache-dir", workspace["cache"], "--no-progress", "--device", "cpu"]
    out = tmp_path / "metrics.json"
    assert main(["probe", "--model", "scratch", "--backbone", "resnet10", "--spacing",
                 str(SPACING), "--out", str(out), *common]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"cases", "mean", "mean_dice", "organs", "counts", "probe"}
    assert all(isinstance(result["mean"][o]["dice"], float) for o in result["organs"])
    record = result["probe"]
    assert record["kind"] == "scratch" and record["level_set"] == "encoder"
    assert record["levels"] == ["enc4", "enc8", "enc16", "enc32"] == list(record["channels"])
    assert record["batchnorm"] == "reestimate" and record["batchnorm_layers"] == 12
    printed = capsys.readouterr().out
    assert "| liver |" in printed and f"metrics written to {out}" in printed
    assert "(encoder), BatchNorm reestimate" in printed

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    shutil.copy(next((workspace["data"] / "imagesTr").glob("*.nii.gz")), unlabelled)
    bad = {
        "missing model": (["--model", str(tmp_path / "nope")], "nope"),
        "bad levels": (["--model", "scratch", "--levels", "enc5"], "unknown probe level"),
        "K too large": (["--model", "scratch", "--labeled", "9"], "only 2 labelled"),
        "backbone with a trained model": (["--model", str(trained), "--backbone", "resnet18"],
                                          "--backbone applies to --model scratch only"),
        "unlabelled dataset": (["--model", "scratch", "--dataset", str(unlabelled)],
                               "labelled dataset"),
    }
    for name, (args, message) in bad.items():
        target = tmp_path / f"{name.replace(' ', '_')}.json"
        assert main(["probe", *common, *args, "--out", str(target)]) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (name, err)
        assert not target.exists(), name


def test_pretraining_run_and_its_export_give_the_same_network(workspace, tmp_path):
    run = tmp_path / "pre"
    assert main(["pretrain", "--data", str(workspace["data"]), "--method", "moco", "--lrc",
                 "--out", str(run), "--steps", "2", "--image-size", "64", "--batch-size", "4",
                 "--backbone", "resnet10", "--spacing", str(SPACING), "--cache-dir",
                 workspace["cache"], "--no-progress", "--device", "cpu"]) == 0
    exported = tmp_path / "unet.pt"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    (a, pre_a, info_a), (b, pre_b, info_b) = (load_probe_network(str(p)) for p in (run, exported))
    assert (info_a["kind"], info_b["kind"]) == ("pretrain", "exported")
    assert info_a["backbone"] == info_b["backbone"] == "resnet10"
    assert pre_a == pre_b and pre_a.spacing_mm == SPACING
    keys = [k for k in a.state_dict() if not k.startswith(SEGMENTATION_HEAD_PREFIX)]
    assert keys and all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in keys)
    torch.manual_seed(0)
    fresh = build_unet(ModelConfig(backbone="resnet10"), 1, 1).state_dict()
    assert not torch.equal(fresh["encoder.conv1.weight"], a.state_dict()["encoder.conv1.weight"])
    with pytest.raises(ConfigError, match="--spacing applies to --model scratch only"):
        load_probe_network(str(exported), spacing_mm=3.0)
