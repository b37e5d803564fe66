"""Issue 27 B, corrupted files are trusted: checkpoints, exports and cache entries are checked
against what was recorded when they were written.

Every fixture is a real file damaged for real (bytes flipped or zeroed at fixed offsets,
truncated, replaced by another entry's file). A damaged checkpoint or export is refused with one
line naming it (exit 1 at the CLI); a damaged cache entry is rebuilt with one warning naming the
damaged cache file and gives the arrays of a fresh cache, never an error about the source data.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lrcseg.data.slice_cache as slice_cache_mod
from lrcseg.cli import main
from lrcseg.config import ModelConfig, PreprocessConfig, SuperpixelConfig, to_dict
from lrcseg.data.layouts import Case
from lrcseg.data.readers import write_nifti
from lrcseg.data.slice_cache import SliceCache
from lrcseg.errors import DataError, DataWarning
from lrcseg.evaluate.metrics import case_metrics
from lrcseg.io_utils import zip_archive_fault
from lrcseg.models.export import export_weights, load_exported, meta_path
from lrcseg.models.load import load_checkpoint, load_finetuned
from lrcseg.superpixels.region_cache import RegionCache, record_path
from lrcseg.train.checkpoint import save_checkpoint

TINY = ModelConfig(backbone="resnet10", decoder_channels=(16, 8, 8, 8, 8), proj_dim=8)
SPACING = 4.0
COMMON = ["--no-progress", "--device", "cpu"]


# --------------------------------------------------------------------------- damaging files


def flip_bytes(path: Path, count: int, start: float = 0.05, stop: float = 0.95) -> None:
    """XOR 0xFF into ``count`` bytes at fixed offsets spread over [start, stop) of the file."""
    data = bytearray(path.read_bytes())
    for offset in np.linspace(start * len(data), stop * len(data), count, endpoint=False):
        data[int(offset)] ^= 0xFF
    path.write_bytes(bytes(data))


def zero_block(path: Path, offset_fraction: float = 0.5, size: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    at = int(offset_fraction * len(data))
    data[at:at + size] = bytes(len(data[at:at + size]))
    path.write_bytes(bytes(data))


def truncate(path: Path, fraction: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(fraction * path.stat().st_size)])


DAMAGE = {
    "flip": lambda p: flip_bytes(p, 50),
    "zero": zero_block,
    "truncate": truncate,
    "truncate_tail": lambda p: p.write_bytes(p.read_bytes()[:-10]),
}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def error_after_warnings(capsys, command: str) -> str:
    """The one error line of ``command``, after any number of warning lines."""
    *before, last = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith(f"lrcseg {command}: warning: ") for line in before), before
    assert last.startswith(f"lrcseg {command}: error: "), last
    return last


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A phantom dataset and a 2-step fine-tuning run of a tiny U-Net through the CLI (its
    slice cache in ``cache``)."""
    from lrcseg.phantoms.generate import write_phantom_dataset

    root = tmp_path_factory.mktemp("integrity")
    data = root / "phantoms"
    write_phantom_dataset(data, cases=4, seed=3, spacing_mm=(SPACING, SPACING, 8.0),
                          pretrain_fraction=0.25, train_fraction=0.5, montage=False)
    config = root / "ft.yaml"
    config.write_text("model: {backbone: resnet10, decoder_channels: [16, 8, 8, 8, 8]}\n"
                      "image_size: 64\noptim: {warmup_steps: 1}\n")
    run = root / "ft"
    assert main(["finetune", "--config", str(config), "--dataset", str(data), "--out", str(run),
                 "--steps", "2", "--batch-size", "2", "--spacing", str(SPACING),
                 "--cache-dir", str(root / "cache"), *COMMON]) == 0
    return {"root": root, "data": data, "config": config, "run": run, "cache": root / "cache"}


@pytest.fixture
def run_copy(workspace, tmp_path) -> Path:
    """A copy of the run (checkpoint.pt and final.pt become separate files)."""
    return Path(shutil.copytree(workspace["run"], tmp_path / "ft"))


def evaluate(workspace, model: Path, out: Path) -> int:
    return main(["evaluate", "--model", str(model), "--dataset", str(workspace["data"]),
                 "--out", str(out), *COMMON])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_evaluate_refuses_a_damaged_final_pt_by_name(workspace, run_copy, tmp_path, capsys, damage):
    final = run_copy / "final.pt"
    DAMAGE[damage](final)
    out = tmp_path / "metrics.json"
    assert evaluate(workspace, run_copy, out) == 1
    err = one_error_line(capsys)
    assert err.startswith(f"lrcseg evaluate: error: {final}: checkpoint is damaged (")
    assert not out.exists()


def test_fifty_flipped_bytes_in_a_model_that_evaluated_are_refused(workspace, run_copy, tmp_path,
                                                                    capsys):
    assert evaluate(workspace, run_copy, tmp_path / "good.json") == 0
    capsys.readouterr()
    flip_bytes(run_copy / "final.pt", 50)
    assert evaluate(workspace, run_copy / "final.pt", tmp_path / "bad.json") == 1
    assert "Bad CRC-32" in one_error_line(capsys)


def test_resume_from_a_damaged_checkpoint_says_it_cannot_continue(workspace, run_copy, capsys):
    latest = run_copy / "checkpoint.pt"
    flip_bytes(latest, 200)
    rc = main(["finetune", "--resume", "--out", str(run_copy), "--steps", "3", *COMMON])
    assert rc == 1
    err = error_after_warnings(capsys, "finetune")
    assert err.startswith(f"lrcseg finetune: error: {latest}: checkpoint is damaged (")
    assert "--resume cannot continue this run from it" in err and "non-finite" not in err


def test_resume_from_a_truncated_checkpoint_is_one_line(workspace, run_copy, capsys):
    truncate(run_copy / "checkpoint.pt", 0.3)
    assert main(["finetune", "--resume", "--out", str(run_copy), "--steps", "3", *COMMON]) == 1
    err = error_after_warnings(capsys, "finetune")
    assert f"{run_copy / 'checkpoint.pt'}: checkpoint is damaged (not a complete zip" in err


def test_intact_checkpoints_load_and_resume(workspace, run_copy, capsys):
    assert zip_archive_fault(run_copy / "checkpoint.pt") is None
    assert main(["finetune", "--resume", "--out", str(run_copy), "--steps", "3", *COMMON]) == 0
    assert load_checkpoint(run_copy / "final.pt")["step"] == 3


# --------------------------------------------------------------------------- non-finite models


def _save_model(workspace, run: Path, edit) -> Path:
    """A fine-tuned model as finetune writes it (tiny U-Net, the phantoms' labels), its state
    dict changed by ``edit`` before it is saved."""
    from lrcseg.data.layouts import load_dataset
    from lrcseg.models.unet import build_unet, flexible_unet_kwargs

    labels = load_dataset(workspace["data"]).labels
    preprocess = PreprocessConfig(spacing_mm=SPACING)
    torch.manual_seed(0)
    model = build_unet(TINY, preprocess.in_channels, len(labels))
    state = model.state_dict()
    edit(state)
    run.mkdir()
    save_checkpoint(run, {
        "step": 1, "kind": "finetune", "model": state,
        "flexible_unet": flexible_unet_kwargs(TINY, preprocess.in_channels, len(labels)),
        "model_config": to_dict(TINY), "preprocess": to_dict(preprocess), "labels": labels,
    }, final=True)
    return run


def test_nan_weights_are_refused_not_scored_as_dice_0(workspace, tmp_path, capsys):
    def poison(state):
        next(v for k, v in state.items() if k.startswith("encoder") and v.is_floating_point())[0] = float("nan")

    run = _save_model(workspace, tmp_path / "nan", poison)
    assert evaluate(workspace, run, tmp_path / "m.json") == 1
    err = one_error_line(capsys)
    assert err.startswith(f"lrcseg evaluate: error: {run / 'final.pt'}: checkpoint holds NaN or inf")
    assert not (tmp_path / "m.json").exists()


def test_non_finite_logits_of_finite_weights_are_refused(workspace, tmp_path, capsys):
    def overflow(state):
        for key, value in state.items():
            if key.startswith("segmentation_head") and value.is_floating_point():
                value.fill_(torch.finfo(torch.float32).max)

    run = _save_model(workspace, tmp_path / "inf", overflow)
    assert evaluate(workspace, run, tmp_path / "m.json") == 1
    err = one_error_line(capsys)
    assert err.startswith(f"lrcseg evaluate: error: {run / 'final.pt'}: the model outputs NaN or inf")
    assert not (tmp_path / "m.json").exists()
    model, _ = load_finetuned(run)  # the guard travels with the model (predict, experiments)
    with pytest.raises(DataError, match="NaN or inf logits"):
        model(torch.rand(1, 1, 64, 64))


@pytest.mark.parametrize("value", [np.nan, np.inf, 0.5])
def test_label_maps_of_nan_inf_or_fractions_are_not_scored(value):
    ref = np.zeros((4, 4, 4), np.int16)
    ref[1:3, 1:3, 1:3] = 1
    pred = ref.astype(np.float32)
    assert case_metrics(pred, ref, (1.0, 1.0, 1.0), {"liver": 1})["liver"]["dice"] == 1.0
    pred[0, 0, 0] = value
    with pytest.raises(ValueError, match="integer label ids"):
        case_metrics(pred, ref, (1.0, 1.0, 1.0), {"liver": 1})


# --------------------------------------------------------------------------- exports


@pytest.fixture
def exported(tmp_path) -> Path:
    from lrcseg.models.pretrain_net import PretrainNetwork

    torch.manual_seed(0)
    net = PretrainNetwork(TINY, in_channels=1)
    out = tmp_path / "export" / "model.pt"
    export_weights(net, TINY, 1, to_dict(PreprocessConfig(spacing_mm=SPACING)), None, out)
    return out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_export_is_refused_by_name(exported, damage):
    DAMAGE[damage](exported)
    with pytest.raises(DataError, match="differ from the SHA-256 recorded in model.json") as exc:
        load_exported(exported)
    assert exc.value.path == str(exported)


def test_export_swapped_for_another_is_refused(exported, tmp_path):
    from lrcseg.models.pretrain_net import PretrainNetwork

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    export_weights(PretrainNetwork(TINY, in_channels=1), TINY, 1, {}, None, other)
    shutil.copyfile(other, exported)  # same architecture, other weights
    with pytest.raises(DataError, match="replaced by another file"):
        load_exported(exported)


def test_export_of_an_older_lrcseg_is_read_and_checked_by_its_crcs(exported):
    meta = json.loads(meta_path(exported).read_text())
    del meta["weights_sha256"]  # as lrcseg wrote it before issue 27
    meta_path(exported).write_text(json.dumps(meta))
    state, _ = load_exported(exported)
    assert state
    flip_bytes(exported, 50)
    with pytest.raises(DataError, match=r"exported weights are damaged \(Bad CRC-32"):
        load_exported(exported)


def test_finetune_from_a_damaged_export_is_one_line_exit_1(workspace, exported, tmp_path, capsys):
    flip_bytes(exported, 50)
    rc = main(["finetune", "--config", str(workspace["config"]), "--dataset",
               str(workspace["data"]), "--init", str(exported), "--out", str(tmp_path / "ft"),
               "--steps", "1", "--spacing", str(SPACING), "--cache-dir", str(workspace["cache"]),
               *COMMON])
    assert rc == 1
    err = error_after_warnings(capsys, "finetune")
    assert err.startswith(f"lrcseg finetune: error: {exported}: exported weights differ")


# --------------------------------------------------------------------------- slice cache

AFFINE = np.diag([0.75, 0.75, 2.0, 1.0])


def _case(folder: Path, seed: int, name: str) -> Case:
    rng = np.random.default_rng(seed)
    hu = np.full((40, 36, 4), -1000.0, np.float32)
    hu[6:34, 6:30] = rng.normal(40, 30, size=(28, 24, 4))
    lab = np.zeros(hu.shape, np.uint8)
    lab[10:20, 10:20, 1:3] = 2
    lab[22:30, 12:20, 0:4] = 1
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / f"{name}.nii.gz", hu, AFFINE)
    write_nifti(folder / f"{name}_seg.nii.gz", lab, AFFINE)
    return Case(name, folder / f"{name}.nii.gz", folder / f"{name}_seg.nii.gz")


def _assert_same_volume(got, fresh) -> None:
    for name in ("image", "body", "label"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(fresh, name)))
    assert got.spacing_mm == fresh.spacing_mm and got.original_shape == fresh.original_shape
    np.testing.assert_array_equal(got.affine, fresh.affine)


def _wrong_ids(path: Path) -> None:
    """Valid but wrong label ids, written as a well-formed .npy of the same size."""
    label = np.load(path)
    np.save(path, np.where(label == 2, 1, label).astype(label.dtype))


def _swap_in_other_case(path: Path) -> None:
    """The same file of another case (same shape) put in its place."""
    other = next(p for p in path.parent.parent.iterdir() if p != path.parent)
    shutil.copyfile(other / path.name, path)


SLICE_DAMAGE = [
    ("label.npy", lambda p: flip_bytes(p, 20, 0.3)),
    ("label.npy", _wrong_ids),
    ("image.npy", lambda p: flip_bytes(p, 50, 0.3)),
    ("image.npy", lambda p: zero_block(p, 0.5, 512)),
    ("image.npy", _swap_in_other_case),
    ("body.npy", truncate),
    ("label.npy", lambda p: p.write_bytes(p.read_bytes()[:100])),  # inside the header
    ("meta.json", lambda p: flip_bytes(p, 3)),
    ("meta.json", lambda p: p.write_text(p.read_text().replace('"spacing_mm": [\n    1.5',
                                                               '"spacing_mm": [\n    2.5'))),
    ("meta.json", Path.unlink),
]


def _damaged_entry(tmp_path, name, damage):
    data = tmp_path / "data"
    cases = [_case(data, 0, "c1"), _case(data, 1, "c2")]
    cfg = PreprocessConfig(spacing_mm=1.5)
    for case in cases:
        SliceCache(cfg).get(case)
    target = SliceCache(cfg).case_dir(cases[0]) / name
    damage(target)
    fresh = SliceCache(cfg, root=tmp_path / "fresh").get(cases[0])
    return cfg, cases[0], target, fresh


def _single_warning(caught, path: Path) -> str:
    messages = [w.message for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 1, [str(m) for m in messages]
    assert messages[0].path == str(path)
    return str(messages[0])


@pytest.mark.parametrize(("name", "damage"), SLICE_DAMAGE,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(SLICE_DAMAGE)])
def test_damaged_slice_cache_entry_is_rebuilt_with_one_warning(tmp_path, name, damage):
    cfg, case, target, fresh = _damaged_entry(tmp_path, name, damage)
    sources = {p: p.read_bytes() for p in (case.image, case.label)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = SliceCache(cfg).get(case)
    text = _single_warning(caught, target)
    assert "damaged slice cache entry" in text and "rebuilding it" in text
    _assert_same_volume(got, fresh)
    assert {p: p.read_bytes() for p in sources} == sources  # never touched, never blamed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same_volume(SliceCache(cfg).get(case), fresh)  # rebuilt once, then reused
    assert not [p for p in got.dir.parent.iterdir() if p.name.startswith(".")]


def test_an_entry_folder_of_another_case_is_rebuilt(tmp_path):
    a = _case(tmp_path / "data", 0, "c1")
    b = _case(tmp_path / "other", 1, "c1")  # same id, other source files
    cache = SliceCache(PreprocessConfig())
    entry_a, entry_b = cache.get(a).dir, cache.case_dir(b)
    shutil.copytree(entry_a, entry_b)  # b's entry holds a's slices
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cache.get(b)
    assert "describes the entry" in _single_warning(caught, entry_b / "meta.json")
    _assert_same_volume(got, SliceCache(PreprocessConfig(), root=tmp_path / "fresh").get(b))


def test_flipped_label_cache_is_not_blamed_on_the_source_label(workspace, tmp_path, capsys):
    """The issue's case through ``lrcseg finetune``: the damaged cached label.npy is named in
    one warning and rebuilt; the run succeeds."""
    cache = Path(shutil.copytree(workspace["cache"], tmp_path / "cache"))
    labelled = json.loads((workspace["run"] / "split.json").read_text())["labeled"][0]
    (label,) = cache.glob(f"slices/*/{labelled}-*/label.npy")
    flip_bytes(label, 30, 0.2)
    rc = main(["finetune", "--config", str(workspace["config"]), "--dataset",
               str(workspace["data"]), "--out", str(tmp_path / "ft"), "--steps", "1",
               "--batch-size", "2", "--spacing", str(SPACING), "--cache-dir", str(cache), *COMMON])
    err = capsys.readouterr().err
    assert rc == 0, err
    damaged = [line for line in err.splitlines() if "damaged" in line]
    assert damaged == [f"lrcseg finetune: warning: {label}: damaged slice cache entry (content "
                       "differs from what was written (SHA-256)); rebuilding it from "
                       f"{workspace['data'] / 'imagesTr' / (labelled + '_0000.nii.gz')}"]
    assert "labelsTr" not in err and "not declared" not in err


def test_entry_of_an_older_lrcseg_is_read_and_a_truncated_one_rebuilt(tmp_path):
    case = _case(tmp_path / "data", 0, "c1")
    cfg = PreprocessConfig()
    folder = SliceCache(cfg).get(case).dir
    meta = json.loads((folder / "meta.json").read_text())
    for key in ("files", "digest", "entry"):
        del meta[key]
    meta["format"] = 1  # as lrcseg wrote it before issue 27
    (folder / "meta.json").write_text(json.dumps(meta))
    fresh = SliceCache(cfg, root=tmp_path / "fresh").get(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = SliceCache(cfg).get(case)
    assert got.digest is None
    _assert_same_volume(got, fresh)
    truncate(folder / "image.npy", 0.9)  # formerly: ValueError "mmap length is greater ..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = SliceCache(cfg).get(case)
    assert "mmap length" in _single_warning(caught, folder / "image.npy")
    assert got.digest is not None
    _assert_same_volume(got, fresh)


def test_damaged_again_after_the_rebuild_is_refused_by_name(tmp_path, monkeypatch):
    case = _case(tmp_path / "data", 0, "c1")
    real = slice_cache_mod.file_record

    def wrong_size(path):
        record = real(path)
        return {**record, "bytes": record["bytes"] + 1}

    monkeypatch.setattr(slice_cache_mod, "file_record", wrong_size)  # a disk that loses bytes
    cache = SliceCache(PreprocessConfig())
    with pytest.raises(DataError, match="damaged right after it was built") as exc:
        cache.get(case)
    assert exc.value.path == str(cache.case_dir(case) / "image.npy")


def test_digests_are_checked_once_per_cache_object(tmp_path, monkeypatch):
    case = _case(tmp_path / "data", 0, "c1")
    cache = SliceCache(PreprocessConfig())
    cache.get(case)
    hashed = []
    real = slice_cache_mod.file_sha256
    monkeypatch.setattr(slice_cache_mod, "file_sha256", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        cache.get(case)
    assert hashed == []  # checked when this object built it
    SliceCache(PreprocessConfig()).get(case)
    assert sorted(p.name for p in hashed) == ["body.npy", "image.npy", "label.npy"]


# --------------------------------------------------------------------------- region cache

REGION_AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
SUPERPIXELS = SuperpixelConfig(min_size_mm2=20.0)


def _ct_case(folder: Path, name: str, seed: int) -> Case:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    hu = np.full((48, 40, 3), -1000.0, np.float32)
    blocks = rng.choice([-100.0, 0.0, 60.0, 200.0], size=(6, 5, 3))
    tissue = np.repeat(np.repeat(blocks, 6, axis=0), 6, axis=1)[:36, :28]
    hu[6:42, 6:34] = ndimage.gaussian_filter(tissue + rng.normal(0, 5, tissue.shape), (0.7, 0.7, 0))
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / f"{name}.nii.gz", hu, REGION_AFFINE)
    return Case(name, folder / f"{name}.nii.gz")


def _regions_swap(path: Path) -> None:
    """The region file and record of another case (same shape) put in their place."""
    other = next(p for p in path.parent.parent.iterdir() if p != path.parent)
    shutil.copyfile(other / path.name, path)
    shutil.copyfile(other / record_path(path).name, record_path(path))


REGION_DAMAGE = [  # (the file the warning names, the damage)
    ("npy", lambda p: flip_bytes(p, 20, 0.3)),
    ("npy", lambda p: zero_block(p, 0.4, 256)),
    ("npy", truncate),  # formerly: ValueError "mmap length is greater than file size"
    ("record", _regions_swap),
    ("record", lambda p: record_path(p).unlink()),
    ("record", lambda p: flip_bytes(record_path(p), 3)),
]


@pytest.mark.parametrize(("damaged", "damage"), REGION_DAMAGE,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(REGION_DAMAGE)])
def test_damaged_region_file_is_recomputed_with_one_warning(tmp_path, damaged, damage):
    cases = [_ct_case(tmp_path / "data", "c1", 0), _ct_case(tmp_path / "data", "c2", 1)]
    for case in cases:
        RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS).get(case)
    cache = RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS)
    path = cache.path(cache.slice_cache.get(cases[0]))
    damage(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = np.asarray(cache.get(cases[0]))
    named = path if damaged == "npy" else record_path(path)
    assert "damaged region cache file" in _single_warning(caught, named)
    assert cache.computed_slices == 3
    fresh = RegionCache(SliceCache(PreprocessConfig(), root=tmp_path / "fresh"), SUPERPIXELS)
    np.testing.assert_array_equal(got, fresh.get(cases[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS)
        np.testing.assert_array_equal(again.get(cases[0]), got)
    assert again.computed_slices == 0


def test_region_file_of_other_settings_renamed_into_place_is_recomputed(tmp_path):
    case = _ct_case(tmp_path / "data", "c1", 0)
    cache = RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS)
    coarse = RegionCache(SliceCache(PreprocessConfig()), SuperpixelConfig(min_size_mm2=20.0,
                                                                           scale=400.0))
    reference = np.asarray(cache.get(case)).copy()
    coarse.get(case)
    vol = cache.slice_cache.get(case)
    for source in (coarse.path(vol), record_path(coarse.path(vol))):  # the pair, swapped in
        target = cache.path(vol) if source.suffix == ".npy" else record_path(cache.path(vol))
        shutil.copyfile(source, target)
    again = RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = np.asarray(again.get(case))
    assert "other superpixel settings" in _single_warning(caught, record_path(cache.path(vol)))
    np.testing.assert_array_equal(got, reference)


def test_build_recomputes_a_damaged_region_file(tmp_path):
    case = _ct_case(tmp_path / "data", "c1", 0)
    cache = RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS)
    reference = np.asarray(cache.get(case)).copy()
    truncate(cache.path(cache.slice_cache.get(case)), 0.7)
    again = RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = again.build([case], workers=1, progress=False)
    _single_warning(caught, cache.path(cache.slice_cache.get(case)))
    assert stats["computed_slices"] == 3
    np.testing.assert_array_equal(again.get(case), reference)


def test_region_file_of_an_older_lrcseg_is_read(tmp_path):
    case = _ct_case(tmp_path / "data", "c1", 0)
    cache = RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS)
    regions = np.asarray(cache.get(case)).copy()
    folder = cache.slice_cache.get(case).dir
    meta = json.loads((folder / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("files", "digest", "entry")}
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    record_path(cache.path(cache.slice_cache.get(case))).unlink()  # written before records
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = RegionCache(SliceCache(PreprocessConfig()), SUPERPIXELS)
        np.testing.assert_array_equal(old.get(case), regions)
    assert old.computed_slices == 0
