"""Recorded play for Genie: the embedded game and its recording policy, token caches and batches.

The embedded default is Atari Boxing (ale-py ships the ROM): the player's white boxer is a large,
high-contrast sprite on a plain ring, every one of the 18 actions moves it (or throws a punch), and
an episode lasts two game minutes whatever the policy does. Frames are cropped to the ring (the
clock and scores above it change on their own) and downscaled to 64 x 64. The recording policy
holds each uniformly random action for a step or two (geometric, mean ``hold_steps``): long enough
that the boxer travels visibly under one action, short enough that the past motion does not give the
next action away (held for 6 steps on average, a model could continue the motion it saw and ignore
the action: measured ``delta_psnr`` 0.03 to 0.64 dB between runs; held for 2, 0.44 / 0.45 with two
seeds). A model that ignores actions cannot place the boxer, which is what makes the
controllability number (``delta_psnr``) measurable.

Recordings go to the one episode store (:mod:`quintet.data.episodes`), cached under
``quintet.data.cache_dir()/genie`` by a hash of the recording settings, and are made on first use.

Shape glossary: ``N`` stored frames (observation rows), ``T`` transitions, ``b`` batch, ``t`` frames
per clip, ``c``/``h``/``w`` image channels/height/width, ``r``/``s`` token rows/columns.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from quintet.core.validation import check_int, check_number
from quintet.data import EpisodeStore, cache_dir

RECORDING_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class GameRecording:
    """How the embedded game is recorded (the cache key of the recording)."""

    env_id: str = "ALE/Boxing-v5"
    crop: tuple[int, int, int, int] | None = (30, 184, 24, 136)
    """(top, bottom, left, right) pixel bounds kept from the raw frame (Boxing: the ring); None keeps all"""
    frame_size: int = 64
    episodes: int = 6
    max_steps: int = 1000
    """transitions per episode at most"""
    hold_steps: float = 2.0
    """mean number of steps the recording policy holds an action"""
    actions: tuple[int, ...] | None = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    """the action ids the recording policy plays (None: all). Boxing: NOOP, FIRE and the eight directions;
    its direction+fire actions punch while standing still, which moves few pixels"""
    frameskip: int = 4
    repeat_action_probability: float = 0.0
    """ALE's sticky actions; 0 so that the recorded action is the one that acted"""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("frame_size", "episodes", "max_steps", "frameskip"):
            check_int(getattr(self, name), name)
        check_int(self.seed, "seed", minimum=0)
        check_number(self.hold_steps, "hold_steps", low=1.0)
        check_number(self.repeat_action_probability, "repeat_action_probability", low=0.0, high=1.0)
        if self.actions is not None:
            if not isinstance(self.actions, tuple) or not self.actions:
                raise ValueError(f"actions: expected a non-empty tuple of action ids or None, got {self.actions!r}")
            for action in self.actions:
                check_int(action, "actions", minimum=0)
        if self.crop is not None:
            if not isinstance(self.crop, tuple) or len(self.crop) != 4:
                raise ValueError(f"crop: expected (top, bottom, left, right), got {self.crop!r}")
            top, bottom, left, right = self.crop
            if not (0 <= top < bottom and 0 <= left < right):
                raise ValueError(f"crop: expected 0 <= top < bottom and 0 <= left < right, got {self.crop!r}")

    @property
    def path(self) -> Path:
        """Where this recording is cached."""
        key = json.dumps({"version": RECORDING_VERSION, **asdict(self)}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        slug = self.env_id.replace("/", "-").lower()
        return cache_dir() / "genie" / f"{slug}-{self.frame_size}px-{digest}"


class HeldRandomPolicy:
    """Uniform random actions (of ``choices``, default all), each held for a geometric number of steps
    (mean ``hold_steps``).

    A policy for :func:`quintet.data.record`: ``policy(observations (k, ...)) -> actions (k,)``, one row
    per env stepped in lockstep; reproducible from ``seed``.
    """

    def __init__(self, num_actions: int, hold_steps: float, seed: int = 0, choices: tuple[int, ...] | None = None):
        check_int(num_actions, "num_actions")
        check_number(hold_steps, "hold_steps", low=1.0)
        self.choices = np.arange(num_actions) if choices is None else np.asarray(choices)
        if self.choices.min() < 0 or self.choices.max() >= num_actions:
            raise ValueError(f"choices: action ids must lie in [0, {num_actions}), got {tuple(choices)}")
        self.switch = 1.0 / hold_steps
        self.rng = np.random.default_rng(seed)
        self.current: np.ndarray | None = None

    def _draw(self, rows: int) -> np.ndarray:
        return self.choices[self.rng.integers(0, len(self.choices), rows)]

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        rows = len(observations)
        if self.current is None or len(self.current) != rows:
            self.current = self._draw(rows)
        switch = self.rng.random(rows) < self.switch
        self.current = np.where(switch, self._draw(rows), self.current)
        return self.current.copy()


def make_game_env(recording: GameRecording, *, render_mode: str | None = None):
    """The recorded game's env, with the crop applied to its observations (RGB ``(h, w, 3)`` uint8)."""
    import gymnasium as gym
    from gymnasium.wrappers import TransformObservation

    from quintet.data import make_env

    kwargs = dict(render_mode=render_mode)
    if recording.env_id.startswith("ALE/"):
        kwargs |= dict(frameskip=recording.frameskip, repeat_action_probability=recording.repeat_action_probability)
    env = make_env(recording.env_id, 1, **kwargs)[0]
    if recording.crop is None:
        return env
    top, bottom, left, right = recording.crop
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3):
        raise ValueError(f"crop: {recording.env_id} observations are not RGB frames ({space}); use crop=None")
    if bottom > space.shape[0] or right > space.shape[1]:
        raise ValueError(f"crop: {recording.crop} exceeds the {space.shape[0]} x {space.shape[1]} frames")
    cropped = gym.spaces.Box(0, 255, (bottom - top, right - left, 3), np.uint8)
    return TransformObservation(env, lambda frame: np.ascontiguousarray(frame[top:bottom, left:right]), cropped)


def record_game(recording: GameRecording, path: str | Path | None = None) -> EpisodeStore:
    """Play and store the game as ``recording`` says (at ``path``, default its cache folder)."""
    from quintet.data import record

    env = make_game_env(recording)
    policy = HeldRandomPolicy(int(env.action_space.n), recording.hold_steps, recording.seed, recording.actions)
    return record(
        env,
        recording.path if path is None else path,
        recording.episodes,
        policy=policy,
        size=recording.frame_size,
        seed=recording.seed,
        max_steps=recording.max_steps,
    )


def load_recording(recording: GameRecording, data: str | None = None) -> EpisodeStore:
    """The store at ``data`` (e.g. written by ``quintet record``), else the cached embedded recording,
    recorded now if it is not there yet."""
    if data is not None:
        return EpisodeStore(data)
    try:
        return EpisodeStore(recording.path)
    except (FileNotFoundError, ValueError):
        return record_game(recording)


def action_meanings(recording: GameRecording) -> list[str] | None:
    """The game's names of its actions (ALE: ``NOOP``, ``FIRE``, ``UP``, ...), or None."""
    env = make_game_env(recording)
    try:
        meanings = getattr(env.unwrapped, "get_action_meanings", None)
        return list(meanings()) if meanings is not None else None
    finally:
        env.close()


class Recorded:
    """An episode store split by episode into training and validation, with clip sampling.

    ``frames(rows)`` reads uint8 frames; ``clip_rows(...)`` gives observation rows of clips that stay
    inside one episode; ``transition_rows(rows)`` maps a clip's frame rows to its action rows.
    """

    def __init__(self, store: EpisodeStore, val_episodes: int):
        check_int(val_episodes, "val_episodes")
        if store.num_episodes <= val_episodes:
            raise ValueError(
                f"val_episodes: the store has {store.num_episodes} episodes; keep at least one for training"
            )
        self.store = store
        self.obs_starts = store.episode_starts + np.arange(store.num_episodes + 1)
        self.train_episodes = np.arange(store.num_episodes - val_episodes)
        self.val_episodes = np.arange(store.num_episodes - val_episodes, store.num_episodes)
        # integer action ids (or key sets) only: continuous actions cannot index an action embedding
        self.discrete = np.issubdtype(store.actions.dtype, np.integer)

    def clip_starts(self, frames: int, split: str) -> np.ndarray:
        """Observation rows where a clip of ``frames`` frames inside one episode of ``split`` may start."""
        episodes = self.train_episodes if split == "train" else self.val_episodes
        starts = self.store.clip_starts(frames)
        owner = np.searchsorted(self.obs_starts, starts, side="right") - 1
        starts = starts[np.isin(owner, episodes)]
        if not len(starts):
            raise ValueError(f"frames: no {split} episode holds a clip of {frames} frames")
        return starts

    def longest(self, split: str) -> int:
        """Frames of the longest episode of ``split``."""
        episodes = self.train_episodes if split == "train" else self.val_episodes
        return int(self.store.lengths[episodes].max()) + 1

    def rows(self, starts: np.ndarray, frames: int) -> np.ndarray:
        return np.asarray(starts)[:, None] + np.arange(frames)

    def frames(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 frames ``(*rows.shape, c, h, w)``."""
        rows = np.asarray(rows)
        values = np.asarray(self.store.observations[rows.ravel()])
        return torch.from_numpy(values.reshape(*rows.shape, *values.shape[1:]))

    def transition_rows(self, rows: np.ndarray) -> np.ndarray:
        """Action rows of the transitions between consecutive frame ``rows (b, t)`` -> ``(b, t - 1)``."""
        episode = np.searchsorted(self.obs_starts, rows[:, :1], side="right") - 1
        return rows[:, :-1] - episode

    def actions(self, rows: np.ndarray) -> torch.Tensor:
        """Stored actions between the frames ``rows (b, t)`` -> ``(b, t - 1[, K])`` int64."""
        transitions = self.transition_rows(rows)
        values = np.asarray(self.store.actions[transitions.ravel()])
        return torch.from_numpy(values.reshape(*transitions.shape, *values.shape[1:]).astype(np.int64))


def sample_starts(starts: np.ndarray, count: int, seed: int, index: int) -> np.ndarray:
    """``count`` clip starts drawn from ``starts``: a deterministic function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    return starts[rng.integers(0, len(starts), size=count)]


def spread_starts(starts: np.ndarray, count: int) -> np.ndarray:
    """``count`` starts evenly spread over ``starts`` (a fixed evaluation set)."""
    return starts[np.linspace(0, len(starts) - 1, num=min(count, len(starts))).round().astype(int)]


@torch.no_grad()
def tokenize_rows(tokenizer, recorded: Recorded, *, batch_size: int = 256) -> torch.Tensor:
    """Tokens ``(N, r, s)`` of every stored frame, by observation row.

    Frames are encoded one episode at a time in chunks; with temporal convolutions each chunk also
    reads the ``k - 1`` frames before it, so the tokens equal encoding the whole episode at once.
    """
    device = next(tokenizer.parameters()).device
    config = tokenizer.config
    overlap = config.temporal_kernel - 1 if config.temporal_convs else 0
    out = torch.empty(len(recorded.store.observations), *config.token_grid, dtype=torch.long)
    for episode in range(recorded.store.num_episodes):
        first, end = int(recorded.obs_starts[episode]), int(recorded.obs_starts[episode + 1])
        for start in range(first, end, batch_size):
            stop = min(start + batch_size, end)
            lead = max(first, start - overlap)
            frames = recorded.frames(np.arange(lead, stop)).to(device)
            if overlap:
                tokens = tokenizer.encode(frames[None])[0]
            else:  # frames are independent: a batch of one-frame clips
                tokens = tokenizer.encode(frames[:, None])[:, 0]
            out[start:stop] = tokens[start - lead :].cpu()
    return out
