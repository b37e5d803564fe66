"""The linear probe in 3D (issue 30 item 5): a 3D network's features are read by level through
its levels adapter on whole labelled volumes, sampled at the chosen voxels (the same as
trilinear upsampling, as the 2D probe's are bilinear), fitted and scored like 2D; a 3D
FlexibleUNet pre-training is probed afterwards and online, an nnU-Net 3d_fullres one through
``NnUNetLevels`` (its levels, not a FlexibleUNet's), and what cannot be probed is refused."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrcseg.config import (
    AugmentConfig,
    LRCConfig,
    MocoConfig,
    ModelConfig,
    OnlineProbeConfig,
    OptimConfig,
    PreprocessConfig,
    PretrainConfig,
    RunConfig,
    SuperpixelConfig,
)
from lrcseg.data.labels import labelled_volumes
from lrcseg.data.layouts import load_dataset
from lrcseg.data.slice_cache import SliceCache
from lrcseg.evaluate.predict import pad_amounts
from lrcseg.evaluate.probe import (
    LEVELS,
    DenseFeatures,
    OnlineProbe,
    ProbeModel,
    evaluate_probe,
    gather_features,
    load_probe_network,
    reestimate_batchnorm,
)
from lrcseg.models.pretrain_net import FlexibleUNetLevels
from lrcseg.models.unet import build_unet
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPACING = 4.0
SHAPE = (48, 40, 12)   # X, Y, Z voxels: nnU-Net's 3d_fullres patch is the whole volume
DECODER = (32, 16, 16, 8, 8)
PIXELS = 1200
UNET3D = ModelConfig(backbone="resnet10", decoder_channels=DECODER, spatial_dims=3)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path | str]:
    """5 phantoms of 48 x 40 x 12 voxels (4 x 4 x 8 mm): 2 pre-training, 2 labelled-candidate
    and 1 test case."""
    root = tmp_path_factory.mktemp("probe3d")
    data = write_phantom_dataset(root / "Dataset985_Probe3d", cases=5, seed=0,
                                 spacing_mm=(SPACING, SPACING, 8.0), shape=SHAPE,
                                 pretrain_fraction=0.4, train_fraction=0.4, montage=False)
    return {"root": root, "data": data, "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def run3d(workspace) -> Path:
    """A 3D MoCo + LRC pre-training of a FlexibleUNet (two steps), with the online probe on
    every step."""
    cfg = PretrainConfig(
        data=[str(workspace["data"])], method="moco",
        run=RunConfig(steps=2, batch_size=2, device="cpu", log_every=1, checkpoint_every=100,
                      cache_dir=workspace["cache"], out=str(workspace["root"] / "run3d")),
        preprocess=PreprocessConfig(spacing_mm=SPACING),
        augment=AugmentConfig(patch_size=(32, 32, 32)), model=UNET3D,
        moco=MocoConfig(queue_size=16), optim=OptimConfig(lr=1e-3, warmup_steps=0),
        superpixels=SuperpixelConfig(scale=33.0), lrc=LRCConfig(enabled=True),
        probe=OnlineProbeConfig(dataset=str(workspace["data"]), every=1, max_cases=1,
                                pixels=PIXELS))
    return pretrain(cfg, progress=False)


def _labelled(workspace, preprocess: PreprocessConfig, ids: list[str]):
    dataset = load_dataset(workspace["data"])
    return labelled_volumes(SliceCache(preprocess, workspace["cache"]),
                            [dataset.case(i) for i in ids], dataset.labels)


def _random_volume(slices=12, h=48, w=40, points=60):
    """A (Z, 1, H, W) stand-in for a cached volume and ``points`` sorted flat indices into it."""
    from types import SimpleNamespace

    image = np.random.default_rng(0).random((slices, 1, h, w)).astype(np.float32)
    flat = np.sort(np.random.default_rng(1).choice(slices * h * w, points, replace=False))
    return SimpleNamespace(image=image), flat


def test_3d_features_are_read_by_level_and_sampled_trilinearly():
    torch.manual_seed(0)
    unet = build_unet(UNET3D, 1, 2)
    features = DenseFeatures(unet, "enc2,enc8,enc32,dec16,dec2,dec1")
    assert features.spatial_dims == 3 and features.multiple == (32, 32, 32)
    maps = features(torch.rand(1, 1, 32, 64, 32))
    assert [tuple(f.shape) for f in maps] == [
        (1, 64, 16, 32, 16), (1, 128, 4, 8, 4), (1, 512, 1, 2, 1),          # resnet10 encoder
        (1, 32, 2, 4, 2), (1, 8, 16, 32, 16), (1, 8, 32, 64, 32)]           # decoder blocks
    volume, flat = _random_volume()                                        # (Z, W_n, H, W)
    gathered = torch.cat(gather_features(features, [volume], [flat], context_slices=1), dim=1)
    assert gathered.shape == (60, 64 + 128 + 512 + 32 + 8 + 8)
    # the same as upsampling every level trilinearly to the padded volume and reading the voxels
    pads = [pad_amounts(n, 32) for n in (12, 48, 40)]
    x = F.pad(torch.from_numpy(volume.image).movedim(0, 1)[None],
              [v for p in reversed(pads) for v in p])                       # (1, 1, 32, 64, 64)
    full = torch.cat([F.interpolate(f, size=x.shape[2:], mode="trilinear", align_corners=False)
                      for f in features(x)], dim=1)[0]                      # (D, Z_p, H_p, W_p)
    z, rest = np.divmod(flat, 48 * 40)
    row, col = np.divmod(rest, 40)
    expected = full[:, z + pads[0][0], row + pads[1][0], col + pads[2][0]].T
    torch.testing.assert_close(gathered, expected, rtol=1e-4, atol=1e-5)
    # BatchNorm re-estimated on the whole volume: every layer on the path, all 12 slices
    assert reestimate_batchnorm(features, [volume], [flat], 1) == {"layers": 22, "slices": 12}


def test_3d_probe_model_is_upsample_concat_linear_and_pads_itself():
    torch.manual_seed(0)
    features = DenseFeatures(build_unet(UNET3D, 1, 2), "enc4,enc16,dec4,dec1")
    x = torch.rand(1, 1, 32, 32, 64)
    maps = features(x)
    channels = [f.shape[1] for f in maps]
    d, k = sum(channels), 3
    weight, bias = torch.randn(k, d), torch.randn(k)
    mean, std = torch.randn(d), torch.rand(d) + 0.5
    model = ProbeModel(features, channels, weight, bias, mean, std)
    stack = torch.cat([F.interpolate(f, size=x.shape[2:], mode="trilinear", align_corners=False)
                       for f in maps], dim=1)
    explicit = torch.einsum("kd,bdzhw->bkzhw", weight, (stack - mean[:, None, None, None])
                            / std[:, None, None, None]) + bias[:, None, None, None]
    torch.testing.assert_close(model(x), explicit, rtol=1e-4, atol=1e-4)
    # an input of other sides is padded to multiples of 32 (split evenly), its logits cropped
    small = torch.rand(1, 1, 12, 48, 40)
    pads = [pad_amounts(n, 32) for n in small.shape[2:]]
    padded = model(F.pad(small, [v for p in reversed(pads) for v in p]))
    crop = padded[:, :, pads[0][0]:pads[0][0] + 12, pads[1][0]:pads[1][0] + 48,
                  pads[2][0]:pads[2][0] + 40]
    assert torch.equal(model(small), crop)


def test_3d_pretraining_is_probed_on_whole_volumes(workspace, run3d):
    result = evaluate_probe(str(run3d), workspace["data"], labeled=1, pixels=PIXELS,
                            levels="all", device="cpu", cache_dir=workspace["cache"],
                            progress=False)
    record = result["probe"]
    assert record["kind"] == "pretrain" and record["spatial_dims"] == 3
    assert record["levels"] == ["enc4", "enc8", "enc16", "enc32", "dec4", "dec2", "dec1"]
    assert record["channels"] == {"enc4": 64, "enc8": 128, "enc16": 256, "enc32": 512,
                                  "dec4": 16, "dec2": 8, "dec1": 8}
    # the voxel draw, counted from the cached labels: class-balanced, capped by what exists
    volume = _labelled(workspace, PreprocessConfig(spacing_mm=SPACING), record["labelled_cases"])[0]
    available = np.bincount(np.asarray(volume.label).reshape(-1), minlength=10)
    dataset = json.loads((workspace["data"] / "dataset.json").read_text())
    per_class = PIXELS // len(dataset["labels"])
    expected = {name: int(min(per_class, available[i])) for name, i in dataset["labels"].items()}
    assert record["pixels_per_class"] == expected
    assert record["pixels_used"] == sum(expected.values()) <= PIXELS
    assert record["batchnorm_layers"] == 22 and record["batchnorm_slices"] == SHAPE[2]
    test_ids = json.loads((workspace["data"] / "splits.json").read_text())["test"]
    assert sorted(result["cases"]) == sorted(test_ids)
    assert math.isfinite(result["mean_dice"]) and 0 <= result["mean_dice"] <= 1
    assert 0.2 < record["train_accuracy"] <= 1.0


def test_3d_pretraining_was_probed_online(run3d):
    rows = [json.loads(line) for line in (run3d / "metrics.jsonl").read_text().splitlines()]
    probed = [r for r in rows if "probe/mean_dice" in r]
    assert [r["step"] for r in probed] == [1, 2]
    assert all(0 <= r["probe/mean_dice"] <= 1 for r in probed)


def test_online_probe_in_3d_leaves_the_network_alone(workspace):
    online = OnlineProbe(workspace["data"], PreprocessConfig(spacing_mm=SPACING), labeled=1,
                         max_cases=1, pixels=PIXELS, cache_dir=workspace["cache"],
                         levels="enc8,dec2")
    torch.manual_seed(3)
    unet = build_unet(UNET3D, 1, 2).train()
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    rng = torch.get_rng_state()
    scores = online.score(unet)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in unet.modules())
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    assert 0 < scores["probe/mean_dice"] < 1
    # through the levels adapter (what PretrainNetwork holds), the same scores
    again = online.score(FlexibleUNetLevels.of(unet))
    assert again.keys() == scores.keys()
    assert all(a == b or (math.isnan(a) and math.isnan(b))
               for a, b in ((again[k], scores[k]) for k in scores))


def test_3d_network_refusals(workspace):
    from lrcseg.errors import ConfigError

    with pytest.raises(ValueError, match="5-dimensional input"):
        DenseFeatures(build_unet(UNET3D, 1, 2))(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="levels adapter"):
        DenseFeatures(torch.nn.Conv3d(1, 1, 1))
    volume, flat = _random_volume()
    features = DenseFeatures(build_unet(UNET3D, 3, 2), "enc4")
    with pytest.raises(ConfigError, match="context_slices must be 1"):
        gather_features(features, [volume], [flat], context_slices=3)


# --------------------------------------------------------------------------- nnU-Net 3d_fullres


@pytest.fixture(scope="module")
def nnunet_run(workspace) -> dict[str, Path]:
    """nnU-Net's 3d_fullres plans of the phantoms and a two-step MoCo + LRC pre-training of
    the plans' network from the command line."""
    pytest.importorskip("nnunetv2", reason="needs the lrcseg[nnunet] extra")
    from lrcseg.cli import main
    from lrcseg.nnunet.planning import plan_and_preprocess

    plans = plan_and_preprocess(workspace["data"], workspace["root"] / "work", 985, "3d_fullres")
    run = workspace["root"] / "nnunet3d"
    assert main(["pretrain", "--data", str(workspace["data"]), "--nnunet-plans", str(plans),
                 "--nnunet-configuration", "3d_fullres", "--lrc", "--out", str(run),
                 "--steps", "2", "--batch-size", "2", "--warmup-steps", "1",
                 "--cache-dir", workspace["cache"], "--no-progress", "--device", "cpu"]) == 0
    return {"plans": plans, "run": run}


@pytest.mark.slow
def test_nnunet_3d_pretraining_is_probed_through_its_adapter(workspace, nnunet_run, tmp_path,
                                                             capsys):
    from lrcseg.cli import main
    from lrcseg.models.pretrain_net import NnUNetLevels
    from lrcseg.nnunet.plans import network_from_plans

    arch = network_from_plans(nnunet_run["plans"], "3d_fullres")
    network, preprocess, info = load_probe_network(str(nnunet_run["run"]))
    assert isinstance(network, NnUNetLevels) and network.spatial_dims == 3
    assert info["backbone"] == f"nnU-Net 3d_fullres {arch.network_class_name.rsplit('.', 1)[-1]}"
    assert preprocess.extra_windows_hu == [arch.clip_hu]  # the CT clip range nnU-Net reads
    # the plans' poolings: stage k's cumulative stride per axis; the total one pads the input
    strides = np.cumprod(np.array(arch.arch_kwargs["strides"]), axis=0)
    assert network.divisor == tuple(int(v) for v in strides[-1])
    assert network.encoder_strides == tuple(int(v) for v in strides[:, -1])

    out = tmp_path / "probe.json"
    assert main(["probe", "--model", str(nnunet_run["run"]), "--dataset", str(workspace["data"]),
                 "--pixels", str(PIXELS), "--cache-dir", workspace["cache"], "--no-progress",
                 "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())["probe"]
    assert record["spatial_dims"] == 3 and record["level_set"] == "all"
    # "all" = the levels this network has: in-plane strides of its stages (1 is no level)
    names = [f"enc{s}" for s in network.encoder_strides if s in (4, 8, 16, 32)]
    names += [f"dec{network.decoder_strides[lv]}" for lv in sorted(network.decoder_strides)
              if network.decoder_strides[lv] in (4, 2, 1)]
    assert record["levels"] == names
    features = [int(f) for f in arch.arch_kwargs["features_per_stage"]]
    assert [record["channels"][f"enc{s}"] for s in network.encoder_strides
            if f"enc{s}" in record["channels"]] == [
        c for s, c in zip(network.encoder_strides, features, strict=True) if f"enc{s}" in names]
    assert record["batchnorm_layers"] == 0  # nnU-Net's InstanceNorm keeps no running statistics
    assert record["pixels_used"] <= PIXELS and 0 < record["train_accuracy"] <= 1
    capsys.readouterr()
    missing = [f"enc{s}" for s in (16, 32) if f"enc{s}" not in names]
    assert missing  # these tiny plans pool in-plane three times
    assert main(["probe", "--model", str(nnunet_run["run"]), "--dataset", str(workspace["data"]),
                 "--levels", missing[-1], "--cache-dir", workspace["cache"], "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    has = [n for n in LEVELS if n in {f"enc{s}" for s in network.encoder_strides}
           | {f"dec{s}" for s in network.decoder_strides.values()}]
    assert err.count("\n") == 1
    assert f"no probe level(s) {missing[-1]}; its levels: {', '.join(has)}" in err


def test_online_probe_of_an_nnunet_network_is_refused():
    """Pre-training feeds the online probe the bare network, without nnU-Net's input
    normalisation: refused when the config is made, not at the first probe step."""
    from lrcseg.config import NnUNetNetworkConfig
    from lrcseg.errors import ConfigError

    arch = NnUNetNetworkConfig(
        plans="nnUNetPlans.json", configuration="3d_fullres", plans_name="nnUNetPlans",
        dataset_name="Dataset985_Probe3d", network_class_name="PlainConvUNet",
        arch_kwargs={"strides": [[1, 1, 1], [2, 2, 2]]}, kw_requires_import=[], num_classes=10,
        clip_hu=(-1000.0, 400.0), mean=0.0, std=100.0, spacing_mm=(8.0, 4.0, 4.0),
        patch_size=(12, 40, 48))
    cfg = PretrainConfig(data=["x"], run=RunConfig(steps=1), augment=AugmentConfig(
        patch_size=arch.patch_size), model=ModelConfig(nnunet=arch, spatial_dims=3))
    assert cfg.probe.dataset is None
    with pytest.raises(ConfigError, match="online probe cannot reach an nnU-Net"):
        dataclasses.replace(cfg, probe=OnlineProbeConfig(dataset="somewhere"))
    # a FlexibleUNet in 3D takes it (test_3d_pretraining_was_probed_online)
    dataclasses.replace(cfg, model=UNET3D, augment=AugmentConfig(patch_size=(32, 32, 32)),
                        probe=OnlineProbeConfig(dataset="somewhere"))


@pytest.mark.slow
def test_nnunet_2d_pretraining_is_probed_through_its_adapter(workspace, nnunet_run, tmp_path):
    """The plans' 2d network (same plans file) is probed slice by slice through NnUNetLevels,
    padded in-plane to lcm(32, its total stride)."""
    from lrcseg.cli import main
    from lrcseg.models.pretrain_net import NnUNetLevels

    run = tmp_path / "nnunet2d"
    assert main(["pretrain", "--data", str(workspace["data"]), "--nnunet-plans",
                 str(nnunet_run["plans"]), "--lrc", "--out", str(run), "--steps", "2",
                 "--batch-size", "4", "--warmup-steps", "1", "--cache-dir", workspace["cache"],
                 "--no-progress", "--device", "cpu"]) == 0
    network, _, info = load_probe_network(str(run))
    assert isinstance(network, NnUNetLevels) and network.spatial_dims == 2
    assert info["backbone"].startswith("nnU-Net 2d ")
    features = DenseFeatures(network, "decoder")
    assert features.multiple == tuple(math.lcm(32, d) for d in network.divisor)
    result = evaluate_probe(str(run), workspace["data"], pixels=PIXELS, levels="decoder",
                            device="cpu", cache_dir=workspace["cache"], progress=False)
    record = result["probe"]
    assert record["spatial_dims"] == 2 and record["levels"] == list(features.levels)
    assert record["levels"] == [f"dec{network.decoder_strides[lv]}"
                                for lv in sorted(network.decoder_strides)
                                if network.decoder_strides[lv] in (4, 2, 1)]
    assert record["batchnorm_layers"] == 0 and record["pixels_used"] <= PIXELS
    assert math.isfinite(result["mean_dice"])
