"""Recorded episodes and their one on-disk store, shared by every system that learns from play.

An :class:`Episode` is one run of an environment; an :class:`EpisodeStore` is a folder of ``.npy``
arrays opened memory-mapped, so stores larger than memory train without loading:

- ``observations.npy (E + T, ...)``: every episode's observations, its final one included, in the
  dtype they came in (uint8 images stay uint8: 64 x 64 x 3 frames cost 12 KiB each);
- ``actions.npy (T, ...)`` (integer ids / bins or float values), ``rewards.npy (T,)`` float32,
  ``terminated.npy (T,)``, ``truncated.npy (T,)``: one row per transition;
- ``episode_starts.npy (E + 1,)``: transition offsets (episode ``e`` owns transitions
  ``starts[e]:starts[e + 1]`` and observation rows ``starts[e] + e ... starts[e + 1] + e``);
- ``<name>.npy (T, ...)``: per-step arrays an :class:`EpisodeSpec` derives when writing (the
  Q-Transformer's discounted returns-to-go);
- ``episode.<name>.npy (E, ...)``: per-episode attributes (a text embedding, an instruction string);
- ``meta.json``: format, shapes and dtypes, the spec's settings, the env id. Written last: its
  presence means the store is complete.

``terminated`` and ``truncated`` stay apart: a time-limit truncation is not the end of the world's
dynamics (Q-learning bootstraps through it), a termination is.

Writes are atomic per file (:func:`quintet.core.io.atomic_write`): a write first removes
``meta.json`` (a crash mid-write leaves no store rather than a mixed one), writes each array beside
its final name and renames it into place, then writes ``meta.json``. Readers that opened the old
store keep reading the old arrays (a renamed-over file stays mapped); a reader that opens while a
write is under way gets a clear error (no meta, or arrays that do not match it).

Fixed-length windows ("clips") of consecutive frames: :meth:`EpisodeStore.clip_starts` lists where a
clip may start. By default only clips that stay inside one episode; with ``pad=True`` also those that
run past an episode's end, whose missing frames / actions are zeros and ``mask`` False. A clip never
mixes two episodes.

Shape glossary: ``E`` episodes, ``T`` transitions (steps), ``b`` batch, ``k`` frames per clip.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quintet.core.io import atomic_write, atomic_write_text

META_FILE = "meta.json"
FORMAT = "quintet.episodes"
VERSION = 1
STEP_FIELDS = ("actions", "rewards", "terminated", "truncated")
"""the per-transition arrays every episode has (``observations`` has one row more)"""
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_RESERVED = frozenset({"observations", "episode_starts", *STEP_FIELDS})


# ---------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One recorded episode of ``T`` transitions.

    - ``observations (T + 1, ...)``: the final one included; any dtype (uint8 images are kept uint8);
    - ``actions (T, ...)``: integer ids / bins or float values, as the store should keep them;
    - ``rewards (T,)``; ``terminated (T,)`` / ``truncated (T,)``: only the last transition may end it;
    - ``attributes``: per-episode values, name -> a string, a number or an array of a fixed shape
      (an instruction, a text embedding, whether it succeeded). Names are lower-case identifiers.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.observations = np.asarray(self.observations)
        self.actions = np.asarray(self.actions)
        self.rewards = np.asarray(self.rewards)
        self.terminated = np.asarray(self.terminated, dtype=bool)
        self.truncated = np.asarray(self.truncated, dtype=bool)
        steps = len(self.rewards)
        if self.rewards.ndim != 1 or steps < 1:
            raise ValueError(f"rewards: expected (T,) with T >= 1 transitions, got shape {self.rewards.shape}")
        if not np.issubdtype(self.rewards.dtype, np.number) or np.issubdtype(self.rewards.dtype, np.complexfloating):
            raise TypeError(f"rewards: expected real numbers, got dtype {self.rewards.dtype}")
        if self.observations.ndim < 1 or len(self.observations) != steps + 1:
            raise ValueError(
                f"observations: expected T + 1 = {steps + 1} (final one included), got shape {self.observations.shape}"
            )
        if self.actions.ndim < 1 or len(self.actions) != steps:
            raise ValueError(f"actions: expected {steps} entries (one per transition), got shape {self.actions.shape}")
        if not (np.issubdtype(self.actions.dtype, np.integer) or np.issubdtype(self.actions.dtype, np.floating)):
            raise TypeError(f"actions: expected integer or float values, got dtype {self.actions.dtype}")
        for name in ("terminated", "truncated"):
            if getattr(self, name).shape != (steps,):
                raise ValueError(f"{name}: expected ({steps},) (one per transition), got {getattr(self, name).shape}")
        if np.any(self.terminated[:-1]) or np.any(self.truncated[:-1]):
            raise ValueError("terminated/truncated: only an episode's last transition can end it")
        if not isinstance(self.attributes, Mapping):
            raise TypeError(f"attributes: expected a dict name -> value, got {type(self.attributes).__name__}")
        for name in self.attributes:
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"attributes: names are lower-case identifiers, got {name!r}")
        self.attributes = dict(self.attributes)

    @property
    def length(self) -> int:
        return len(self.rewards)

    @property
    def raw_return(self) -> float:
        return float(np.sum(self.rewards))


class EpisodeSpec:
    """What a store's writer derives from and checks in every episode; subclass as a frozen dataclass.

    Its fields are saved in ``meta.json`` (``to_json``), so a reader rebuilds the very spec that wrote
    the store. The Q-Transformer's ``ReplaySpec`` checks action bins and derives returns-to-go.
    """

    def check(self, episode: Episode) -> None:
        """Raise ``ValueError`` (message starting with the field's name) if ``episode`` does not fit."""

    def step_arrays(self, episode: Episode) -> dict[str, np.ndarray]:
        """Arrays ``(T, ...)`` derived per transition, stored as ``<name>.npy``."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON: its dataclass fields (nested dataclasses as dicts) and its type name."""
        if not is_dataclass(self):
            raise TypeError(f"spec: {type(self).__name__} must be a dataclass to be saved in {META_FILE}")
        return {"type": type(self).__qualname__, **{f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}}


def _jsonable(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------- writing


def _attribute_array(values: list[Any], name: str) -> np.ndarray:
    arrays = [np.asarray(value) for value in values]
    first = arrays[0]
    for index, array in enumerate(arrays):
        if array.shape != first.shape or array.dtype.kind != first.dtype.kind:
            raise ValueError(
                f"episodes[{index}]: attribute {name!r} is {array.dtype} {array.shape}, episode 0's is "
                f"{first.dtype} {first.shape} (an attribute has one shape and kind in every episode)"
            )
    if first.dtype.kind not in "biufU":
        raise TypeError(f"episodes[0]: attribute {name!r} must be numbers, booleans or strings, got {first.dtype}")
    return np.stack(arrays)


def _check_episodes(episodes: Sequence[Episode], spec: EpisodeSpec | None) -> dict[str, list[np.ndarray]]:
    """Validate ``episodes`` against episode 0 and the spec; the spec's per-step arrays, per episode."""
    first = episodes[0]
    derived: dict[str, list[np.ndarray]] = {}
    for index, episode in enumerate(episodes):
        if not isinstance(episode, Episode):
            raise TypeError(f"episodes[{index}]: expected an Episode, got {type(episode).__name__}")
        for name in ("observations", "actions"):
            if getattr(episode, name).shape[1:] != getattr(first, name).shape[1:]:
                raise ValueError(
                    f"episodes[{index}]: {name} of shape (..., {getattr(episode, name).shape[1:]}) differ from "
                    f"episode 0's (..., {getattr(first, name).shape[1:]})"
                )
        if episode.observations.dtype.kind != first.observations.dtype.kind:
            raise ValueError(
                f"episodes[{index}]: observations are {episode.observations.dtype}, episode 0's "
                f"{first.observations.dtype}"
            )
        if set(episode.attributes) != set(first.attributes):
            raise ValueError(
                f"episodes[{index}]: attributes {sorted(episode.attributes)} differ from episode 0's "
                f"{sorted(first.attributes)} (every episode has the same ones)"
            )
        if spec is None:
            continue
        try:
            spec.check(episode)
            arrays = spec.step_arrays(episode)
        except ValueError as error:
            raise ValueError(f"episodes[{index}]: {error}") from error
        for name, array in arrays.items():
            if not _NAME.match(name) or name in _RESERVED:
                raise ValueError(f"spec: step array name {name!r} is not a free lower-case identifier")
            if len(array) != episode.length:
                raise ValueError(f"spec: step array {name!r} has {len(array)} rows for {episode.length} transitions")
            derived.setdefault(name, []).append(np.asarray(array))
    return derived


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # through a handle: np.save appends ".npy" to a bare path
        np.save(handle, array)


def _save_concatenated(path: Path, parts: Sequence[np.ndarray]) -> None:
    """``np.concatenate(parts)`` saved as ``.npy`` without building it in memory (filled part by part)."""
    dtype = np.result_type(*parts)
    rows = sum(len(part) for part in parts)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, *parts[0].shape[1:]))
    offset = 0
    for part in parts:
        out[offset : offset + len(part)] = part
        offset += len(part)
    out.flush()
    del out


def write_episodes(
    path: str | os.PathLike,
    episodes: Iterable[Episode],
    spec: EpisodeSpec | None = None,
    *,
    env_id: str | None = None,
) -> Path:
    """Write ``episodes`` as an episode store in the folder ``path``, replacing a store there.

    The one writer of recorded episodes: ``spec`` checks each episode and derives per-step arrays
    (``None``: store the episodes as they are). Everything that can fail is checked before the old
    store is touched. Returns ``path``; open it with :class:`EpisodeStore` (or a system's view).
    """
    episodes = list(episodes)
    if not episodes:
        raise ValueError("episodes: expected at least one episode")
    if spec is not None and not isinstance(spec, EpisodeSpec):
        raise TypeError(f"spec: expected an EpisodeSpec, got {type(spec).__name__}")
    if env_id is not None and not isinstance(env_id, str):
        raise TypeError(f"env_id: expected a string, got {type(env_id).__name__}")
    derived = _check_episodes(episodes, spec)
    attributes = {
        name: _attribute_array([e.attributes[name] for e in episodes], name) for name in sorted(episodes[0].attributes)
    }
    lengths = np.array([episode.length for episode in episodes], dtype=np.int64)
    step_parts = {
        "observations": [e.observations for e in episodes],
        "actions": [e.actions for e in episodes],
        "rewards": [e.rewards.astype(np.float32) for e in episodes],
        "terminated": [e.terminated for e in episodes],
        "truncated": [e.truncated for e in episodes],
        **derived,
    }
    files = {name: f"{name}.npy" for name in step_parts} | {"episode_starts": "episode_starts.npy"}
    files |= {f"episode.{name}": f"episode.{name}.npy" for name in attributes}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    previous = _stored_files(path)
    # from here on the folder holds no complete store until the new meta file lands
    (path / META_FILE).unlink(missing_ok=True)
    shapes: dict[str, dict[str, Any]] = {}
    for name, parts in step_parts.items():
        atomic_write(path / files[name], lambda tmp, parts=parts: _save_concatenated(tmp, parts))
        shapes[name] = {"shape": [sum(map(len, parts)), *parts[0].shape[1:]], "dtype": str(np.result_type(*parts))}
    small = {"episode_starts": np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)}
    small |= {f"episode.{name}": array for name, array in attributes.items()}
    for name, array in small.items():
        atomic_write(path / files[name], lambda tmp, array=array: _save_npy(tmp, array))
        shapes[name] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_episodes": len(episodes),
        "num_steps": int(lengths.sum()),
        "env_id": env_id,
        "arrays": {name: {"file": files[name], **shapes[name]} for name in files},
        "step_arrays": sorted(derived),
        "attributes": sorted(attributes),
        "spec": spec.to_json() if spec is not None else None,
    }
    atomic_write_text(path / META_FILE, json.dumps(meta, indent=2) + "\n")
    for stale in previous - set(files.values()):  # files only the old store had; their readers keep their maps
        (path / stale).unlink(missing_ok=True)
    return path


def _stored_files(path: Path) -> set[str]:
    """The array files of the store at ``path`` (none if there is no readable store of this format)."""
    try:
        names = {entry["file"] for entry in _read_meta(path)["arrays"].values()}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in names if isinstance(name, str) and _is_array_file(name)}


def _is_array_file(name: str) -> bool:
    """A plain ``.npy`` file name inside the store's folder (meta.json is data: never a path elsewhere)."""
    return name.endswith(".npy") and Path(name).name == name and not name.startswith(".")


def _read_meta(path: Path) -> dict[str, Any]:
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"path: {path} holds no {FORMAT} store ({META_FILE} without format {FORMAT!r}; a folder written "
            f"by an older quintet: write it again)"
        )
    if meta.get("version") != VERSION:
        raise ValueError(f"path: {path} is store version {meta.get('version')}, this quintet reads {VERSION}")
    return meta


# ---------------------------------------------------------------------------- reading


class EpisodeStore:
    """A memory-mapped episode store: random access to episodes, transitions and clips.

    Attributes: ``observations (E + T, ...)``, ``actions (T, ...)``, ``rewards (T,)``,
    ``terminated (T,)``, ``truncated (T,)`` (memory-mapped), ``episode_starts (E + 1,)``,
    ``step_arrays`` (name -> ``(T, ...)``), ``attributes`` (name -> ``(E, ...)``), ``meta``,
    ``env_id``, ``spec_json`` (the writer's spec as saved, or None).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / META_FILE).is_file():
            raise FileNotFoundError(
                f"path: {self.path} is not an episode store (no {META_FILE}: missing, or a write did not finish)"
            )
        self.meta = _read_meta(self.path)
        self._arrays = {name: self._load(name, entry) for name, entry in self.meta["arrays"].items()}
        self.observations = self._arrays["observations"]
        self.actions = self._arrays["actions"]
        self.rewards = self._arrays["rewards"]
        self.terminated = self._arrays["terminated"]
        self.truncated = self._arrays["truncated"]
        self.episode_starts = np.asarray(self._arrays["episode_starts"])
        self.step_arrays = {name: self._arrays[name] for name in self.meta["step_arrays"]}
        self.attributes = {name: self._arrays[f"episode.{name}"] for name in self.meta["attributes"]}
        self.env_id: str | None = self.meta["env_id"]
        self.spec_json: dict[str, Any] | None = self.meta["spec"]
        # first observation row of every episode, and one past the last episode's last row
        self._obs_starts = self.episode_starts + np.arange(len(self.episode_starts))

    def _load(self, name: str, entry: dict[str, Any]) -> np.ndarray:
        if not _is_array_file(entry["file"]):
            raise ValueError(f"path: {self.path / META_FILE} names {entry['file']!r} for {name}, not a .npy file here")
        array = np.load(self.path / entry["file"], mmap_mode="r")
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            raise ValueError(
                f"path: {self.path / entry['file']} is {array.dtype} {list(array.shape)}, {META_FILE} says "
                f"{entry['dtype']} {entry['shape']} (a write under way? open the store again)"
            )
        return array

    # -- sizes

    def __len__(self) -> int:
        """Transitions (steps) in the store."""
        return int(self.episode_starts[-1])

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Transitions per episode ``(E,)``; episode ``e`` has ``lengths[e] + 1`` observations."""
        return np.diff(self.episode_starts)

    def episode_returns(self) -> np.ndarray:
        """Undiscounted raw return of every episode ``(E,)``."""
        return np.add.reduceat(np.asarray(self.rewards, dtype=np.float64), self.episode_starts[:-1])

    def __repr__(self) -> str:
        return (
            f"EpisodeStore({str(self.path)!r}: {self.num_episodes} episodes, {len(self)} steps, observations "
            f"{self.observations.dtype} {self.observations.shape[1:]}, actions {self.actions.dtype} "
            f"{self.actions.shape[1:]})"
        )

    # -- episodes and transitions

    def _check_indices(self, indices: Any, name: str, high: int) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(f"{name}: expected a 1-D array of integers, got {indices.dtype} {indices.shape}")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= high):
            raise ValueError(f"{name}: expected values in [0, {high}), got [{indices.min()}, {indices.max()}]")
        return indices

    def episode(self, index: int) -> Episode:
        """Episode ``index`` (its arrays are views of the mapped files)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_episodes:
            raise ValueError(f"index: expected an episode in [0, {self.num_episodes}), got {index!r}")
        start, end = self.episode_starts[index], self.episode_starts[index + 1]
        return Episode(
            observations=np.asarray(self.observations[start + index : end + index + 1]),
            actions=np.asarray(self.actions[start:end]),
            rewards=np.asarray(self.rewards[start:end]),
            terminated=np.asarray(self.terminated[start:end]),
            truncated=np.asarray(self.truncated[start:end]),
            attributes={name: _scalar(values[index]) for name, values in self.attributes.items()},
        )

    def episodes(self) -> Iterable[Episode]:
        return (self.episode(index) for index in range(self.num_episodes))

    def episode_of(self, transitions: np.ndarray) -> np.ndarray:
        """The episode of each transition index."""
        return np.searchsorted(self.episode_starts, transitions, side="right") - 1

    def transitions(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Transitions ``indices (b,)`` -> ``observations``, ``next_observations``, ``actions``, ``rewards``,
        ``terminated``, ``truncated``, ``episode`` and the store's step arrays, each ``(b, ...)``."""
        indices = self._check_indices(indices, "indices", len(self))
        episode = self.episode_of(indices)
        batch = {
            "observations": np.asarray(self.observations[indices + episode]),
            "next_observations": np.asarray(self.observations[indices + episode + 1]),
            "episode": episode,
        }
        batch |= {name: np.asarray(getattr(self, name)[indices]) for name in STEP_FIELDS}
        batch |= {name: np.asarray(array[indices]) for name, array in self.step_arrays.items()}
        return batch

    # -- clips of consecutive frames

    def clip_starts(self, frames: int, *, pad: bool = False) -> np.ndarray:
        """Observation rows where a clip of ``frames`` consecutive frames may start.

        Default: only clips inside one episode (an episode shorter than ``frames`` gives none);
        ``pad=True``: every frame of every episode, the clip running past the episode's end masked.
        """
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
            raise ValueError(f"frames: expected an integer >= 1, got {frames!r}")
        counts = self.lengths + 1  # observations per episode
        per_episode = counts if pad else np.maximum(counts - frames + 1, 0)
        first = np.repeat(self._obs_starts[:-1], per_episode)
        within = np.arange(per_episode.sum()) - np.repeat(np.cumsum(per_episode) - per_episode, per_episode)
        return first + within

    def clips(self, starts: Sequence[int] | np.ndarray, frames: int) -> dict[str, np.ndarray]:
        """Clips of ``frames`` frames from observation rows ``starts (b,)``.

        Returns ``observations (b, k, ...)``, ``actions (b, k - 1, ...)`` and ``rewards (b, k - 1)``
        (action ``j`` leads from frame ``j`` to frame ``j + 1``), ``mask (b, k)`` (True on the
        episode's frames; action ``j`` is real where ``mask[:, j + 1]``), ``episode (b,)`` and
        ``step (b,)`` (the first frame's index inside its episode). Masked entries are zeros.
        """
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
            raise ValueError(f"frames: expected an integer >= 1, got {frames!r}")
        starts = self._check_indices(starts, "starts", len(self.observations))
        episode = np.searchsorted(self._obs_starts, starts, side="right") - 1
        last = self._obs_starts[episode + 1] - 1  # the episode's final observation row
        rows = starts[:, None] + np.arange(frames)
        mask = rows <= last[:, None]
        observations = _gather(self.observations, np.where(mask, rows, starts[:, None]), mask)
        action_rows = rows[:, :-1] - episode[:, None]  # the transition after frame j
        action_mask = mask[:, 1:]
        safe = np.where(action_mask, action_rows, 0)
        return {
            "observations": observations,
            "actions": _gather(self.actions, safe, action_mask),
            "rewards": _gather(self.rewards, safe, action_mask),
            "mask": mask,
            "episode": episode,
            "step": starts - self._obs_starts[episode],
        }

    def sample_clips(
        self, batch_size: int, frames: int, generator: np.random.Generator, *, pad: bool = False
    ) -> dict[str, np.ndarray]:
        """``batch_size`` clips drawn uniformly from :meth:`clip_starts` (a deterministic function of ``generator``)."""
        starts = self.clip_starts(frames, pad=pad)
        if not len(starts):
            raise ValueError(
                f"frames: no clip of {frames} frames fits inside an episode (the longest has "
                f"{int(self.lengths.max()) + 1} frames); use fewer frames or pad=True"
            )
        return self.clips(starts[generator.integers(0, len(starts), size=batch_size)], frames)


def _gather(array: np.ndarray, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``array[rows]`` for a 2-D index ``rows (b, k)``, zeros where ``mask`` is False."""
    values = np.asarray(array[rows.ravel()]).reshape(*rows.shape, *array.shape[1:])
    values[~mask] = 0
    return values


def _scalar(value: np.ndarray) -> Any:
    """A per-episode attribute as it was given: 0-d arrays back to Python str / int / float / bool."""
    return value.item() if value.ndim == 0 else np.asarray(value)
