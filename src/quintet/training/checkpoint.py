"""Training checkpoints: one folder per saved step, written atomically, and a ``latest`` pointer.

Layout of a run folder::

    RUN/checkpoints/latest                 name of the latest complete checkpoint (one line)
    RUN/checkpoints/step_00000500/
        model/config.json, model.safetensors     the weights (``save_pretrained``)
        ema/config.json, model.safetensors       the EMA weights, when the run keeps an EMA
        trainer_state.pt                         optimizer, scheduler, RNG, step, data position, config
        run_config.json                          the run's config (system, preset, settings) as JSON

A run sharded with FSDP writes a *sharded* checkpoint instead: every rank writes its own shard of the
weights, the EMA and the optimizer state with ``torch.distributed.checkpoint`` into ``sharded/`` (no
rank ever holds the whole model), ``model/`` keeps only ``config.json``, and ``trainer_state.pt``
the rest. Such a checkpoint loads on any number of processes, and whole on one (``sample``, ``eval``,
``export``: :func:`load_checkpoint_model`).

A checkpoint is written into a hidden staging folder and renamed into place; only then does
``latest`` move to it (``os.replace`` of a one-line file), and only then are checkpoints beyond the
newest ``keep`` deleted. A crash at any moment leaves ``latest`` naming a complete checkpoint.
``trainer_state.pt`` holds plain dicts, lists, numbers and tensors, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quintet.core.config import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write_text,
    config_class_tag,
    load_config,
    load_weights,
)
from quintet.core.io import read_json

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"
RUN_CONFIG_FILE = "run_config.json"
MODEL_DIR = "model"
EMA_DIR = "ema"
SHARDED_DIR = "sharded"
FORMAT_VERSION = 1

_NAME = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def check_plain(value: Any, name: str) -> None:
    """Raise TypeError unless ``value`` is JSON-like data (dict / list / tuple / str / number / bool / None)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_plain(item, f"{name}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{name}: keys must be strings, got {key!r}")
            check_plain(item, f"{name}[{key!r}]")
        return
    raise TypeError(f"{name}: expected plain data (dict, list, str, number, bool, None), got {type(value).__name__}")


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, or None when the folder holds no complete checkpoint."""
    pointer = Path(checkpoints_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _NAME.match(name):
        raise CheckpointError(f"{pointer}: does not name a checkpoint (got {name[:40]!r})")
    path = pointer.parent / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: names {name}, which does not exist")
    return path


def staging_dir(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place (the same on every rank)."""
    return Path(checkpoints_dir) / f"{_TMP_PREFIX}{checkpoint_name(step)}"


def begin_checkpoint(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    """Create the empty staging folder of checkpoint ``step`` (clearing what a crashed write left)."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    for leftover in checkpoints_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    name = checkpoint_name(step)
    current = latest_checkpoint(checkpoints_dir)
    if current is not None and current.name == name:
        raise ValueError(f"step: checkpoint {name} is already the latest; it is not rewritten in place")
    staging = staging_dir(checkpoints_dir, step)
    staging.mkdir()
    return staging


def commit_checkpoint(checkpoints_dir: str | os.PathLike, step: int, *, keep: int = 2) -> Path:
    """Rename the complete staging folder into place, point ``latest`` at it, then prune old ones."""
    checkpoints_dir = Path(checkpoints_dir)
    name = checkpoint_name(step)
    target = checkpoints_dir / name
    if target.exists():
        # a complete checkpoint that never became the latest (the run crashed right after writing it)
        shutil.rmtree(target)
    os.rename(staging_dir(checkpoints_dir, step), target)
    atomic_write_text(checkpoints_dir / LATEST_FILE, name + "\n")
    _prune(checkpoints_dir, keep=keep, latest=name)
    return target


def write_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    *,
    models: dict[str, nn.Module],
    state: dict[str, Any],
    run_config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and make it the latest; keep the ``keep`` newest ones.

    ``models`` maps a sub-folder (``model``, ``ema``) to a module with ``save_pretrained``.
    """
    staging = begin_checkpoint(checkpoints_dir, step)
    try:
        for folder, module in models.items():
            module.save_pretrained(staging / folder)
        write_checkpoint_files(staging, state=state, run_config=run_config)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return commit_checkpoint(checkpoints_dir, step, keep=keep)


def write_checkpoint_files(folder: Path, *, state: dict[str, Any], run_config: dict[str, Any]) -> None:
    """The trainer state and the run config, into a staging folder."""
    torch.save(state, folder / STATE_FILE)
    atomic_write_text(folder / RUN_CONFIG_FILE, json.dumps(run_config, indent=2, sort_keys=True) + "\n")


def _prune(checkpoints_dir: Path, *, keep: int, latest: str) -> None:
    named = sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and _NAME.match(p.name))
    for old in named[: max(0, len(named) - keep)]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a run folder, its ``checkpoints/`` folder, or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a run folder or a checkpoint folder)")
    if (path / STATE_FILE).is_file() or (path / MODEL_DIR / CONFIG_FILE).is_file():
        return path
    for checkpoints_dir in (path / CHECKPOINTS_DIR, path):
        found = latest_checkpoint(checkpoints_dir)
        if found is not None:
            return found
    raise CheckpointError(
        f"{path}: holds no checkpoint (expected {CHECKPOINTS_DIR}/{LATEST_FILE} or {MODEL_DIR}/{CONFIG_FILE})"
    )


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.pt`` (``torch.load(weights_only=True)``, on the CPU)."""
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: trainer state not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt or unreadable trainer state ({_first_line(error)})") from error
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a quintet trainer state (format {FORMAT_VERSION})")
    return state


def read_run_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(checkpoint_dir) / RUN_CONFIG_FILE, CheckpointError)


def load_checkpoint_model(
    loader: Any, path: str | os.PathLike, *, ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Path, str]:
    """Load the weights of a checkpoint (run folder or checkpoint folder), full or sharded, whole.

    ``loader`` is a model class (``from_pretrained``) or a system (``load_model``, which picks the class
    by the checkpoint's config tag). Returns ``(model, checkpoint_dir, which)`` where ``which`` is
    ``"ema"`` when the EMA weights were used (``ema=True`` and the run kept an EMA), else ``"model"``.
    """
    checkpoint_dir = resolve_checkpoint(path)
    load = getattr(loader, "load_model", None) or loader.from_pretrained
    if is_sharded_checkpoint(checkpoint_dir):
        keys = sharded_keys(checkpoint_dir)
        which = EMA_DIR if ema and EMA_DIR in keys else MODEL_DIR
        model_class = (
            loader.model_class(config_class_tag(checkpoint_dir / MODEL_DIR))
            if hasattr(loader, "model_class")
            else loader
        )
        config = load_config(model_class.config_class, checkpoint_dir / MODEL_DIR / CONFIG_FILE)
        model = model_class(config)
        load_sharded_module(model, checkpoint_dir, which)
        return model.to(map_location).eval(), checkpoint_dir, which
    which = EMA_DIR if ema and (checkpoint_dir / EMA_DIR / WEIGHTS_FILE).is_file() else MODEL_DIR
    model = load(checkpoint_dir / which, map_location=map_location)
    return model, checkpoint_dir, which


def is_sharded_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / SHARDED_DIR).is_dir()


def sharded_keys(checkpoint_dir: Path) -> set[str]:
    """The top-level entries (``model``, ``ema``, ``optimizer``) a sharded checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        metadata = FileSystemReader(str(checkpoint_dir / SHARDED_DIR)).read_metadata()
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, CheckpointException) as error:
        where = checkpoint_dir / SHARDED_DIR
        raise CheckpointError(f"{where}: unreadable sharded checkpoint ({_first_line(error)})") from error
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def load_sharded_module(module: nn.Module, checkpoint_dir: Path, which: str) -> None:
    """Load entry ``which`` (``model`` / ``ema``) of a sharded checkpoint into a whole ``module``, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = {which: module.state_dict()}
    try:
        with warnings.catch_warnings():  # "loading in a single process" is what this function is for
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(checkpoint_dir / SHARDED_DIR), no_dist=True)
    except (OSError, RuntimeError, ValueError, KeyError, CheckpointException) as error:
        where = checkpoint_dir / SHARDED_DIR
        raise CheckpointError(f"{where}: does not load into the model ({_first_line(error)})") from error
    module.load_state_dict(state[which])


def load_module_weights(module: nn.Module, folder: Path, *, map_location: str | torch.device) -> None:
    """Strictly load ``folder/model.safetensors`` into ``module`` (config checked when it has one)."""
    config = getattr(module, "config", None)
    if config is not None and (folder / CONFIG_FILE).is_file():
        saved = load_config(type(config), folder / CONFIG_FILE)
        if saved != config:
            raise CheckpointError(
                f"{folder / CONFIG_FILE}: the checkpoint's model config differs from this run's "
                "(resume with the preset and options it was trained with)"
            )
    load_weights(module, folder / WEIGHTS_FILE, map_location=map_location)


def dir_bytes(folder: str | os.PathLike) -> int:
    """Bytes of every file under ``folder``."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
