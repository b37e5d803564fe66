"""Atomic checkpoints: a run can be killed at any instant and resumed from its folder.

``checkpoint.pt`` is always the latest complete checkpoint (written to a temporary name, then
renamed). ``final.pt`` is written once at the end of a run.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from lrcseg.errors import ConfigError, LrcsegError
from lrcseg.io_utils import atomic_save, atomic_torch_save

LATEST = "checkpoint.pt"
FINAL = "final.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any], final: bool = False) -> Path:
    """Write ``state`` atomically as the latest checkpoint (and as final.pt if ``final``).

    The final state is stored once: checkpoint.pt becomes a hard link to final.pt (a copy
    where the file system has no hard links), so a finished run does not hold two copies of
    the weights and optimizer state.
    """
    target = Path(run_dir) / (FINAL if final else LATEST)
    atomic_torch_save(target, state)
    if final:
        def link(tmp: Path) -> None:
            tmp.unlink()  # the placeholder atomic_save made
            try:
                os.link(target, tmp)
            except OSError:
                with open(tmp, "wb") as fh:
                    torch.save(state, fh)

        atomic_save(Path(run_dir) / LATEST, link)
    return target


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; a clear error if it is unreadable.

    Checkpoints of an older lrcseg are upgraded in memory (``upgrade_checkpoint``).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise LrcsegError(f"{path}: cannot read checkpoint: {exc}") from exc
    return upgrade_checkpoint(state) if isinstance(state, dict) else state


def upgrade_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """Today's keys for a checkpoint of an older lrcseg.

    Before multi-level LRC: the model config's ``local_level`` becomes ``local_levels`` and
    the pre-training network's ``local_head.*`` weights become ``local_heads.0.*``. Before
    ``lrcseg.methods``: MoCo's and BYOL's state was nested in a loss module, so their
    "global_objective" keys ``moco.*`` / ``byol.*`` (``moco.queue.keys``,
    ``byol.target_encoder...``) lose that prefix (``queue.keys``, ``target_encoder...``).
    """
    from lrcseg.config import upgrade_model_dict

    config = state.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        config["model"] = upgrade_model_dict(config["model"])
    if isinstance(state.get("model_config"), dict):
        state["model_config"] = upgrade_model_dict(state["model_config"])
    network = state.get("network")
    if isinstance(network, dict) and any(k.startswith("local_head.") for k in network):
        state["network"] = {("local_heads.0." + k[len("local_head."):]
                             if k.startswith("local_head.") else k): v for k, v in network.items()}
    method = config.get("method") if isinstance(config, dict) else None
    objective = state.get("global_objective")
    if (method in ("moco", "byol") and isinstance(objective, dict) and objective
            and all(k.startswith(f"{method}.") for k in objective)):
        state["global_objective"] = _strip_prefix(objective, method)
    return state


def _strip_prefix(module_state: dict[str, Any], name: str) -> OrderedDict[str, Any]:
    """The state dict of submodule ``name`` from its parent's ``module_state`` (all keys under
    ``name.``), with the per-module metadata ``load_state_dict`` reads (versions) kept."""
    prefix = f"{name}."
    inner = OrderedDict((k[len(prefix):], v) for k, v in module_state.items())
    metadata = getattr(module_state, "_metadata", None)
    if metadata is not None:
        inner._metadata = OrderedDict(
            ("" if k == name else k[len(prefix):], v) for k, v in metadata.items()
            if k == name or k.startswith(prefix))
    return inner


def find_checkpoint(run_dir: Path, prefer_final: bool = True) -> Path | None:
    """The final checkpoint if present (and preferred), else the latest, else None."""
    run_dir = Path(run_dir)
    names = [FINAL, LATEST] if prefer_final else [LATEST]
    for name in names:
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def resolve_checkpoint(path: str | Path, what: str) -> Path:
    """A run folder's checkpoint (final.pt, else checkpoint.pt), or ``path`` itself if a file.

    what: the kind of run expected, for the error message ("pre-training run", ...).
    """
    path = Path(path)
    if path.is_dir():
        found = find_checkpoint(path)
        if found is None:
            raise ConfigError(f"{path}: not a {what} folder (no final.pt or checkpoint.pt)")
        return found
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} folder or checkpoint file")
    return path


def load_pretrain_network(path: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(PretrainNetwork with the checkpoint's weights, its PretrainConfig, the checkpoint) of a
    pre-training run folder or checkpoint file; ConfigError if it is not a pre-training one."""
    from lrcseg.config import PretrainConfig, from_dict
    from lrcseg.models.pretrain_net import PretrainNetwork

    ckpt = resolve_checkpoint(path, "pre-training run")
    state = load_checkpoint(ckpt)
    if state.get("kind") != "pretrain":
        raise ConfigError(f"{ckpt}: not a pre-training checkpoint (kind={state.get('kind')})")
    cfg = from_dict(PretrainConfig, state["config"])
    net = PretrainNetwork(cfg.model, cfg.preprocess.in_channels)
    net.load_state_dict(state["network"])
    state["path"] = str(ckpt)
    return net, cfg, state
