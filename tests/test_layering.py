"""The import layering of issue 16: inference and evaluation never need the training code,
losses are tensors in and a scalar out, and data reading knows nothing of superpixels. And of
issue 26: the command line sits on top; ``lrcseg.cli`` loads the commands, so no command
imports it back, and no library module imports either; the nnU-Net bridge (``lrcseg.nnunet``)
is one package, reached from a few named places, importable without nnunetv2."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lrcseg

PACKAGE = Path(lrcseg.__file__).resolve().parent


def imported_modules(path: Path, package: str | None = None) -> Iterator[str]:
    """Every module an ``import`` statement in ``path`` names, at any depth (function-level
    imports included); ``from lrcseg import train`` yields ``lrcseg`` and ``lrcseg.train``.
    package: the dotted package ``path`` is in (default: from its place under lrcseg/), to
    resolve relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    if package is None:
        package = ".".join(("lrcseg", *path.relative_to(PACKAGE).parent.parts))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _files(where: str) -> list[Path]:
    target = PACKAGE / where
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def _is_within(module: str, forbidden: str) -> bool:
    return module == forbidden or module.startswith(forbidden + ".")


RULES = [
    ("evaluate", "lrcseg.train"),
    ("models", "lrcseg.train"),
    ("commands/predict.py", "lrcseg.train"),
    ("commands/evaluate.py", "lrcseg.train"),
    ("commands/probe.py", "lrcseg.train"),
    ("commands/export.py", "lrcseg.train"),
    ("losses", "lrcseg.models"),
    ("losses", "lrcseg.methods"),
    ("methods", "lrcseg.train"),
    ("data", "lrcseg.superpixels"),
    ("data", "lrcseg.phantoms"),
    ("superpixels", "lrcseg.train"),
    ("commands", "lrcseg.cli"),
    # the nnU-Net bridge (issue 26) sits beside train/: it may import models/, data/, evaluate/
    ("nnunet", "lrcseg.train"),
    ("nnunet", "lrcseg.experiment"),
    ("nnunet", "lrcseg.methods"),
    ("nnunet", "lrcseg.losses"),
    ("nnunet", "lrcseg.superpixels"),
    ("nnunet", "lrcseg.phantoms"),
    ("nnunet/network.py", "lrcseg.models"),  # models/pretrain_net.py builds its network there
]

#: the only modules outside lrcseg/nnunet/ that import it, and what of it each may import: the
#: commands that read plans or export for nnU-Net, the experiment's fine-tuning back-ends (the
#: one place an experiment meets nnU-Net) and ``PretrainNetwork``, which builds the plans'
#: network through ``nnunet/network.py`` alone (a leaf: no models/ import back)
NNUNET_IMPORTERS = {
    "commands/export.py": "lrcseg.nnunet",
    "commands/pretrain.py": "lrcseg.nnunet",
    "experiment/backends.py": "lrcseg.nnunet",
    "models/pretrain_net.py": "lrcseg.nnunet.network",
}


@pytest.mark.parametrize(("where", "forbidden"), RULES)
def test_no_import_of(where, forbidden):
    files = _files(where)
    assert files, f"{where}: no such module or package under {PACKAGE}"
    offending = sorted({f"{path.relative_to(PACKAGE)} imports {module}"
                        for path in files for module in imported_modules(path)
                        if _is_within(module, forbidden)})
    assert not offending, "\n".join(offending)


def test_the_library_never_imports_the_command_line():
    """Only ``lrcseg.cli`` (and ``python -m lrcseg``) import ``lrcseg.commands``; nothing but
    ``__main__`` imports ``lrcseg.cli``."""
    top = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}
    library = [path for path in _files(".")
               if path not in top and path.relative_to(PACKAGE).parts[0] != "commands"]
    offending = sorted({f"{path.relative_to(PACKAGE)} imports {module}"
                        for path in library for module in imported_modules(path)
                        if any(_is_within(module, m) for m in ("lrcseg.cli", "lrcseg.commands"))})
    assert not offending, "\n".join(offending)


def test_only_the_bridge_points_import_nnunet():
    offending = sorted({f"{path.relative_to(PACKAGE)} imports {module}"
                        for path in _files(".") if path.relative_to(PACKAGE).parts[0] != "nnunet"
                        for module in imported_modules(path)
                        if _is_within(module, "lrcseg.nnunet")
                        and not _is_within(module, NNUNET_IMPORTERS.get(
                            path.relative_to(PACKAGE).as_posix(), "lrcseg.nnunet.<none>"))})
    assert not offending, "\n".join(offending)


def test_nnunet_bridge_imports_without_nnunet_or_torch():
    """nnunetv2 is the optional extra ``[nnunet]``: the bridge's modules (but the export, which
    holds torch weights), the experiment's back-ends and its cells import without it and without
    torch; nnU-Net is imported where a network is built and in the child processes."""
    modules = sorted({"lrcseg.nnunet." + p.stem for p in _files("nnunet")
                      if p.stem not in ("__init__", "export")}
                     | {"lrcseg.nnunet", "lrcseg.experiment.backends", "lrcseg.experiment.cells"})
    code = ("import importlib, sys\n"
            "for blocked in ('torch', 'nnunetv2'): sys.modules[blocked] = None\n"
            f"for m in {modules!r}: importlib.import_module(m)\n")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]


def test_imported_modules_sees_every_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import lrcseg.train.common\nfrom lrcseg import train\n"
                     "def f():\n    from lrcseg.train.finetune import finetune\n"
                     "from ..train import pretrain\nfrom . import metrics\n")
    found = set(imported_modules(probe, package="lrcseg.evaluate"))
    assert {"lrcseg.train.common", "lrcseg.train", "lrcseg.train.finetune",
            "lrcseg.train.pretrain", "lrcseg.evaluate.metrics"} <= found


def test_inference_and_evaluation_load_no_training_module():
    """Transitively too: importing every evaluate/ and models/ module and the inference
    commands (and running their lazy imports' targets) leaves ``lrcseg.train`` unloaded."""
    modules = sorted({"lrcseg." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
                      for where in ("evaluate", "models") for p in _files(where)
                      if p.name != "__init__.py"}
                     | {f"lrcseg.commands.{c}" for c in ("predict", "evaluate", "probe", "export")}
                     | {m for c in ("predict", "evaluate", "probe", "export")
                        for m in imported_modules(PACKAGE / "commands" / f"{c}.py")
                        if m.startswith("lrcseg.") and not m.startswith("lrcseg.train")
                        and _is_module(m)})
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('lrcseg.train'))))\n")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "", f"training modules loaded: {out.stdout.strip()}"


def _is_module(name: str) -> bool:
    """True if ``name`` is an lrcseg module or package (not a name imported from one)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
