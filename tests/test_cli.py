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
    from lrcseg.data.phantoms import write_phantom_dataset

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
