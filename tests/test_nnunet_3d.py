"""nnU-Net's 3d_fullres through nnU-Net's own code (issue 30 item 4): lrcseg's planning runs
nnU-Net's planner and 3d_fullres preprocessing on small phantoms; the plans' 3D network comes
from nnU-Net's builder; an export of its weights loads through nnU-Net's
``load_pretrained_weights`` (and, slow, trains in nnU-Net's 3d_fullres trainer); 2D weights
for the 3D network and the reverse are refused with one line; (slow) ``lrcseg pretrain
--nnunet-configuration 3d_fullres`` and ``lrcseg export`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnunetv2", reason="needs the lrcseg[nnunet] extra")

from nnunetv2.run.load_pretrained_weights import load_pretrained_weights  # noqa: E402
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402

from lrcseg.config import PretrainConfig  # noqa: E402
from lrcseg.errors import ConfigError  # noqa: E402
from lrcseg.nnunet.export import (  # noqa: E402
    ADAPTATION_PLAN_KEY,
    NNUNET_PRETRAINED_SOURCE,
    write_nnunet_weights,
)
from lrcseg.nnunet.network import NnUNetInput, build_nnunet  # noqa: E402
from lrcseg.nnunet.planning import plan_and_preprocess  # noqa: E402
from lrcseg.nnunet.plans import apply_plans, network_from_plans  # noqa: E402
from lrcseg.nnunet.training import model_folder, train  # noqa: E402
from lrcseg.phantoms.generate import write_phantom_dataset  # noqa: E402

DATASET_ID = 986
ENCODER_KEY = "encoder.stages.0.0.convs.0.conv.weight"


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict[str, Path]:
    """4 small phantoms (48 x 40 x 12 voxels of 4 x 4 x 8 mm; 2 of them for pre-training),
    planned by nnU-Net and preprocessed for 3d_fullres through ``planning.plan_and_preprocess``
    (a child process)."""
    root = tmp_path_factory.mktemp("nnunet3d")
    raw = root / "Dataset986_Phantoms3d"
    write_phantom_dataset(raw, cases=4, seed=0, spacing_mm=(4.0, 4.0, 8.0), shape=(48, 40, 12),
                          montage=False)
    work = root / "work"
    plans = plan_and_preprocess(raw, work, DATASET_ID, "3d_fullres")
    return {"raw": raw, "work": work, "plans": plans}


def _perturbed_3d_weights(arch, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of the plans' network as nnU-Net initialises it, every parameter moved
    by noise (so a loaded weight cannot be mistaken for a fresh initialisation). Moved in the
    network: its decoder holds the encoder too, so its state dict names each encoder weight
    twice, and both names must hold the same values, as in a trained network."""
    torch.manual_seed(seed)
    net = build_nnunet(arch)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_planner_plans_and_preprocesses_3d_fullres(planned):
    plans = json.loads(planned["plans"].read_text())
    conf = plans["configurations"]["3d_fullres"]
    folder = planned["plans"].parent / "nnUNetPlans_3d_fullres"
    assert len(list(folder.glob("phantom_*.b2nd"))) + len(list(folder.glob("phantom_*.npz"))) >= 4
    assert not (planned["plans"].parent / "nnUNetPlans_2d").exists()  # only what was asked
    arch = network_from_plans(planned["plans"], "3d_fullres")
    assert list(arch.patch_size) == conf["patch_size"] and len(arch.patch_size) == 3
    assert list(arch.spacing_mm) == conf["spacing"] == [8.0, 4.0, 4.0]  # nnU-Net's order: z first
    assert arch.arch_kwargs["conv_op"].endswith("Conv3d")
    assert arch.configuration == "3d_fullres" and arch.num_classes == 10
    with pytest.raises(ConfigError, match="'3d_lowres' is not supported"):
        plan_and_preprocess(planned["raw"], planned["work"], DATASET_ID, "3d_lowres")


@pytest.mark.slow
def test_planning_a_second_configuration_keeps_the_plans(planned):
    """The experiment plans once per configuration: planning 2d after 3d_fullres preprocesses
    2d too and leaves the plans the 3d_fullres data were made with as they were."""
    before = planned["plans"].read_text()
    assert plan_and_preprocess(planned["raw"], planned["work"], DATASET_ID, "2d") == planned["plans"]
    assert planned["plans"].read_text() == before
    assert (planned["plans"].parent / "nnUNetPlans_2d").is_dir()
    assert (planned["plans"].parent / "nnUNetPlans_3d_fullres").is_dir()


def test_builder_gives_the_plans_3d_network(planned):
    arch = network_from_plans(planned["plans"], "3d_fullres")
    net = build_nnunet(arch).eval()
    assert type(net).__name__ == arch.network_class_name.rsplit(".", 1)[-1]
    weight = net.state_dict()[ENCODER_KEY]
    assert tuple(weight.shape[2:]) == tuple(arch.arch_kwargs["kernel_sizes"][0])  # e.g. (1, 3, 3)
    # lrcseg's window channel -> CTNormalization, on (B, C, D, H, W)
    hu = torch.empty(1, 1, *arch.patch_size).uniform_(-1100, 400)
    lo, hi = arch.clip_hu
    window = (hu.clamp(lo, hi) - lo) / (hi - lo)
    x = NnUNetInput(arch, channel=1)(torch.cat([torch.zeros_like(window), window], 1))
    torch.testing.assert_close(x, (hu.clamp(lo, hi) - arch.mean) / arch.std, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        out = net(x)
    assert tuple(out.shape) == (1, arch.num_classes, *arch.patch_size)


def test_export_loads_into_nnunets_3d_network(planned, tmp_path):
    arch = network_from_plans(planned["plans"], "3d_fullres")
    weights = _perturbed_3d_weights(arch)
    out = tmp_path / "lrc_3d.pth"
    write_nnunet_weights(weights, arch, out, plans=planned["plans"], configuration="3d_fullres")
    plans = json.loads(planned["plans"].read_text())
    spec = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(1)
    network = get_network_from_plans(spec["network_class_name"], spec["arch_kwargs"],
                                     spec["_kw_requires_import"], 1, arch.num_classes,
                                     deep_supervision=True)  # as nnU-Net's trainer builds it
    fresh = {k: v.clone() for k, v in network.state_dict().items()}
    load_pretrained_weights(network, str(out), verbose=False)
    loaded = network.state_dict()
    encoder = [k for k in loaded if k.startswith("encoder.")]
    assert len(encoder) > 20
    for key in encoder:
        assert torch.equal(loaded[key], weights[key]), key
        if loaded[key].is_floating_point() and loaded[key].numel() > 1:
            assert not torch.equal(loaded[key], fresh[key]), key
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["format"] == "lrcseg-nnunet-v1" and meta["configuration"] == "3d_fullres"
    assert meta["checked_against_configuration"] == "3d_fullres"
    assert meta["patch_size"] == list(arch.patch_size)
    assert meta["load_with"] == "nnUNetv2_train DATASET 3d_fullres FOLD -pretrained_weights lrc_3d.pth"


def test_3d_weights_into_2d_network_are_refused(planned, tmp_path):
    arch = network_from_plans(planned["plans"], "3d_fullres")
    out = tmp_path / "w.pth"
    with pytest.raises(ConfigError) as info:
        write_nnunet_weights(_perturbed_3d_weights(arch), arch, out, configuration="2d")
    message = str(info.value)
    assert "\n" not in message and "(2d)" in message
    assert ENCODER_KEY in message and "3D weights, a 2D network" in message
    shape_3d = tuple(build_nnunet(arch).state_dict()[ENCODER_KEY].shape)
    assert str(shape_3d) in message and str(shape_3d[:2] + shape_3d[3:]) in message
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_plans_set_a_3d_pre_training(planned):
    arch = network_from_plans(planned["plans"], "3d_fullres")
    cfg = apply_plans(PretrainConfig(), arch)
    assert cfg.model.spatial_dims == 3 and cfg.model.nnunet == arch
    assert cfg.augment.patch_size == arch.patch_size  # views of the plans' (D, H, W) patch
    assert cfg.preprocess.spacing_mm == arch.spacing_mm[-1]
    assert cfg.preprocess.extra_windows_hu == [arch.clip_hu]
    assert cfg.preprocess.slice_spacing_mm == arch.spacing_mm[0]  # z follows the plans too
    with pytest.raises(ConfigError, match="drop --image-size"):
        apply_plans(PretrainConfig(), arch, image_size=64)
    flat = apply_plans(PretrainConfig(), network_from_plans(planned["plans"], "2d"))
    assert flat.model.spatial_dims == 2 and flat.preprocess.slice_spacing_mm is None


@pytest.mark.slow
def test_cli_pretrains_and_exports_the_3d_network(planned, tmp_path, capsys):
    """lrcseg pretrain --nnunet-configuration 3d_fullres (two steps), then lrcseg export in both
    formats: nnU-Net's loader takes the pre-trained 3D weights; into the 2d network they are
    refused with one line."""
    from lrcseg.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(planned["raw"]), "--nnunet-plans", str(planned["plans"]),
                 "--nnunet-configuration", "3d_fullres", "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--warmup-steps", "1", "--no-progress", "--device", "cpu"]) == 0
    out = tmp_path / "lrc_3d.pth"
    assert main(["export", str(run), "--format", "nnunet", "--out", str(out)]) == 0
    arch = network_from_plans(planned["plans"], "3d_fullres")
    network = build_nnunet(arch)
    load_pretrained_weights(network, str(out), verbose=False)
    state = torch.load(run / "final.pt", weights_only=False)["network"]
    assert torch.equal(network.state_dict()[ENCODER_KEY], state["unet." + ENCODER_KEY])
    assert main(["export", str(run), "--format", "nnunet-pretrained",
                 "--out", str(tmp_path / "lrc_nnssl.pth")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "nnunet", "--nnunet-configuration", "2d",
                 "--out", str(tmp_path / "bad.pth")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3D weights, a 2D network" in err and ENCODER_KEY in err
    assert not (tmp_path / "bad.pth").exists()


def test_nnunet_pretrained_format_names_encoder_and_stem(planned, tmp_path):
    """The checkpoint of nnU-Net master's nnUNetv2_train_pretrained route (nnssl's format, read
    from nnU-Net's source): it loads with torch's weights_only loader as nnU-Net reads it, and
    the encoder and stem it names load strictly into a fresh network of the plans, as that
    route's PretrainedTrainer loads them."""
    arch = network_from_plans(planned["plans"], "3d_fullres")
    weights = _perturbed_3d_weights(arch)
    out = tmp_path / "lrc_nnssl.pth"
    write_nnunet_weights(weights, arch, out, export_format="nnunet-pretrained")
    checkpoint = torch.load(out, weights_only=True)
    plan = checkpoint[ADAPTATION_PLAN_KEY]
    assert plan["architecture_plans"]["arch_class_name"] == arch.network_class_name
    assert plan["pretrain_plan"]["configurations"]["3d_fullres"]["patch_size"] == list(arch.patch_size)
    assert plan["architecture_kwargs"]["kernel_sizes"] == arch.arch_kwargs["kernel_sizes"]
    assert plan["pretrain_num_input_channels"] == 1 and plan["key_to_lpe"] is None
    network = build_nnunet(arch)
    for prefix in (plan["key_to_encoder"], plan["key_to_stem"]):
        part = {k[len(prefix) + 1:]: v for k, v in checkpoint["network_weights"].items()
                if k.startswith(prefix + ".")}
        network.get_submodule(prefix).load_state_dict(part, strict=True)
    assert torch.equal(network.state_dict()[ENCODER_KEY], weights[ENCODER_KEY])
    stem_conv = network.get_submodule(plan["keys_to_in_proj"][0])
    assert stem_conv.weight.shape[1] == 1  # the one CT channel
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["format"] == "lrcseg-nnunet-pretrained-v1"
    assert meta["checked_against_source"] == NNUNET_PRETRAINED_SOURCE
    assert "nnUNetv2_train_pretrained DATASET 3d_fullres" in meta["load_with"]
    arch_2d = network_from_plans(planned["plans"], "2d")
    with pytest.raises(ConfigError, match="3d_fullres only"):
        write_nnunet_weights(_perturbed_3d_weights(arch_2d), arch_2d, tmp_path / "x.pth",
                             export_format="nnunet-pretrained")


@pytest.mark.slow
def test_nnunet_3d_trainer_trains_from_the_export(planned, tmp_path):
    """nnU-Net's own 3d_fullres trainer (``training.train``, a child process) loads the export
    and trains two iterations on CPU; an export for the 2d network is refused before it starts."""
    arch = network_from_plans(planned["plans"], "3d_fullres")
    weights = tmp_path / "lrc_3d.pth"
    write_nnunet_weights(_perturbed_3d_weights(arch), arch, weights)
    ids = sorted(p.name.split(".")[0] for p in (planned["raw"] / "labelsTr").glob("*.nii.gz"))
    out = tmp_path / "nnunet"
    folder = train(planned["work"], DATASET_ID, planned["raw"], ids[:2], weights, iterations=2,
                   iterations_per_epoch=2, seed=0, out=out, device="cpu", batch_size=1,
                   configuration="3d_fullres")
    assert folder == model_folder(out, DATASET_ID, planned["raw"], "3d_fullres")
    assert folder.parent.name == "nnUNetTrainer__nnUNetPlans__3d_fullres"
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"
    log = (out / "nnunet_train.log").read_text()
    assert "Loading pretrained weights" in log
    losses = checkpoint["logging"]["train_losses"]
    assert len(losses) == 1 and losses[0] == losses[0] and losses[0] < 5  # finite, one epoch
    arch_2d = network_from_plans(planned["plans"], "2d")
    weights_2d = tmp_path / "lrc_2d.pth"
    write_nnunet_weights(_perturbed_3d_weights(arch_2d), arch_2d, weights_2d)
    with pytest.raises(ConfigError, match="exported for nnU-Net's 2d network"):
        train(planned["work"], DATASET_ID, planned["raw"], ids[:2], weights_2d, iterations=2,
              iterations_per_epoch=2, seed=0, out=tmp_path / "other", configuration="3d_fullres")
