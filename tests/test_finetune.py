"""Fine-tuning, evaluation and prediction end to end on tiny phantoms, through the CLI."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from lrcseg.cli import main
from lrcseg.config import (
    FinetuneConfig,
    IntensityAugmentConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    RunConfig,
    load_config,
)
from lrcseg.data.readers import read_image
from lrcseg.data.splits import choose_labelled
from lrcseg.errors import ConfigError
from lrcseg.evaluate.predict import predict_labels
from lrcseg.evaluate.run import evaluate_model
from lrcseg.models.load import load_finetuned
from lrcseg.models.unet import build_unet
from lrcseg.phantoms.generate import write_phantom_dataset
from lrcseg.train.finetune import finetune, has_laterality

SPACING = 4.0
COMMON = ["--backbone", "resnet10", "--spacing", str(SPACING), "--batch-size", "4",
          "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = root / "phantoms"
    write_phantom_dataset(data, cases=4, seed=3, spacing_mm=(SPACING, SPACING, 8.0),
                          pretrain_fraction=0.25, train_fraction=0.5, montage=False)
    return {"root": root, "data": data, "cache": str(root / "cache")}


def ft_config(ws, out, steps=40, init="scratch", **kw) -> FinetuneConfig:
    return FinetuneConfig(
        dataset=str(ws["data"]), init=init, labeled=kw.pop("labeled", 1),
        run=RunConfig(out=str(out), steps=steps, batch_size=4, seed=0, device="cpu", cache_dir=ws["cache"],
                      checkpoint_every=1000, log_every=5),
        preprocess=PreprocessConfig(spacing_mm=kw.pop("spacing", SPACING)),
        model=ModelConfig(backbone=kw.pop("backbone", "resnet10")), image_size=64,
        optim=OptimConfig(lr=1e-3, warmup_steps=5), **kw)


@pytest.fixture(scope="module")
def trained(workspace):
    run = finetune(ft_config(workspace, workspace["root"] / "ft", steps=60), progress=False)
    return run


def test_split_is_recorded_and_reproducible(workspace, trained):
    split = json.loads((trained / "split.json").read_text())
    splits = json.loads((workspace["data"] / "splits.json").read_text())
    assert len(split["labeled"]) == 1 and split["labeled"][0] in splits["train"]
    assert split["test"] == sorted(splits["test"])
    from lrcseg.data.layouts import load_dataset

    again = choose_labelled(load_dataset(workspace["data"]), 1, split_seed=0)
    assert again["labeled"] == split["labeled"]


def test_finetuning_beats_an_untrained_model(workspace, trained):
    result = evaluate_model(trained, workspace["data"], "test", "cpu", progress=False)
    model, meta = load_finetuned(trained)
    torch.manual_seed(0)
    untrained = build_unet(meta["model_config"], 1, len(meta["labels"])).eval()
    from lrcseg.data.layouts import load_dataset
    from lrcseg.data.readers import read_label
    from lrcseg.evaluate.metrics import SegmentationMetrics

    ds = load_dataset(workspace["data"])
    metrics = SegmentationMetrics({n: i for n, i in meta["labels"].items() if i})
    for case_id in ds.splits["test"]:
        case = ds.case(case_id)
        image = read_image(case.image)
        pred = predict_labels(untrained, image, meta["preprocess"], device="cpu",
                              num_classes=len(meta["labels"]))
        metrics.add(case_id, pred, read_label(case.label, image).array, image.spacing)
    baseline = metrics.result()
    assert result["mean"]["liver"]["dice"] > 0.5
    assert result["mean"]["liver"]["dice"] > baseline["mean"]["liver"]["dice"] + 0.3
    assert result["mean_dice"] > baseline["mean_dice"]


def test_resume_is_bit_identical(workspace):
    straight = finetune(ft_config(workspace, workspace["root"] / "straight", steps=8), progress=False)
    cfg = ft_config(workspace, workspace["root"] / "stopped", steps=8)
    finetune(cfg, progress=False, stop_at=4)
    assert not (workspace["root"] / "stopped" / "final.pt").exists()
    resumed = finetune(cfg, resume=True, progress=False)
    a = torch.load(straight / "final.pt", weights_only=False)["model"]
    b = torch.load(resumed / "final.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated rows after resume


def _same_weights(run_a, run_b) -> bool:
    a = torch.load(run_a / "final.pt", weights_only=False)["model"]
    b = torch.load(run_b / "final.pt", weights_only=False)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_identical_with_every_intensity_transform(workspace, tmp_path):
    every = IntensityAugmentConfig(noise_prob=1, blur_prob=1, brightness_prob=1, contrast_prob=1,
                                   lowres_prob=1, gamma_prob=1, gamma_inverted_prob=1)
    straight = finetune(ft_config(workspace, tmp_path / "straight", steps=6, intensity=every),
                        progress=False)
    cfg = ft_config(workspace, tmp_path / "stopped", steps=6, intensity=every)
    finetune(cfg, progress=False, stop_at=3)
    resumed = finetune(cfg, resume=True, progress=False)
    assert _same_weights(straight, resumed)
    plain = finetune(ft_config(workspace, tmp_path / "plain", steps=6,
                               intensity=IntensityAugmentConfig(enabled=False)), progress=False)
    assert not _same_weights(straight, plain)  # the augmentation did act


def test_a_run_from_before_intensity_augmentation_resumes_without_it(workspace, tmp_path):
    off = IntensityAugmentConfig(enabled=False)
    straight = finetune(ft_config(workspace, tmp_path / "straight", steps=6, intensity=off),
                        progress=False)
    run_dir = tmp_path / "older"
    finetune(ft_config(workspace, run_dir, steps=6, intensity=off), progress=False, stop_at=3)
    # what an older lrcseg wrote: no "intensity" in the checkpoint's config or config.yaml
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    del state["config"]["intensity"]
    torch.save(state, run_dir / "checkpoint.pt")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["intensity"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    assert cfg.intensity.enabled  # the default of today, which the run never had
    with pytest.warns(UserWarning, match="began before fine-tuning had intensity augmentation"):
        resumed = finetune(cfg, resume=True, progress=False)
    assert _same_weights(straight, resumed)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["intensity"]["enabled"] is False


def test_too_many_labelled_cases_is_refused(workspace, tmp_path):
    with pytest.raises(ConfigError, match="only 2 labelled"):
        finetune(ft_config(workspace, tmp_path / "k9", labeled=9), progress=False)
    assert not (tmp_path / "k9").exists()


def test_laterality_disables_flips():
    assert has_laterality(["background", "liver", "kidney_left"])
    assert not has_laterality(["background", "liver", "spleen"])


@pytest.fixture(scope="module")
def pretrained(workspace):
    out = workspace["root"] / "pre"
    rc = main(["pretrain", "--data", str(workspace["data"]), "--method", "moco", "--lrc",
               "--out", str(out), "--steps", "2", "--image-size", "64",
               "--cache-dir", workspace["cache"], *COMMON])
    assert rc == 0
    return out


def test_preprocessing_mismatch_is_refused_or_warned(workspace, pretrained, tmp_path):
    with pytest.raises(ConfigError, match="spacing_mm"):
        finetune(ft_config(workspace, tmp_path / "a", steps=2, init=str(pretrained), spacing=5.0),
                 progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match="spacing_mm"):
        finetune(ft_config(workspace, tmp_path / "b", steps=2, init=str(pretrained), spacing=5.0,
                           allow_mismatch=True), progress=False)


def test_backbone_mismatch_is_refused(workspace, pretrained, tmp_path):
    with pytest.raises(ConfigError, match="backbone resnet10"):
        finetune(ft_config(workspace, tmp_path / "c", steps=2, init=str(pretrained),
                           backbone="resnet34"), progress=False)


def test_init_from_run_and_from_export_give_the_same_start(workspace, pretrained, tmp_path):
    exported = tmp_path / "unet.pt"
    assert main(["export", str(pretrained), "--out", str(exported)]) == 0
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert meta["preprocess"]["spacing_mm"] == SPACING
    runs = [finetune(ft_config(workspace, tmp_path / name, steps=1, init=init), progress=False)
            for name, init in (("from_run", str(pretrained)), ("from_file", str(exported)))]
    a, b = (torch.load(r / "final.pt", weights_only=False)["model"] for r in runs)
    encoder_keys = [k for k in a if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(a[k], b[k]) for k in encoder_keys)


def test_evaluate_cli_writes_metrics_and_table(workspace, trained, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(trained), "--dataset", str(workspace["data"]),
                 "--out", str(out), "--figures", "--no-progress", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"cases", "mean", "mean_dice", "organs"}
    assert "liver" in result["organs"] and "background" not in result["organs"]
    assert "| liver |" in capsys.readouterr().out
    assert sorted(p.suffix for p in (tmp_path / "metrics_figures").iterdir()) == [".png"]


def test_evaluate_refuses_other_label_names_without_a_map(workspace, trained, tmp_path):
    other = tmp_path / "renamed"
    shutil.copytree(workspace["data"], other)
    ds_json = json.loads((other / "dataset.json").read_text())
    ds_json["labels"] = {("hepar" if k == "liver" else k): v for k, v in ds_json["labels"].items()}
    (other / "dataset.json").write_text(json.dumps(ds_json))
    assert main(["evaluate", "--model", str(trained), "--dataset", str(other),
                 "--out", str(tmp_path / "m.json"), "--no-progress"]) == 1
    assert not (tmp_path / "m.json").exists()
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"hepar": "liver"}))
    assert main(["evaluate", "--model", str(trained), "--dataset", str(other), "--label-map",
                 str(label_map), "--out", str(tmp_path / "m.json"), "--no-progress"]) == 0


def test_predict_keeps_the_nifti_grid(workspace, trained, tmp_path):
    image_path = next((workspace["data"] / "imagesTr").glob("*.nii.gz"))
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "--model", str(trained), "--input", str(image_path),
                 "--output", str(out), "--no-progress"]) == 0
    ref, pred = nib.load(image_path), nib.load(out)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj))) <= set(range(10))


def test_predict_dicom_series_gets_the_series_geometry(trained, tmp_path):
    from dicom_fixtures import write_dicom_series

    hu = np.full((6, 40, 48), 40.0)
    hu[:, :4] = -1000
    series = tmp_path / "series"
    write_dicom_series(series, (hu + 1024).astype(np.uint16), pixel_spacing=(4.0, 4.0), step=8.0)
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(trained), "--input", str(series),
                 "--output", str(out), "--no-progress"]) == 0
    mask = nib.load(next(out.glob("*.nii.gz")))
    volume = read_image(series)
    assert mask.shape == volume.array.shape
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-4)
    assert json.loads((out / "labels.json").read_text())["liver"] == 1


def test_predict_refuses_a_non_image(trained, tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not an image")
    assert main(["predict", "--model", str(trained), "--input", str(bogus),
                 "--output", str(tmp_path / "out"), "--no-progress"]) == 1
    assert not (tmp_path / "out").exists()


def test_label_map_merges_classes(workspace, tmp_path):
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"kidney_left": "kidney", "kidney_right": "kidney",
                                     "liver": "liver"}))
    run = finetune(ft_config(workspace, tmp_path / "mapped", steps=2, label_map=str(label_map)),
                   progress=False)
    _, meta = load_finetuned(run)
    assert meta["labels"] == {"background": 0, "kidney": 1, "liver": 2}
    from lrcseg.data.labels import model_labels

    labels, lut = model_labels(json.loads((workspace["data"] / "dataset.json").read_text())["labels"],
                               str(label_map))
    dataset_ids = json.loads((workspace["data"] / "dataset.json").read_text())["labels"]
    assert lut[dataset_ids["kidney_left"]] == lut[dataset_ids["kidney_right"]] == 1
    assert lut[dataset_ids["liver"]] == 2 and lut[dataset_ids["spleen"]] == 0


def test_ctrl_c_checkpoints_at_a_step_boundary_and_resumes_exactly(workspace, monkeypatch):
    import os
    import signal

    import lrcseg.train.finetune as ft

    straight = finetune(ft_config(workspace, workspace["root"] / "straight_int", steps=6),
                        progress=False)
    calls = {"n": 0}
    real_set_lr = ft.set_lr

    def set_lr_then_interrupt(optimizer, lr):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of step 2 (0-based)
            os.kill(os.getpid(), signal.SIGINT)
        real_set_lr(optimizer, lr)

    monkeypatch.setattr(ft, "set_lr", set_lr_then_interrupt)
    cfg = ft_config(workspace, workspace["root"] / "interrupted", steps=6)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, progress=False)
    state = torch.load(workspace["root"] / "interrupted" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3  # step 2 finished, then the checkpoint
    assert not (workspace["root"] / "interrupted" / "final.pt").exists()
    monkeypatch.setattr(ft, "set_lr", real_set_lr)
    resumed = finetune(cfg, resume=True, progress=False)
    a = torch.load(straight / "final.pt", weights_only=False)["model"]
    b = torch.load(resumed / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_predict_writes_on_a_non_canonical_input_grid(workspace, trained, tmp_path):
    """An LPS, axis-swapped input gets a mask in its own voxel order, shape and affine."""
    source = nib.load(next((workspace["data"] / "imagesTr").glob("*.nii.gz")))
    ras = np.asarray(source.dataobj)
    # flip x and y (RAS -> LPS) and swap them: voxel (i, j, k) now is RAS (X-1-j, Y-1-i, k)
    lps = np.ascontiguousarray(ras[::-1, ::-1].transpose(1, 0, 2))
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [ras.shape[0] - 1, ras.shape[1] - 1]
    affine = source.affine @ flip @ swap
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(lps, affine), path)
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "--model", str(trained), "--input", str(path), "--output", str(out),
                 "--no-progress"]) == 0
    mask = nib.load(out)
    assert mask.shape == lps.shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
    reference = tmp_path / "ref.nii.gz"
    main(["predict", "--model", str(trained), "--input",
          str(next((workspace["data"] / "imagesTr").glob("*.nii.gz"))), "--output", str(reference),
          "--no-progress"])
    ras_mask = np.asarray(nib.load(reference).dataobj)
    np.testing.assert_array_equal(np.asarray(mask.dataobj),
                                  ras_mask[::-1, ::-1].transpose(1, 0, 2))


def test_run_steps_from_a_config_file_is_the_budget_and_snapshots_load(workspace, tmp_path):
    # The trap of issue 13: a budget given as run.steps in a YAML file was silently replaced
    # by the automatic one. Now run.steps is the only budget key.
    config = tmp_path / "ft.yaml"
    config.write_text("run: {steps: 9, log_every: 3, checkpoint_every: 100}\nsnapshots: [3, 6]\n"
                      "image_size: 64\n")
    out = tmp_path / "ft"
    rc = main(["finetune", "--config", str(config), "--dataset", str(workspace["data"]),
               "--out", str(out), "--cache-dir", workspace["cache"], *COMMON])
    assert rc == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 9
    assert json.loads((out / "run_card.json").read_text())["steps"] == 9
    final, _ = load_finetuned(out)
    for step in (3, 6):
        model, _ = load_finetuned(out / f"snapshot_{step}.pt")
        assert torch.load(out / f"snapshot_{step}.pt", weights_only=False)["step"] == step
        differs = any(not torch.equal(a, b) for a, b in
                      zip(model.state_dict().values(), final.state_dict().values(), strict=True))
        assert differs  # an earlier state, not a copy of the final weights


def test_automatic_budget_and_snapshot_checks():
    from lrcseg.train.finetune import default_steps

    assert default_steps(40, 8) == 600 and default_steps(2000, 8) == 6000
    assert default_steps(200, 8) == 1500  # 60 passes over 200 slices
    with pytest.raises(ConfigError, match="snapshots"):
        FinetuneConfig(run=RunConfig(steps=10), snapshots=[10])
    with pytest.raises(ConfigError, match="unknown key"):
        from lrcseg.config import from_dict

        from_dict(FinetuneConfig, {"steps": 100})  # the old top-level key is refused, not ignored
