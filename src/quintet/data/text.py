"""Byte-level text corpora that need no download, cached as uint8 memmaps.

- :func:`stdlib_corpus`: the source of the running interpreter's Python standard library, gathered
  deterministically (sorted paths, test suites and site-packages left out), split by file.
- :func:`text_corpus`: any text file (last 5% of bytes for validation) or folder (split by file).
- :func:`enwik8_corpus`: a user-supplied ``enwik8`` file, with the 90M / 5M / 5M split of the paper.

Concatenated corpora are written once to ``$QUINTET_CACHE`` (default ``~/.cache/quintet``),
atomically, under a name that hashes what went into them; a single file is mapped in place.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quintet.core.io import atomic_write, cache_dir

VAL_EVERY = 20
"""in a folder corpus, every 20th file (sorted by path) goes to the validation split"""
VAL_FRACTION = 0.05
"""a single-file corpus keeps its last 5% of bytes for validation"""
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
FILE_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class ByteCorpus:
    """Train / validation (/ test) byte arrays of one corpus; ids are byte values 0..255."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray | None = None

    def split(self, split: str) -> np.ndarray:
        data = {"train": self.train, "val": self.val, "test": self.test}.get(split)
        if data is None:
            known = "train, val" + (", test" if self.test is not None else "")
            raise ValueError(f"split: {self.name} has no {split!r} split ({known})")
        return data

    def random_windows(self, split: str, *, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` windows of ``length`` bytes at random offsets drawn from ``generator``: ``(b, length)``."""
        data = self.split(split)
        if len(data) < length + 1:
            raise ValueError(f"length: {self.name}/{split} has {len(data)} bytes, fewer than a window of {length}")
        starts = torch.randint(0, len(data) - length + 1, (batch_size,), generator=generator).tolist()
        return torch.from_numpy(np.stack([data[s : s + length] for s in starts]).astype(np.int64))

    def eval_windows(self, split: str, *, length: int, max_windows: int) -> torch.Tensor:
        """Up to ``max_windows`` windows of ``length`` bytes spread evenly over ``split``: ``(w, length)``."""
        data = self.split(split)
        count = min(max_windows, len(data) // length)
        if count < 1:
            raise ValueError(f"length: {self.name}/{split} has {len(data)} bytes, fewer than a window of {length}")
        stride = (len(data) - length) // max(count - 1, 1)
        windows = np.stack([data[i * stride : i * stride + length] for i in range(count)])
        return torch.from_numpy(windows.astype(np.int64))


def decode(ids: torch.Tensor | Iterable[int]) -> str:
    """Bytes -> text, replacing invalid UTF-8 (a sample may end inside a multi-byte character)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(values).decode("utf-8", errors="replace")


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files in sorted order, without test suites and installed packages."""
    root = root or stdlib_root()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]  # prune: site-packages can be huge
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _is_text(path: Path) -> bool:
    with open(path, "rb") as handle:
        return b"\0" not in handle.read(8192)


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if path.is_file() and not hidden and _is_text(path):
            files.append(path)
    return files


def _write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)

    atomic_write(path, write)


def _map(path: Path, offset: int = 0, size: int | None = None) -> np.ndarray:
    if size == 0 or path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=None if size is None else (size,))


def _files_corpus(name: str, files: list[Path], key_parts: list[str], cache: Path | None) -> ByteCorpus:
    """Concatenate ``files`` into cached train/val memmaps, every ``VAL_EVERY``-th file to validation."""
    digest = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
    directory = cache or cache_dir()
    paths = {split: directory / f"{name}-{digest}.{split}.u8" for split in ("train", "val")}
    if not all(p.is_file() for p in paths.values()):
        splits = {"train": [], "val": []}
        for index, path in enumerate(files):
            splits["val" if index % VAL_EVERY == VAL_EVERY - 1 else "train"].append(path)
        for split, members in splits.items():
            _write_atomic(paths[split], (p.read_bytes() + FILE_SEPARATOR for p in members))
    return ByteCorpus(name, _map(paths["train"]), _map(paths["val"]))


def stdlib_corpus(*, cache: Path | None = None) -> ByteCorpus:
    """The running interpreter's standard library source (about 11 MB on CPython 3.11)."""
    return _stdlib_corpus(cache or cache_dir())


@functools.lru_cache(maxsize=4)
def _stdlib_corpus(cache: Path) -> ByteCorpus:
    root = stdlib_root()
    files = stdlib_files(root)
    if len(files) < VAL_EVERY:
        raise ValueError(f"stdlib: found only {len(files)} source files under {root}")
    key = [sys.version, str(root)] + [f"{p.relative_to(root).as_posix()}:{p.stat().st_size}" for p in files]
    return _files_corpus("stdlib", files, key, cache)


def text_corpus(path: str | os.PathLike, *, cache: Path | None = None) -> ByteCorpus:
    """A text file (last 5% for validation) or a folder of text files (every 20th file for validation)."""
    path = Path(path).expanduser()
    if path.is_file():
        size = path.stat().st_size
        val = int(size * VAL_FRACTION)
        if val < 1 or size - val < 1:
            raise ValueError(f"data: {path} has {size} bytes, too few to split into train and validation")
        return ByteCorpus(path.name, _map(path, 0, size - val), _map(path, size - val, val))
    if path.is_dir():
        files = _folder_files(path)
        if len(files) < VAL_EVERY:
            raise ValueError(f"data: {path} holds {len(files)} text files; a folder corpus needs at least {VAL_EVERY}")
        key = [str(path.resolve())]
        key += [f"{p.relative_to(path).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        return _files_corpus(path.name or "data", files, key, cache)
    raise ValueError(f"data: {path} is neither a file nor a folder")


def enwik8_corpus(path: str | os.PathLike) -> ByteCorpus:
    """The first 100M bytes of Wikipedia (``enwik8``), split 90M / 5M / 5M as in the paper."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "enwik8"
    if not path.is_file():
        raise ValueError(
            f"data: enwik8 file not found at {path} (download it from http://mattmahoney.net/dc/enwik8.zip)"
        )
    needed = sum(ENWIK8_SPLIT)
    if path.stat().st_size < needed:
        raise ValueError(f"data: {path} has {path.stat().st_size} bytes; enwik8 has {needed}")
    train, val, test = ENWIK8_SPLIT
    return ByteCorpus("enwik8", _map(path, 0, train), _map(path, train, val), _map(path, train + val, test))
