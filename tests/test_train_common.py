"""The shared training pieces: resumable sampler, per-step generators, schedule, run folders."""

from __future__ import annotations

import itertools

import pytest
import torch

from lrcseg.errors import ConfigError
from lrcseg.train.common import ResumableSampler, step_generator, warmup_cosine
from lrcseg.train.resume import (
    check_resumable,
    check_resume_compatible,
    load_resume_checkpoint,
    prepare_run_dir,
)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_epochs_are_permutations():
    stream = take(ResumableSampler(7, seed=3), 21)
    for e in range(3):
        assert sorted(stream[7 * e:7 * (e + 1)]) == list(range(7))
    assert stream[:7] != stream[7:14]  # epochs are reshuffled


def test_sampler_resumes_mid_epoch():
    full = take(ResumableSampler(5, seed=1), 23)
    for start in (0, 3, 5, 12):
        assert take(ResumableSampler(5, seed=1, start=start), 23 - start) == full[start:]


def test_sampler_replicas_partition_the_stream_and_resume():
    a = take(ResumableSampler(6, seed=0, rank=0, num_replicas=2), 6)
    b = take(ResumableSampler(6, seed=0, rank=1, num_replicas=2), 6)
    full = take(ResumableSampler(6, seed=0), 12)
    assert a == full[0::2] and b == full[1::2]
    assert take(ResumableSampler(6, seed=0, start=2, rank=1, num_replicas=2), 4) == b[2:]


def test_sampler_rejects_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        ResumableSampler(0, seed=0)


def test_step_generator_is_pure_function_of_seed_and_step():
    a = torch.rand(5, generator=step_generator(0, 10))
    b = torch.rand(5, generator=step_generator(0, 10))
    c = torch.rand(5, generator=step_generator(0, 11))
    d = torch.rand(5, generator=step_generator(1, 10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)


def test_prepare_run_dir_refuses_to_overwrite(tmp_path):
    from lrcseg.train.checkpoint import save_checkpoint

    run = prepare_run_dir(tmp_path / "run", resume=False)
    (run / "config.yaml").write_text("x: 1\n")
    save_checkpoint(run, {"step": 1})
    with pytest.raises(ConfigError, match="holds a checkpoint; use --resume"):
        prepare_run_dir(run, resume=False)
    assert prepare_run_dir(run, resume=True) == run
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_run_dir(tmp_path / "missing", resume=True)


def test_prepare_run_dir_never_clears_files_lrcseg_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("x: 1\n")
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        prepare_run_dir(mine, resume=False)
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.txt"]


def test_a_run_that_stopped_before_its_first_checkpoint_is_rerun_not_resumed(tmp_path):
    run = tmp_path / "run"  # what a disk full at the first checkpoint leaves
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1").write_bytes(b"\x00" * 10)
    (run / "config.yaml").write_text("run: {steps: 10}\n")
    (run / "run_card.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    (run / ".checkpoint.pt.1a2b3c4d.pt").write_bytes(b"torn")  # a kill -9 mid-write
    for resume_attempt in (lambda: prepare_run_dir(run, resume=True),
                           lambda: load_resume_checkpoint(run)):
        with pytest.raises(ConfigError, match="no checkpoint to resume: the run stopped before "
                                              "its first checkpoint; run it again without"):
            resume_attempt()
    assert prepare_run_dir(run, resume=False, create=False) == run
    assert (run / "config.yaml").is_file()  # a check alone changes nothing
    assert prepare_run_dir(run, resume=False) == run
    assert list(run.iterdir()) == []


def test_resume_of_an_empty_folder_or_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="there is no checkpoint to resume"):
        check_resumable(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="this is a file, not a run folder"):
        prepare_run_dir(tmp_path / "file", resume=True)
    with pytest.raises(ConfigError, match="--out names a file, not a run folder"):
        prepare_run_dir(tmp_path / "file", resume=False, create=False)
    assert (tmp_path / "file").read_text() == "x"


# --------------------------------------------------------------------------- resume configs


def _pretrain_config(**changes) -> dict:
    from lrcseg.config import PretrainConfig, to_dict

    config = to_dict(PretrainConfig(data=["data/ph"]))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[key] = value
    return config


def test_resume_with_the_same_config_from_yaml_is_compatible():
    import yaml

    saved = yaml.safe_load(yaml.safe_dump(_pretrain_config()))  # tuples became lists
    assert check_resume_compatible(saved, _pretrain_config(), "pretrain") == []


@pytest.mark.parametrize("change,shown", [
    ({"model__backbone": "resnet18"}, "model.backbone 'resnet50' -> 'resnet18' (changes the "
                                      "network's shape)"),
    ({"preprocess__spacing_mm": 1.0}, "preprocess.spacing_mm 1.5 -> 1.0 (changes the input"),
    ({"method": "simclr"}, "method 'moco' -> 'simclr' (changes the objective)"),
    ({"lrc__enabled": False}, "lrc.enabled True -> False (changes the objective)"),
    ({"data": ["other"]}, "data ['data/ph'] -> ['other'] (changes the training data)"),
    ({"run__batch_size": 8}, "run.batch_size 32 -> 8 (changes the sample order)"),
])
def test_resume_refuses_changes_that_continue_a_different_run(change, shown):
    with pytest.raises(ConfigError, match="--resume would continue a different run") as exc:
        check_resume_compatible(_pretrain_config(), _pretrain_config(**change), "pretrain")
    assert shown in str(exc.value) and "another --out" in str(exc.value)


def test_resume_lists_every_refused_change_at_once():
    new = _pretrain_config(model__backbone="resnet18", preprocess__window_hu=[-100.0, 200.0])
    with pytest.raises(ConfigError) as exc:
        check_resume_compatible(_pretrain_config(), new, "pretrain")
    assert "model.backbone" in str(exc.value) and "preprocess.window_hu" in str(exc.value)


def test_resume_warns_when_steps_change_and_ignores_the_device():
    new = _pretrain_config(run__steps=2000, run__device="cuda", run__workers=4)
    notes = check_resume_compatible(_pretrain_config(), new, "pretrain")
    assert len(notes) == 1
    assert notes[0].startswith("run.steps 1000 -> 2000: the learning-rate schedule")
    assert notes[0].endswith("config.yaml now records 2000")
    notes = check_resume_compatible(_pretrain_config(), _pretrain_config(optim__lr=5e-4),
                                    "pretrain")
    assert notes == ["optim.lr 0.001 -> 0.0005: applies from the resumed step on, so the run is "
                     "not what either setting gives uninterrupted"]


def test_resume_of_a_finetune_run():
    from lrcseg.config import FinetuneConfig, RunConfig, to_dict

    saved = to_dict(FinetuneConfig(dataset="d", init="runs/pre"))
    assert check_resume_compatible(saved, saved, "finetune") == []
    other = to_dict(FinetuneConfig(dataset="d", init="runs/other"))
    with pytest.raises(ConfigError, match="init 'runs/pre' -> 'runs/other' .changes the initial"):
        check_resume_compatible(saved, other, "finetune")
    longer = to_dict(FinetuneConfig(dataset="d", init="runs/pre", run=RunConfig(steps=300, batch_size=8)))
    assert [n.split(":")[0] for n in check_resume_compatible(saved, longer, "finetune")] == \
        ["run.steps None -> 300"]
    with pytest.raises(ValueError, match="Illegal kind"):
        check_resume_compatible(saved, saved, "evaluate")


def test_final_state_is_stored_once_and_later_checkpoints_leave_it_alone(tmp_path):
    from lrcseg.models.load import load_checkpoint
    from lrcseg.train.checkpoint import save_checkpoint

    w = torch.arange(1000, dtype=torch.float32)
    save_checkpoint(tmp_path, {"step": 5, "w": w}, final=True)
    final, latest = tmp_path / "final.pt", tmp_path / "checkpoint.pt"
    assert final.stat().st_ino == latest.stat().st_ino  # one file, two names
    assert load_checkpoint(latest)["step"] == 5
    assert torch.equal(load_checkpoint(final)["w"], w)
    save_checkpoint(tmp_path, {"step": 7, "w": w + 1})  # e.g. a resumed, longer run
    assert load_checkpoint(latest)["step"] == 7 and load_checkpoint(final)["step"] == 5
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_checkpoints_of_the_single_level_era_still_load(tmp_path):
    # Before multi-level LRC: model.local_level (an int) and network keys local_head.*.
    from lrcseg.config import ModelConfig, PretrainConfig, from_dict, to_dict
    from lrcseg.models.load import load_checkpoint
    from lrcseg.models.pretrain_net import PretrainNetwork

    net = PretrainNetwork(ModelConfig(backbone="resnet10", local_levels=(2,), proj_dim=8), 1)
    old_network = {("local_head." + k[len("local_heads.0."):] if k.startswith("local_heads.0.") else k): v
                   for k, v in net.state_dict().items()}
    old_config = to_dict(PretrainConfig(model=ModelConfig(backbone="resnet10", proj_dim=8)))
    del old_config["model"]["local_levels"]
    old_config["model"]["local_level"] = 2
    torch.save({"kind": "pretrain", "config": old_config, "network": old_network, "step": 3},
               tmp_path / "final.pt")
    state = load_checkpoint(tmp_path / "final.pt")
    cfg = from_dict(PretrainConfig, state["config"])
    assert cfg.model.local_levels == (2,)
    restored = PretrainNetwork(cfg.model, 1)
    restored.load_state_dict(state["network"])  # strict: every key maps
    assert torch.equal(restored.local_heads[0].net[0].weight, net.local_heads[0].net[0].weight)
