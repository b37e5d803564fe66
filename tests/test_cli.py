"""The command line: version, help for every subcommand, one-line errors with exit 1,
environment faults with exit 2, data warnings once each."""

from __future__ import annotations

import errno
import subprocess
import sys
import warnings

import pytest

from lrcseg import __version__
from lrcseg.cli import COMMANDS, describe_os_error, main
from lrcseg.errors import DataWarning, handle_data_warnings


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"lrcseg {name}" in text and len(text) > 200


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_user_errors_are_one_line_with_exit_1(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["pretrain", "--data", str(missing), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrcseg pretrain: error:") and str(missing) in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_finetune_unknown_init_is_refused(tmp_path, capsys):
    from lrcseg.phantoms.generate import write_phantom_dataset

    data = tmp_path / "d"
    write_phantom_dataset(data, cases=2, seed=0, spacing_mm=(6.0, 6.0, 12.0), montage=False,
                          pretrain_fraction=0.0, train_fraction=0.5)
    assert main(["finetune", "--dataset", str(data), "--init", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "ft"), "--no-progress"]) == 1
    assert "no such pre-training run folder" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "lrcseg", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and __version__ in out.stdout


def test_environment_fault_names_the_path_and_the_cause():
    fault = OSError(errno.EROFS, "Read-only file system", "/data/run/config.yaml")
    assert describe_os_error(fault) == "/data/run/config.yaml: Read-only file system (EROFS)"
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")) == \
        "No space left on device (ENOSPC)"
    moved = OSError(errno.ENOTEMPTY, "Directory not empty", "/c/.tmp1", None, "/c/slices")
    assert describe_os_error(moved) == "/c/.tmp1 -> /c/slices: Directory not empty (ENOTEMPTY)"


def test_data_warnings_go_to_the_handler_and_others_pass(recwarn):
    seen = []
    with handle_data_warnings(seen.append):
        for _ in range(2):
            warnings.warn(DataWarning("/x.nii", "constant image"), stacklevel=1)
        warnings.warn("not about data", UserWarning, stacklevel=1)
    assert [str(w) for w in seen] == ["/x.nii: constant image"] * 2
    assert [str(w.message) for w in recwarn] == ["not about data"]


def test_help_does_not_import_torch():
    # ``import torch`` costs ~2 s of CPU: every command pays it before parsing its arguments
    # if a command module imports it at module level (issue 17).
    import subprocess
    import sys

    code = "import sys, lrcseg.cli as c; c.build_parser(); print(sorted({'torch', 'monai'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_every_option_help_states_its_default(name):
    """Every option that takes a value or sets a config switch says its default in --help."""
    import argparse

    from lrcseg.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[name]
    missing = []
    for action in command._actions:
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or (action.nargs == 0 and action.default is False)
                or isinstance(action, argparse._StoreFalseAction)):
            continue  # positionals, required options, --help, plain flags, --no-X of a --X
        text = command.formatter_class("x")._get_help_string(action) % vars(action) \
            if action.help else ""
        if "default" not in text and "required" not in text:
            missing.append(action.option_strings[0])
    assert not missing, f"lrcseg {name}: no default in the help of {missing}"


def test_help_defaults_are_the_config_defaults(capsys):
    from lrcseg.config import FinetuneConfig, PretrainConfig

    pre, ft = PretrainConfig(), FinetuneConfig()
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())  # after the usage
    for flag, value in [("--steps STEPS", pre.run.steps), ("--batch-size BATCH_SIZE", pre.run.batch_size),
                        ("--lr LR", pre.optim.lr), ("--backbone BACKBONE", pre.model.backbone),
                        ("--image-size IMAGE_SIZE", pre.augment.image_size),
                        ("--lrc-weight LRC_WEIGHT", pre.lrc.weight),
                        ("--warmup-steps WARMUP_STEPS", pre.optim.warmup_steps),
                        ("--method {", pre.method)]:
        after = text[text.index(flag):]
        assert f"(default: {value})" in after[:260], (flag, after[:260])
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())
    after = text[text.index("--batch-size BATCH_SIZE"):]
    assert f"(default: {ft.run.batch_size})" in after[:120]  # 8, not RunConfig's 32
    assert "(default: automatic" in text[text.index("--steps STEPS"):][:120]


def test_probe_help_quotes_the_probe_defaults(capsys):
    from lrcseg.evaluate.probe import DEFAULT_LEVELS, DEFAULT_PIXELS

    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {DEFAULT_PIXELS})" in text
    assert f"(default {','.join(DEFAULT_LEVELS)})" in text


@pytest.mark.parametrize("name", ["pretrain", "finetune", "experiment", "superpixels", "phantoms"])
def test_command_help_does_not_import_torch(name):
    code = (f"import sys\nfrom lrcseg.cli import main\ntry:\n    main([{name!r}, '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted({'torch', 'monai', 'numba', 'matplotlib'} & set(sys.modules)), "
            "file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "[]"


def _print_config(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command,cls_name", [("pretrain", "PretrainConfig"),
                                              ("finetune", "FinetuneConfig")])
def test_print_config_round_trips_through_config(command, cls_name, tmp_path, capsys):
    import yaml

    from lrcseg import config as config_module

    flags = ["--steps", "70", "--lr", "0.003", "--backbone", "resnet18", "--image-size", "96",
             "--out", str(tmp_path / "run")]
    printed = _print_config(capsys, [command, "--print-config", *flags])
    assert not (tmp_path / "run").exists()  # nothing trained, no folder made
    data = yaml.safe_load(printed)
    assert data["run"]["steps"] == 70 and data["optim"]["lr"] == 0.003
    assert data["model"]["backbone"] == "resnet18" and data["run"]["out"] == str(tmp_path / "run")
    default = getattr(config_module, cls_name)()
    assert data["run"]["batch_size"] == default.run.batch_size  # a partial section keeps the rest
    assert data["optim"]["warmup_steps"] == default.optim.warmup_steps
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    again = _print_config(capsys, [command, "--print-config", "--config", str(path)])
    assert again == printed


def test_experiment_print_config_round_trips(tmp_path, capsys):
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs" / "experiment_tiny.yaml"
    printed = _print_config(capsys, ["experiment", "--config", str(tiny), "--print-config",
                                     "--device", "cpu"])
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert _print_config(capsys, ["experiment", "--config", str(path), "--print-config"]) == printed
    assert "finetune_steps: 4" in printed


@pytest.mark.parametrize("name,command,backbone,size,batch", [
    ("pretrain_cpu", "pretrain", "resnet18", 128, 16),
    ("pretrain_gpu", "pretrain", "resnet50", 224, 32),
    ("finetune_cpu", "finetune", "resnet18", 128, 8),
    ("finetune_gpu", "finetune", "resnet50", 224, 32),
])
def test_example_configs_load(name, command, backbone, size, batch, capsys):
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    data = yaml.safe_load(_print_config(capsys, [command, "--config", str(path), "--print-config"]))
    assert data["model"]["backbone"] == backbone and data["run"]["batch_size"] == batch
    assert (data["augment"]["image_size"] if command == "pretrain" else data["image_size"]) == size
    assert data["run"]["device"] == ("cuda" if name.endswith("gpu") else "cpu")
    assert data["optim"]["warmup_steps"] < (data["run"]["steps"] or 600)


def test_training_without_out_is_refused_in_one_line(capsys):
    assert main(["pretrain", "--data", "somewhere"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrcseg pretrain: error: --out is required") and len(err.splitlines()) == 1


def test_a_warmup_as_long_as_the_run_is_warned_once(tmp_path, capsys):
    from lrcseg.phantoms.generate import write_phantom_dataset

    data = tmp_path / "d"
    write_phantom_dataset(data, cases=2, seed=0, spacing_mm=(6.0, 6.0, 12.0), montage=False,
                          pretrain_fraction=0.0, train_fraction=0.5)
    assert main(["finetune", "--dataset", str(data), "--out", str(tmp_path / "ft"), "--steps", "2",
                 "--warmup-steps", "5", "--backbone", "resnet10", "--spacing", "6",
                 "--image-size", "32", "--batch-size", "2", "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "warm-up" in line]
    assert lines == ["lrcseg finetune: warning: warm-up of 5 steps >= the run's 2 steps: the "
                     "learning rate never reaches its peak (--lr) nor decays; lower "
                     "optim.warmup_steps (--warmup-steps)"]


def test_finetune_organ_contrast_flag_sets_the_config(capsys):
    import yaml

    assert main(["finetune", "--organ-contrast", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["organ_contrast"]["enabled"] is True
    assert main(["finetune", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["organ_contrast"]["enabled"] is False
