"""LRC pre-training of nnU-Net's own 2D network (issue 14), through nnU-Net's own code:
plans from ``nnUNetv2_plan_and_preprocess`` on phantoms -> ``lrcseg pretrain --nnunet-plans``
-> ``lrcseg export --format nnunet`` -> nnU-Net's ``get_network_from_plans`` +
``load_pretrained_weights`` (and, slow, its trainer) accept the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnunetv2", reason="needs the lrcseg[nnunet] extra")

from nnunetv2.run.load_pretrained_weights import load_pretrained_weights  # noqa: E402
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402

from lrcseg.cli import main  # noqa: E402
from lrcseg.config import ModelConfig  # noqa: E402
from lrcseg.errors import ConfigError, DataError  # noqa: E402
from lrcseg.models.pretrain_net import PretrainNetwork  # noqa: E402
from lrcseg.nnunet.plans import network_from_plans  # noqa: E402
from lrcseg.phantoms.generate import write_phantom_dataset  # noqa: E402

DATASET_ID = 987


def _nnunet_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def nnunet_dataset(tmp_path_factory) -> dict[str, Path]:
    """5 small phantoms as nnU-Net raw data, planned and preprocessed (2d) by nnU-Net."""
    root = tmp_path_factory.mktemp("nnunet")
    raw = root / "raw" / f"Dataset{DATASET_ID}_Phantoms"
    write_phantom_dataset(raw, cases=5, seed=0, spacing_mm=(3.0, 3.0, 6.0), shape=(96, 72, 16),
                          montage=False)
    result = subprocess.run([sys.executable, "-c",
                    "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
                    "plan_and_preprocess_entry; plan_and_preprocess_entry()",
                    "-d", str(DATASET_ID), "-c", "2d", "-np", "1"],
                   env=_nnunet_env(root), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    pre = root / "preprocessed" / raw.name
    return {"root": root, "raw": raw, "plans": pre / "nnUNetPlans.json"}


@pytest.fixture(scope="module")
def pretrained(nnunet_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt") / "run"
    assert main(["pretrain", "--data", str(nnunet_dataset["raw"]), "--nnunet-plans",
                 str(nnunet_dataset["plans"]), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--warmup-steps", "1", "--no-progress",
                 "--device", "cpu"]) == 0
    return out


def _plans_network(plans_path: Path, deep_supervision: bool) -> torch.nn.Module:
    plans = json.loads(plans_path.read_text())
    arch = plans["configurations"]["2d"]["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                  arch["_kw_requires_import"], 1, 10,
                                  deep_supervision=deep_supervision)


def test_plans_record_network_and_ct_normalization(nnunet_dataset):
    arch = network_from_plans(nnunet_dataset["plans"])
    plans = json.loads(nnunet_dataset["plans"].read_text())
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert arch.network_class_name.endswith("PlainConvUNet")
    assert arch.clip_hu == (props["percentile_00_5"], props["percentile_99_5"])
    assert arch.mean == pytest.approx(props["mean"]) and arch.std == pytest.approx(props["std"])
    assert arch.num_classes == 10  # background + 9 organs
    assert list(arch.patch_size) == plans["configurations"]["2d"]["patch_size"]


def test_levels_reproduce_nnunet_forward(nnunet_dataset):
    """Our stage-by-stage decoder gives nnU-Net's own output at full resolution, and the
    input mapping equals CTNormalization of the HU values."""
    torch.manual_seed(0)
    arch = network_from_plans(nnunet_dataset["plans"])
    net = PretrainNetwork(ModelConfig(local_levels=(3, 4), nnunet=arch), in_channels=2).eval()
    hu = torch.empty(2, 1, 64, 64).uniform_(-1100, 400)
    lo, hi = arch.clip_hu
    window = (hu.clamp(lo, hi) - lo) / (hi - lo)
    x = torch.cat([torch.zeros_like(window), window], 1)  # channel 0: superpixel window
    expected_input = (hu.clamp(lo, hi) - arch.mean) / arch.std
    torch.testing.assert_close(net.levels.input(x), expected_input, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        ours = net.levels.decode(net.levels.encode(x), 4)
        theirs = net.unet(expected_input)
        torch.testing.assert_close(net.unet.decoder.seg_layers[-1](ours[4]), theirs,
                                   rtol=1e-4, atol=1e-4)
        out = net(x)
    assert [tuple(f.shape) for f in out["local"]] == [(2, 128, 32, 32), (2, 128, 64, 64)]
    assert ours[3].shape[1] == net.levels.channels[3] == arch.arch_kwargs["features_per_stage"][1]


def test_export_loads_with_nnunet_loader(pretrained, nnunet_dataset, tmp_path):
    out = tmp_path / "lrc_nnunet.pth"
    assert main(["export", str(pretrained), "--format", "nnunet", "--out", str(out),
                 "--nnunet-plans", str(nnunet_dataset["plans"])]) == 0
    weights = torch.load(out, weights_only=True)["network_weights"]
    state = torch.load(pretrained / "final.pt", weights_only=False)["network"]
    network = _plans_network(nnunet_dataset["plans"], deep_supervision=True)  # as the trainer
    before = {k: v.clone() for k, v in network.state_dict().items()}
    load_pretrained_weights(network, str(out), verbose=False)
    loaded = network.state_dict()
    changed = [k for k in loaded if ".seg_layers." not in k and not torch.equal(loaded[k], before[k])]
    assert len(changed) > 100  # the pre-trained convolutions and norms replaced nnU-Net's init
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(loaded[key], weights[key]) and torch.equal(weights[key], state["unet." + key])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["format"] == "lrcseg-nnunet-v1" and meta["configuration"] == "2d"
    assert meta["load_with"] == "nnUNetv2_train DATASET 2d FOLD -pretrained_weights lrc_nnunet.pth"


def test_export_refusals(pretrained, tmp_path, capsys):
    assert main(["export", str(pretrained), "--out", str(tmp_path / "x.pt")]) == 1
    assert "--format nnunet" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_plans_refusals(nnunet_dataset, tmp_path):
    plans = json.loads(nnunet_dataset["plans"].read_text())
    (tmp_path / "dataset.json").write_text((nnunet_dataset["plans"].parent / "dataset.json").read_text())
    plans_2d = json.loads(json.dumps(plans))
    plans_2d["configurations"]["2d"]["patch_size"] = [64]
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans_2d))
    with pytest.raises(DataError, match="'2d' has patch size \\[64\\]"):
        network_from_plans(tmp_path)
    with pytest.raises(DataError, match="no configuration '2d_typo'"):
        network_from_plans(nnunet_dataset["plans"], "2d_typo")
    plans["configurations"]["2d"]["normalization_schemes"] = ["ZScoreNormalization"]
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    with pytest.raises(DataError, match="CTNormalization"):
        network_from_plans(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        network_from_plans(tmp_path / "missing.json")


def test_export_refuses_other_plans_network(pretrained, nnunet_dataset, tmp_path, capsys):
    plans = json.loads(nnunet_dataset["plans"].read_text())
    kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [2 * f for f in kwargs["features_per_stage"]]
    other = tmp_path / "other"
    other.mkdir()
    (other / "nnUNetPlans.json").write_text(json.dumps(plans))
    (other / "dataset.json").write_text((nnunet_dataset["plans"].parent / "dataset.json").read_text())
    out = tmp_path / "w.pth"
    assert main(["export", str(pretrained), "--format", "nnunet", "--out", str(out),
                 "--nnunet-plans", str(other / "nnUNetPlans.json")]) == 1
    assert "do not fit the network" in capsys.readouterr().err
    assert not out.exists()


def test_export_refuses_2d_weights_for_the_3d_network(pretrained, nnunet_dataset, tmp_path, capsys):
    """The 2D run checked against the same plans' 3d_fullres network: one line naming the first
    convolution and both shapes, nothing written; the nnssl-format export takes 3D only."""
    out = tmp_path / "w.pth"
    assert main(["export", str(pretrained), "--format", "nnunet", "--out", str(out),
                 "--nnunet-configuration", "3d_fullres"]) == 1
    err = capsys.readouterr().err.strip()
    arch = network_from_plans(nnunet_dataset["plans"], "3d_fullres")
    arch_2d = network_from_plans(nnunet_dataset["plans"], "2d")
    shape_3d, shape_2d = ((a.arch_kwargs["features_per_stage"][0], 1, *a.arch_kwargs["kernel_sizes"][0])
                          for a in (arch, arch_2d))
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{key} is {shape_2d} in the weights, {shape_3d} in the network" in err
    assert "2D weights, a 3D network" in err and "(3d_fullres)" in err
    assert not out.exists()
    assert main(["export", str(pretrained), "--format", "nnunet-pretrained", "--out", str(out)]) == 1
    assert "3d_fullres only" in capsys.readouterr().err
    assert not out.exists()


def test_flexible_unet_run_is_not_exported_for_nnunet(tmp_path):
    from lrcseg.nnunet.export import export_nnunet

    net = PretrainNetwork(ModelConfig(backbone="resnet10"), in_channels=1)
    with pytest.raises(ConfigError, match="--nnunet-plans"):
        export_nnunet(net, net.cfg, {}, None, tmp_path / "w.pth")


@pytest.mark.slow
def test_nnunet_trainer_fine_tunes_from_lrc_weights(pretrained, nnunet_dataset, tmp_path):
    """nnU-Net's own trainer (Python API; the nnUNetv2_train command cannot start beside the
    CPU torch build) loads the export and trains a few iterations on fold "all"."""
    weights = tmp_path / "lrc.pth"
    assert main(["export", str(pretrained), "--format", "nnunet", "--out", str(weights)]) == 0
    script = textwrap.dedent(f"""
        import json, torch
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
        pre = {str(nnunet_dataset["plans"].parent)!r}
        plans = load_json(pre + "/nnUNetPlans.json")
        plans["continue_training"] = False  # what nnunetv2's run_training sets
        trainer = nnUNetTrainer(plans, "2d", "all", load_json(pre + "/dataset.json"),
                                device=torch.device("cpu"))
        trainer.num_iterations_per_epoch = 2
        trainer.num_val_iterations_per_epoch = 1
        trainer.num_epochs = 1
        trainer.initialize()
        load_pretrained_weights(trainer.network, {str(weights)!r}, verbose=False)
        trainer.run_training()
        print("LOSS", trainer.logger.get_value("train_losses", step=None)[-1])
    """)
    result = subprocess.run([sys.executable, "-c", script], env={**_nnunet_env(nnunet_dataset["root"]), "nnUNet_n_proc_DA": "0"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    loss = float(result.stdout.split("LOSS")[-1])
    assert loss == loss and loss < 5  # finite Dice + CE after two iterations


@pytest.mark.slow
def test_experiment_fine_tunes_with_nnunet(tmp_path):
    """finetune_with: nnunet: nnU-Net plans made once, scratch and MoCo+LRC pre-trained as the
    plans' network, both fine-tuned by nnU-Net's trainer on the same labelled case, scored by
    lrcseg's evaluation on the test split."""
    from lrcseg.config import ExperimentConfig, PretrainConfig, load_config
    from lrcseg.experiment.runner import run_experiment

    config = tmp_path / "exp.yaml"
    config.write_text(textwrap.dedent("""
        phantoms: {out: phantoms, cases: 5, seed: 0, spacing_mm: [4.0, 4.0, 8.0]}
        initialisations:
          - {name: scratch, method: scratch}
          - {name: moco_lrc, method: moco, lrc: true}
        labeled: [1]
        draws: [0]
        seeds: [0]
        pretrain_steps: 2
        finetune_steps: 2
        nnunet_iterations_per_epoch: 2
        batch_size: 2
        warmup_steps: 1
        device: cpu
        baselines: [scratch]
        qualitative_figure: false
        finetune_with: nnunet
        nnunet_mirroring: false
        keep_checkpoints: false
    """))
    cfg = load_config(ExperimentConfig, config)
    out = tmp_path / "exp"
    run_experiment(cfg, out, progress=False)
    test_ids = json.loads((out / "phantoms" / "splits.json").read_text())["test"]
    results = {}
    for init in ("scratch", "moco_lrc"):
        cell = out / "runs" / "finetune" / init / "K1_d0_s0"
        metrics = json.loads((cell / "metrics.json").read_text())
        assert sorted(metrics["cases"]) == sorted(test_ids)
        assert 0.0 <= metrics["mean_dice"] <= 1.0
        assert not list(cell.rglob("checkpoint_*.pth"))  # keep_checkpoints: false
        results[init] = metrics
    assert results["scratch"]["labelled_cases"] == results["moco_lrc"]["labelled_cases"]
    # MoCo+LRC started from its export (whose weights are released with the cell's), scratch not
    lrc_cell, scratch_cell = (out / "runs" / "finetune" / i / "K1_d0_s0" for i in ("moco_lrc", "scratch"))
    assert json.loads((lrc_cell / "init_nnunet.json").read_text())["format"] == "lrcseg-nnunet-v1"
    assert "Loading pretrained weights" in (lrc_cell / "nnunet" / "nnunet_train.log").read_text()
    assert not (lrc_cell / "init_nnunet.pth").exists()
    assert not (scratch_cell / "init_nnunet.json").exists()
    assert "Loading pretrained weights" not in (scratch_cell / "nnunet" / "nnunet_train.log").read_text()
    pt_cfg = load_config(PretrainConfig, out / "runs" / "pretrain" / "moco_lrc_s0" / "config.yaml")
    assert pt_cfg.model.nnunet.arch_kwargs["conv_op"].endswith("Conv2d")
    assert (out / "results.csv").read_text().count("\n") == 1 + 2 * len(test_ids)  # per case


def test_experiment_refuses_probe_with_nnunet():
    from lrcseg.config import ExperimentConfig

    with pytest.raises(ConfigError, match="probe: false"):
        ExperimentConfig(phantoms={"cases": 5}, finetune_with="nnunet", probe=True)
    with pytest.raises(ConfigError, match="multiple of"):
        ExperimentConfig(phantoms={"cases": 5}, finetune_with="nnunet", finetune_steps=300)
