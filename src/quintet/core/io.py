"""The few file-system helpers every layer shares: atomic writes and the cache folder.

Used by ``quintet.core`` (configs, weights), ``quintet.data`` (cached corpora, episode stores,
image sets) and ``quintet.training`` (checkpoints, reports), so each is written once, here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where generated data is cached: ``$QUINTET_CACHE``, else ``~/.cache/quintet``."""
    return Path(os.environ.get("QUINTET_CACHE") or Path.home() / ".cache" / "quintet")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(temporary_path)`` beside ``path``, then rename it into place.

    A crash mid-write leaves either the old file or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def ensure_writable_dir(path: str | os.PathLike, name: str) -> Path:
    """Create ``path`` if needed and check a file can be written there; ValueError naming ``name`` if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".quintet-write-test"
        probe.write_text("ok", encoding="ascii")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{name}: cannot write to {path} ({reason})") from error
    return path


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or non-object file raises ``error`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
