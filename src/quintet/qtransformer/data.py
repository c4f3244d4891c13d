"""Logged episodes for offline RL: an on-disk replay dataset, collection from gymnasium, Minari I/O.

A :class:`ReplayDataset` is a folder of ``.npy`` arrays opened memory-mapped, so datasets larger than
memory train without loading:

- ``observations (E + T, ...)``: every episode's observations, its final one included;
- ``actions (T, d)`` (bins), ``rewards (T,)`` (raw), ``terminated (T,)``, ``truncated (T,)``,
  ``returns_to_go (T,)`` (discounted, of the scaled rewards);
- ``episode_starts (E + 1,)``: transition offsets; ``text_embeds (E, e)`` optional, one per episode;
- ``meta.json``: shapes, the action discretiser, the reward scaler and the discount.

``terminated`` and ``truncated`` stay apart: a time-limit truncation is bootstrapped, a termination
is not.

Shape glossary: ``E`` episodes, ``T`` transitions, ``b`` batch, ``f`` frames, ``d`` action
dimensions, ``n`` n-step horizon, ``e`` text-embedding dim.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quintet.core.config import atomic_write, atomic_write_text
from quintet.data import cache_dir

META_FILE = "meta.json"


# ---------------------------------------------------------------------------- actions and rewards


@dataclass(frozen=True)
class ActionDiscretiser:
    """Maps environment actions to bins per dimension and back.

    A ``Box`` of ``d`` dimensions becomes ``d`` dimensions of ``bins`` evenly spaced values from
    ``low`` to ``high`` (both included); a ``Discrete(k)`` is one dimension of ``k`` bins.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    bins: int
    discrete: bool = False

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high) or not self.low:
            raise ValueError(f"low/high: expected equal non-empty lengths, got {len(self.low)} and {len(self.high)}")
        if self.bins < 2:
            raise ValueError(f"bins: expected >= 2, got {self.bins}")
        if any(not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) for lo, hi in zip(self.low, self.high)):
            raise ValueError(f"low/high: expected finite low < high per dimension, got {self.low} / {self.high}")

    @classmethod
    def from_space(cls, space: Any, bins: int | None = None) -> ActionDiscretiser:
        """From a gymnasium ``Discrete`` or bounded ``Box`` space (``bins`` needed for a Box)."""
        from gymnasium import spaces

        if isinstance(space, spaces.Discrete):
            return cls(low=(0.0,), high=(float(space.n - 1),), bins=int(space.n), discrete=True)
        if isinstance(space, spaces.Box):
            if bins is None:
                raise ValueError("bins: required to discretise a Box action space")
            return cls(low=tuple(map(float, space.low.ravel())), high=tuple(map(float, space.high.ravel())), bins=bins)
        raise TypeError(f"space: expected a Discrete or Box action space, got {type(space).__name__}")

    @property
    def num_actions(self) -> int:
        return len(self.low)

    def to_bins(self, actions: np.ndarray) -> np.ndarray:
        """Environment actions ``(..., d)`` (``(...)`` for Discrete) -> nearest bins ``(..., d)`` int64."""
        actions = np.asarray(actions, dtype=np.float64)
        if self.discrete:
            return np.rint(actions).astype(np.int64).reshape(*actions.shape, 1)
        low, high = np.asarray(self.low), np.asarray(self.high)
        if actions.shape[-1:] != (self.num_actions,):
            raise ValueError(f"actions: expected (..., {self.num_actions}), got shape {actions.shape}")
        unit = (np.clip(actions, low, high) - low) / (high - low)
        return np.rint(unit * (self.bins - 1)).astype(np.int64)

    def from_bins(self, bins: np.ndarray) -> np.ndarray:
        """Bins ``(..., d)`` -> environment actions (``int`` for Discrete, float32 values for a Box)."""
        bins = np.asarray(bins)
        if bins.shape[-1:] != (self.num_actions,):
            raise ValueError(f"bins: expected (..., {self.num_actions}), got shape {bins.shape}")
        if bins.size and (bins.min() < 0 or bins.max() >= self.bins):
            raise ValueError(f"bins: expected values in [0, {self.bins}), got [{bins.min()}, {bins.max()}]")
        if self.discrete:
            return bins[..., 0].astype(np.int64)
        low, high = np.asarray(self.low), np.asarray(self.high)
        return (low + bins / (self.bins - 1) * (high - low)).astype(np.float32)


@dataclass(frozen=True)
class RewardScaler:
    """Affine map of raw rewards in ``[low, high]`` onto ``[0, scale]`` (clipped).

    Q-values are sigmoids in [0, 1]. Sparse success rewards need ``scale=1``; dense rewards use
    :meth:`for_discount`, ``scale = 1 - gamma``, so that every discounted return lies in [0, 1].
    """

    low: float
    high: float
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"low/high: expected low < high, got {self.low} / {self.high}")
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale: expected a value in (0, 1], got {self.scale}")

    @classmethod
    def for_discount(cls, low: float, high: float, gamma: float) -> RewardScaler:
        return cls(low=low, high=high, scale=1.0 - gamma)

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        return (np.clip(rewards, self.low, self.high) - self.low) / (self.high - self.low) * self.scale


# ---------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One logged episode: ``observations (T + 1, ...)`` (the final one included), ``actions (T, d)``
    bins, ``rewards (T,)``, ``terminated (T,)``, ``truncated (T,)``, optional ``text_embed (e,)``."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    text_embed: np.ndarray | None = None

    def __post_init__(self) -> None:
        steps = len(self.rewards)
        if steps < 1:
            raise ValueError("episode: needs at least one transition")
        if len(self.observations) != steps + 1:
            raise ValueError(
                f"observations: expected T + 1 = {steps + 1} (final one included), got {len(self.observations)}"
            )
        for name in ("actions", "terminated", "truncated"):
            if len(getattr(self, name)) != steps:
                raise ValueError(
                    f"{name}: expected {steps} entries (one per transition), got {len(getattr(self, name))}"
                )
        if np.asarray(self.actions).ndim != 2:
            raise ValueError(f"actions: expected bins (T, d), got shape {np.shape(self.actions)}")
        if np.any(self.terminated[:-1]) or np.any(self.truncated[:-1]):
            raise ValueError("terminated/truncated: only an episode's last transition can end it")

    @property
    def length(self) -> int:
        return len(self.rewards)

    @property
    def raw_return(self) -> float:
        return float(np.sum(self.rewards))


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Monte-Carlo return-to-go ``G_t = r_t + gamma G_{t+1}`` of one episode."""
    returns = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


# ---------------------------------------------------------------------------- the dataset


class ReplayDataset:
    """Memory-mapped logged episodes; ``batch(indices)`` returns what :class:`QLearner` trains on.

    ``frames`` stacks the last ``frames`` observations (repeating an episode's first one at its
    start); ``n_step > 1`` yields ``rewards (b, n)``, zero past the episode end, with ``horizon``.
    """

    def __init__(self, path: str | os.PathLike, *, frames: int = 1, n_step: int = 1):
        self.path = Path(path)
        if not (self.path / META_FILE).is_file():
            raise FileNotFoundError(f"path: {self.path} is not a ReplayDataset folder (no {META_FILE})")
        if frames < 1 or n_step < 1:
            raise ValueError(f"frames/n_step: expected >= 1, got {frames} / {n_step}")
        self.frames, self.n_step = frames, n_step
        self.meta = json.loads((self.path / META_FILE).read_text(encoding="utf-8"))
        load = lambda name: np.load(self.path / f"{name}.npy", mmap_mode="r")
        self.observations = load("observations")
        self.actions = load("actions")
        self.rewards = load("rewards")
        self.terminated = load("terminated")
        self.truncated = load("truncated")
        self.returns_to_go = load("returns_to_go")
        self.episode_starts = np.asarray(load("episode_starts"))
        self.text_embeds = load("text_embeds") if self.meta["has_text"] else None
        self.discretiser = ActionDiscretiser(**self.meta["discretiser"]) if self.meta["discretiser"] else None
        self.reward_scaler = RewardScaler(**self.meta["reward_scaler"])
        self.gamma = float(self.meta["gamma"])
        self.image = len(self.meta["obs_shape"]) == 3

    # -- writing

    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        episodes: Sequence[Episode],
        *,
        reward_scaler: RewardScaler,
        gamma: float,
        action_bins: int,
        discretiser: ActionDiscretiser | None = None,
        env_id: str | None = None,
        frames: int = 1,
        n_step: int = 1,
    ) -> ReplayDataset:
        """Write ``episodes`` to the folder ``path`` (replacing a dataset there) and open it."""
        if not episodes:
            raise ValueError("episodes: expected at least one episode")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        obs_shape = tuple(np.shape(episodes[0].observations)[1:])
        num_actions = np.shape(episodes[0].actions)[1]
        has_text = episodes[0].text_embed is not None
        for index, episode in enumerate(episodes):
            if tuple(np.shape(episode.observations)[1:]) != obs_shape or np.shape(episode.actions)[1] != num_actions:
                raise ValueError(f"episodes[{index}]: observation / action shapes differ from episode 0")
            if (episode.text_embed is not None) != has_text:
                raise ValueError(f"episodes[{index}]: text_embed given for some episodes but not all")
            actions = np.asarray(episode.actions)
            if actions.min() < 0 or actions.max() >= action_bins:
                raise ValueError(f"episodes[{index}]: action bins must lie in [0, {action_bins})")
        lengths = np.array([episode.length for episode in episodes])
        starts = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        cat = lambda name, dtype: np.concatenate([np.asarray(getattr(e, name), dtype=dtype) for e in episodes])
        arrays = {
            "observations": np.concatenate([np.asarray(e.observations) for e in episodes]),
            "actions": cat("actions", np.int64),
            "rewards": cat("rewards", np.float32),
            "terminated": cat("terminated", bool),
            "truncated": cat("truncated", bool),
            "returns_to_go": np.concatenate(
                [discounted_returns(reward_scaler(e.rewards), gamma) for e in episodes]
            ).astype(np.float32),
            "episode_starts": starts,
        }
        if has_text:
            arrays["text_embeds"] = np.stack([np.asarray(e.text_embed, dtype=np.float32) for e in episodes])
        for name, array in arrays.items():
            # a new file replaces the old one: readers still mapping the old arrays keep valid memory
            atomic_write(path / f"{name}.npy", lambda tmp, array=array: _save_npy(tmp, array))
        meta = {
            "obs_shape": list(obs_shape),
            "num_actions": int(num_actions),
            "action_bins": int(action_bins),
            "num_episodes": len(episodes),
            "num_transitions": int(starts[-1]),
            "has_text": has_text,
            "text_embed_dim": int(arrays["text_embeds"].shape[1]) if has_text else None,
            "discretiser": asdict(discretiser) if discretiser else None,
            "reward_scaler": asdict(reward_scaler),
            "gamma": gamma,
            "env_id": env_id,
        }
        atomic_write_text(path / META_FILE, json.dumps(meta, indent=2) + "\n")
        return cls(path, frames=frames, n_step=n_step)

    # -- reading

    def __len__(self) -> int:
        return int(self.episode_starts[-1])

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts) - 1

    @property
    def action_bins(self) -> int:
        return int(self.meta["action_bins"])

    @property
    def num_actions(self) -> int:
        return int(self.meta["num_actions"])

    def episode_returns(self) -> np.ndarray:
        """Undiscounted raw return of every episode."""
        return np.add.reduceat(np.asarray(self.rewards, dtype=np.float64), self.episode_starts[:-1])

    def episode(self, index: int) -> Episode:
        if not 0 <= index < self.num_episodes:
            raise ValueError(f"index: expected an episode in [0, {self.num_episodes}), got {index}")
        start, end = self.episode_starts[index], self.episode_starts[index + 1]
        return Episode(
            observations=np.asarray(self.observations[start + index : end + index + 1]),
            actions=np.asarray(self.actions[start:end]),
            rewards=np.asarray(self.rewards[start:end]),
            terminated=np.asarray(self.terminated[start:end]),
            truncated=np.asarray(self.truncated[start:end]),
            text_embed=None if self.text_embeds is None else np.asarray(self.text_embeds[index]),
        )

    def _stacked(self, obs_index: np.ndarray, first_obs: np.ndarray) -> torch.Tensor:
        offsets = np.arange(-self.frames + 1, 1)
        rows = np.maximum(obs_index[:, None] + offsets, first_obs[:, None])  # (b, f)
        stacked = np.asarray(self.observations[rows.ravel()])
        stacked = stacked.reshape(*rows.shape, *stacked.shape[1:])
        tensor = torch.from_numpy(np.ascontiguousarray(stacked))
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
        return tensor.permute(0, 2, 1, 3, 4) if self.image else tensor  # images: (b, c, f, h, w)

    def batch(self, indices: np.ndarray | Sequence[int]) -> dict[str, torch.Tensor]:
        """Transitions ``indices`` -> ``obs``, ``actions``, ``rewards``, ``next_obs``, ``dones``,
        ``returns_to_go`` (+ ``horizon`` for n-step, ``text_embeds`` when logged)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(self))):
            raise ValueError(f"indices: expected a 1-D array of transitions in [0, {len(self)})")
        episode = np.searchsorted(self.episode_starts, indices, side="right") - 1
        end = self.episode_starts[episode + 1]
        first_obs = self.episode_starts[episode] + episode
        horizon = np.minimum(self.n_step, end - indices)
        steps = indices[:, None] + np.arange(self.n_step)
        valid = steps < end[:, None]
        rewards = self.reward_scaler(np.asarray(self.rewards)[np.minimum(steps, len(self) - 1)]) * valid
        last_step = indices + horizon - 1
        actions = torch.from_numpy(np.asarray(self.actions[indices]))
        batch = {
            "obs": self._stacked(indices + episode, first_obs),
            "actions": actions[:, 0] if self.num_actions == 1 else actions,
            "rewards": torch.from_numpy(rewards.astype(np.float32)),
            "next_obs": self._stacked(indices + episode + horizon, first_obs),
            "dones": torch.from_numpy(np.asarray(self.terminated[last_step])),
            "returns_to_go": torch.from_numpy(np.asarray(self.returns_to_go[indices])),
        }
        if self.n_step == 1:
            batch["rewards"] = batch["rewards"][:, 0]
        else:
            batch["horizon"] = torch.from_numpy(horizon)
        if self.text_embeds is not None:
            batch["text_embeds"] = torch.from_numpy(np.asarray(self.text_embeds[episode]))
        return batch

    def sample(self, batch_size: int, generator: np.random.Generator) -> dict[str, torch.Tensor]:
        return self.batch(generator.integers(0, len(self), size=batch_size))


# ---------------------------------------------------------------------------- gymnasium


Policy = Callable[[np.ndarray], np.ndarray]
"""``policy(observations (k, ...)) -> bins (k, d)``: one row per environment stepped together; with
``frames > 1`` the rows are the last ``frames`` observations ``(k, frames, ...)``, as in a dataset batch."""


def _as_envs(env: Any) -> list:
    envs = list(env) if isinstance(env, (list, tuple)) else [env]
    if not envs or not all(hasattr(e, "step") and hasattr(e, "reset") for e in envs):
        raise TypeError("env: expected a gymnasium Env or a list of them")
    return envs


def rollout(
    env: Any,
    policy: Policy,
    n: int,
    *,
    discretiser: ActionDiscretiser,
    seed: int = 0,
    max_steps: int | None = None,
    text_embed: np.ndarray | None = None,
    frames: int = 1,
) -> list[Episode]:
    """Run ``n`` episodes (seeds ``seed, seed + 1, ...``); several envs step in lockstep, batching the policy.

    ``frames > 1`` shows the policy each env's last ``frames`` observations, the episode's first one
    repeated before it has that many (the stacking :class:`ReplayDataset` trains on).
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1 episodes, got {n}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames: expected an integer >= 1, got {frames!r}")
    envs = _as_envs(env)
    episodes: list[Episode] = []
    next_seed = seed
    active: dict[int, dict[str, list]] = {}

    def start(slot: int) -> None:
        nonlocal next_seed
        observation, _ = envs[slot].reset(seed=next_seed)
        next_seed += 1
        active[slot] = {"obs": [np.asarray(observation)], "actions": [], "rewards": [], "term": [], "trunc": []}

    def policy_input(slot: int) -> np.ndarray:
        history = active[slot]["obs"]
        if frames == 1:
            return history[-1]
        recent = history[-frames:]
        return np.stack([history[0]] * (frames - len(recent)) + recent)

    for slot in range(min(len(envs), n)):
        start(slot)
    while active:
        slots = sorted(active)
        bins = np.asarray(policy(np.stack([policy_input(s) for s in slots])))
        if bins.shape != (len(slots), discretiser.num_actions):
            raise ValueError(f"policy: expected bins ({len(slots)}, {discretiser.num_actions}), got {bins.shape}")
        env_actions = discretiser.from_bins(bins)
        for row, slot in enumerate(slots):
            record = active[slot]
            observation, reward, terminated, truncated, _ = envs[slot].step(env_actions[row])
            truncated = truncated or (max_steps is not None and len(record["rewards"]) + 1 >= max_steps)
            record["obs"].append(np.asarray(observation))
            record["actions"].append(bins[row])
            record["rewards"].append(float(reward))
            record["term"].append(bool(terminated))
            record["trunc"].append(bool(truncated and not terminated))
            if terminated or truncated:
                episodes.append(
                    Episode(
                        observations=np.stack(record["obs"]),
                        actions=np.stack(record["actions"]).astype(np.int64),
                        rewards=np.asarray(record["rewards"], dtype=np.float32),
                        terminated=np.asarray(record["term"]),
                        truncated=np.asarray(record["trunc"]),
                        text_embed=text_embed,
                    )
                )
                del active[slot]
                if next_seed - seed < n:
                    start(slot)
    return episodes


def collect_episodes(
    env: Any,
    policy: Policy,
    n: int,
    path: str | os.PathLike,
    *,
    discretiser: ActionDiscretiser,
    reward_scaler: RewardScaler,
    gamma: float,
    seed: int = 0,
    max_steps: int | None = None,
    text_embed: np.ndarray | None = None,
    frames: int = 1,
    n_step: int = 1,
) -> ReplayDataset:
    """Run ``policy`` for ``n`` episodes of ``env`` (an Env, or a list stepped in lockstep) and write
    them as a :class:`ReplayDataset` at ``path``; ``frames`` stacks observations for the policy and
    for the dataset's batches alike."""
    episodes = rollout(
        env, policy, n, discretiser=discretiser, seed=seed, max_steps=max_steps, text_embed=text_embed, frames=frames
    )
    env_id = getattr(getattr(_as_envs(env)[0], "spec", None), "id", None)
    return ReplayDataset.write(
        path,
        episodes,
        reward_scaler=reward_scaler,
        gamma=gamma,
        action_bins=discretiser.bins,
        discretiser=discretiser,
        env_id=env_id,
        frames=frames,
        n_step=n_step,
    )


def evaluate(
    env: Any, policy: Policy, n: int, *, discretiser: ActionDiscretiser, seed: int = 0, frames: int = 1
) -> np.ndarray:
    """Undiscounted returns of ``n`` episodes with seeds ``seed, seed + 1, ...`` (envs of a list step in lockstep)."""
    episodes = rollout(env, policy, n, discretiser=discretiser, seed=seed, frames=frames)
    return np.asarray([e.raw_return for e in episodes])


# ---------------------------------------------------------------------------- Minari


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # through a handle: np.save appends ".npy" to a bare path
        np.save(handle, array)


def from_minari(
    dataset: Any,
    path: str | os.PathLike | None = None,
    *,
    bins: int | None = None,
    reward_scaler: RewardScaler | None = None,
    gamma: float = 0.98,
    frames: int = 1,
    n_step: int = 1,
) -> ReplayDataset:
    """Import a Minari dataset (a ``MinariDataset`` or its id) as a :class:`ReplayDataset` at ``path``
    (default: ``cache_dir() / "minari" / <dataset id>``).

    Box actions are discretised into ``bins`` per dimension; the reward scaler defaults to
    ``RewardScaler.for_discount`` over the dataset's reward range.
    """
    import minari

    if isinstance(dataset, str):
        dataset = minari.load_dataset(dataset)
    discretiser = ActionDiscretiser.from_space(dataset.action_space, bins)
    episodes = []
    for data in dataset.iterate_episodes():
        if not isinstance(data.observations, np.ndarray):
            raise TypeError("dataset: only array observations (Box spaces) can be imported, got a dict/tuple space")
        episodes.append(
            Episode(
                observations=np.asarray(data.observations),
                actions=discretiser.to_bins(np.asarray(data.actions)),
                rewards=np.asarray(data.rewards, dtype=np.float32),
                terminated=np.asarray(data.terminations, dtype=bool),
                truncated=np.asarray(data.truncations, dtype=bool),
            )
        )
    if reward_scaler is None:
        rewards = np.concatenate([e.rewards for e in episodes])
        low, high = float(rewards.min()), float(rewards.max())
        reward_scaler = RewardScaler.for_discount(low, high if high > low else low + 1.0, gamma)
    env_id = dataset.spec.env_spec.id if dataset.spec.env_spec is not None else None
    if path is None:
        path = cache_dir() / "minari" / dataset.id.replace("/", "--")
    return ReplayDataset.write(
        path,
        episodes,
        reward_scaler=reward_scaler,
        gamma=gamma,
        action_bins=discretiser.bins,
        discretiser=discretiser,
        env_id=env_id,
        frames=frames,
        n_step=n_step,
    )


def to_minari(replay: ReplayDataset, dataset_id: str, *, env: Any = None, **metadata: Any) -> Any:
    """Export ``replay`` as a Minari dataset (arrow format) named ``dataset_id``; actions leave as the
    environment values of their bins. ``env`` (an Env, id or spec) defaults to the logged env id."""
    import minari
    from minari.data_collector import EpisodeBuffer

    if replay.discretiser is None:
        raise ValueError("replay: has no action discretiser, its bins cannot be mapped back to env actions")
    env = env if env is not None else replay.meta.get("env_id")
    if env is None:
        raise ValueError("env: the dataset logged no env id; pass env=")
    buffers = []
    for index in range(replay.num_episodes):
        episode = replay.episode(index)
        buffers.append(
            EpisodeBuffer(
                id=index,
                observations=episode.observations,
                actions=replay.discretiser.from_bins(episode.actions),
                rewards=list(map(float, episode.rewards)),
                terminations=list(map(bool, episode.terminated)),
                truncations=list(map(bool, episode.truncated)),
                infos={},
            )
        )
    metadata.setdefault("algorithm_name", "quintet.qtransformer")
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, data_format="arrow", **metadata)
