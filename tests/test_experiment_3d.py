"""The experiment runner in 3D (issue 30 item 5): ``nnunet_configuration: 3d_fullres`` plans,
pre-trains (the plans' 3D network on supervoxels), fine-tunes and predicts every cell as
nnU-Net's 3d_fullres; the field is validated, only taken with ``finetune_with: nnunet``, a
folder recorded before it counts as 2d, and a rerun with another value is refused."""

from __future__ import annotations

import csv
import json
import math
import textwrap

import pytest
import yaml

from lrcseg.config import NNUNET_CONFIGURATIONS, ExperimentConfig, PhantomSpec
from lrcseg.errors import ConfigError
from lrcseg.experiment.backends import NnUNetBackend, supervoxel_scale
from lrcseg.experiment.cells import register


def _cfg(**kw) -> ExperimentConfig:
    base = {"phantoms": PhantomSpec(cases=5), "labeled": [1], "draws": [0], "seeds": [0],
            "finetune_with": "nnunet", "finetune_steps": 2, "nnunet_iterations_per_epoch": 2}
    return ExperimentConfig(**{**base, **kw})


def test_the_configuration_is_validated():
    assert _cfg().nnunet_configuration == "2d"
    assert _cfg(nnunet_configuration="3d_fullres").nnunet_configuration == "3d_fullres"
    with pytest.raises(ConfigError, match="Illegal nnunet_configuration '3d_lowres': 2d or 3d_fullres"):
        _cfg(nnunet_configuration="3d_lowres")
    with pytest.raises(ConfigError, match="nnunet_configuration 3d_fullres needs finetune_with: nnunet"):
        ExperimentConfig(phantoms=PhantomSpec(cases=5), nnunet_configuration="3d_fullres")
    ExperimentConfig(phantoms=PhantomSpec(cases=5), nnunet_configuration="2d")  # the default
    grid = [{"name": "scratch"}, {"name": "moco_grid", "method": "moco", "lrc": True,
                                  "regions": "grid"}]
    with pytest.raises(ConfigError, match="moco_grid use grid regions, which have no 3D version"):
        _cfg(nnunet_configuration="3d_fullres", initialisations=grid, baselines=["scratch"])
    _cfg(initialisations=grid, baselines=["scratch"])  # 2d has grid regions
    with pytest.raises(ConfigError, match="probe: false"):  # probes stay nnU-Net-less
        _cfg(nnunet_configuration="3d_fullres", probe=True)


def test_the_accepted_configurations_are_the_bridges():
    from lrcseg.commands.superpixels import DEFAULT_SUPERVOXEL_SCALE
    from lrcseg.nnunet.workspace import CONFIGURATIONS

    assert NNUNET_CONFIGURATIONS == CONFIGURATIONS
    # the 3D cells' supervoxel scale: a third of the 2D scale, the superpixels command's default
    assert supervoxel_scale(100.0) == DEFAULT_SUPERVOXEL_SCALE == 33.0
    assert supervoxel_scale(60.0) == 20.0


def test_describe_names_the_configuration():
    assert "nnU-Net's 2d plans network" in NnUNetBackend(_cfg()).describe()
    words = NnUNetBackend(_cfg(nnunet_configuration="3d_fullres")).describe()
    assert "nnU-Net's 3d_fullres plans network" in words and "supervoxels" in words


def test_an_old_record_counts_as_2d_and_another_value_is_refused(tmp_path):
    register(_cfg(), tmp_path)
    record = tmp_path / "experiment.yaml"
    old = yaml.safe_load(record.read_text())
    assert old["nnunet_configuration"] == "2d"
    del old["nnunet_configuration"]  # as written before the key existed
    record.write_text(yaml.safe_dump(old))
    register(_cfg(), tmp_path)
    with pytest.raises(ConfigError, match=r"changed: nnunet_configuration\); use a new --out"):
        register(_cfg(nnunet_configuration="3d_fullres"), tmp_path)


@pytest.mark.slow
def test_experiment_compares_scratch_and_moco_lrc_in_3d(tmp_path, capsys):
    """lrcseg experiment with nnunet_configuration 3d_fullres on 5 small phantoms: nnU-Net's
    3d_fullres plans made once, MoCo + LRC pre-trained as the plans' 3D network on supervoxels,
    scratch and it fine-tuned by nnU-Net's 3d_fullres trainer on the same labelled case and
    scored on the test split; results.csv written; a rerun as 2d refused."""
    pytest.importorskip("nnunetv2", reason="needs the lrcseg[nnunet] extra")
    from lrcseg.cli import main
    from lrcseg.commands.superpixels import DEFAULT_SUPERVOXEL_SCALE
    from lrcseg.config import PretrainConfig, load_config
    from lrcseg.phantoms.generate import write_phantom_dataset

    # 48 x 40 x 12 voxels: nnU-Net's 3d_fullres patch is the whole volume; 2 pre-training
    # cases (one 1.5 x patch box each), 1 labelled candidate, 2 test cases
    data = write_phantom_dataset(tmp_path / "Dataset984_Exp3d", cases=5, seed=0,
                                 spacing_mm=(4.0, 4.0, 8.0), shape=(48, 40, 12),
                                 pretrain_fraction=0.4, train_fraction=0.2, montage=False)
    config = tmp_path / "exp.yaml"
    config.write_text(textwrap.dedent(f"""
        dataset: {data}
        initialisations:
          - {{name: scratch, method: scratch}}
          - {{name: moco_lrc, method: moco, lrc: true}}
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
        nnunet_configuration: 3d_fullres
        nnunet_dataset_id: 984
        nnunet_mirroring: false
        nnunet_batch_size: 1
    """))
    out = tmp_path / "exp"
    assert main(["experiment", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    preprocessed = out / "nnunet" / "preprocessed" / "Dataset984_Exp3d"
    assert (preprocessed / "nnUNetPlans_3d_fullres").is_dir()
    assert not (preprocessed / "nnUNetPlans_2d").exists()
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]

    run = out / "runs" / "pretrain" / "moco_lrc_s0"
    pt_cfg = load_config(PretrainConfig, run / "config.yaml")
    assert pt_cfg.model.spatial_dims == 3 and pt_cfg.model.nnunet.configuration == "3d_fullres"
    assert pt_cfg.model.nnunet.arch_kwargs["conv_op"].endswith("Conv3d")
    assert list(pt_cfg.augment.patch_size) == plans["3d_fullres"]["patch_size"]
    assert pt_cfg.superpixels.scale == DEFAULT_SUPERVOXEL_SCALE and pt_cfg.lrc.enabled
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss/lrc" in r][-1] == 2
    assert all(math.isfinite(r["loss/lrc"]) and r["loss/lrc"] > 0 for r in logged if "loss/lrc" in r)

    test_ids = json.loads((data / "splits.json").read_text())["test"]
    results = {}
    for init in ("scratch", "moco_lrc"):
        cell = out / "runs" / "finetune" / init / "K1_d0_s0"
        metrics = json.loads((cell / "metrics.json").read_text())
        assert sorted(metrics["cases"]) == sorted(test_ids)
        assert 0.0 <= metrics["mean_dice"] <= 1.0
        assert (cell / "nnunet" / "Dataset984_Exp3d" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
                / "fold_0" / "checkpoint_final.pth").is_file()
        assert json.loads((cell / "nnunet" / "nnunet_train.json").read_text())[
            "configuration"] == "3d_fullres"
        results[init] = metrics
    assert results["scratch"]["labelled_cases"] == results["moco_lrc"]["labelled_cases"]
    lrc_cell, scratch_cell = (out / "runs" / "finetune" / i / "K1_d0_s0" for i in ("moco_lrc", "scratch"))
    export = json.loads((lrc_cell / "init_nnunet.json").read_text())
    assert export["configuration"] == "3d_fullres"
    assert "Loading pretrained weights" in (lrc_cell / "nnunet" / "nnunet_train.log").read_text()
    assert "Loading pretrained weights" not in (scratch_cell / "nnunet" / "nnunet_train.log").read_text()
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(test_ids)
    assert {r["init"] for r in rows} == {"scratch", "moco_lrc"}
    assert "nnU-Net's 3d_fullres plans network" in (out / "report.md").read_text()

    capsys.readouterr()
    config.write_text(config.read_text().replace("nnunet_configuration: 3d_fullres",
                                                 "nnunet_configuration: 2d"))
    assert main(["experiment", "--config", str(config), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changed: nnunet_configuration" in err
