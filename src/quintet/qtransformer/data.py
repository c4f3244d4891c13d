"""Q-learning data on the shared episode store: action bins, reward scaling, returns-to-go, batches.

Episodes are stored once, one way, by :mod:`quintet.data.episodes` (memory-mapped ``.npy`` arrays +
``meta.json``). What is Q-specific lives here:

- :class:`ActionDiscretiser` (env actions <-> bins per dimension) and :class:`RewardScaler`;
- :class:`ReplaySpec`, the spec the store's one writer applies: checks that actions are bins
  ``(T, d)`` and derives ``returns_to_go (T,)`` (discounted, of the scaled rewards);
- :class:`ReplayDataset`, a view of a store written with a ``ReplaySpec`` whose ``batch`` /
  ``sample`` give what :class:`~quintet.qtransformer.learner.QLearner` trains on (frame stacking,
  n-step windows); a per-episode ``text_embed`` attribute becomes ``text_embeds``, an
  ``instruction`` string attribute ``text_ids`` or ``text_embeds`` through an instruction featurizer;
- gymnasium rollouts that act in bins, and Minari import / export with the discretisation.

Shape glossary: ``E`` episodes, ``T`` transitions, ``b`` batch, ``f`` frames, ``d`` action
dimensions, ``n`` n-step horizon, ``e`` text-embedding dim.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quintet.core.io import cache_dir
from quintet.core.validation import check_int, check_number
from quintet.data import rollouts
from quintet.data.episodes import META_FILE, Episode, EpisodeSpec, EpisodeStore, write_episodes
from quintet.data.minari_io import load_minari, read_minari, write_minari

__all__ = [
    "META_FILE",
    "ActionDiscretiser",
    "Episode",
    "Policy",
    "ReplayDataset",
    "ReplaySpec",
    "RewardScaler",
    "collect_episodes",
    "discounted_returns",
    "evaluate",
    "from_minari",
    "rollout",
    "to_minari",
]


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
    """Affine map of raw rewards: ``[low, high]`` onto ``[0, scale]``, raw rewards clipped to ``clip``
    (default ``(low, high)``).

    Q-values are sigmoids in [0, 1]. Sparse success rewards need ``scale=1``; dense rewards use
    :meth:`for_discount` (``scale = 1 - gamma``: every discounted return lies in [0, 1]) or
    :meth:`for_returns` (the discounted returns the data reaches span [0, 1]: finer Q resolution).
    """

    low: float
    high: float
    scale: float = 1.0
    clip: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"low/high: expected low < high, got {self.low} / {self.high}")
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale: expected a value in (0, 1], got {self.scale}")
        if self.clip is not None and (len(self.clip) != 2 or not self.clip[0] < self.clip[1]):
            raise ValueError(f"clip: expected raw bounds (low, high) with low < high, got {self.clip!r}")

    @classmethod
    def for_discount(cls, low: float, high: float, gamma: float) -> RewardScaler:
        return cls(low=low, high=high, scale=1.0 - gamma)

    @classmethod
    def for_returns(
        cls, low: float, high: float, gamma: float, *, clip: tuple[float, float] | None = None
    ) -> RewardScaler:
        """Discounted returns in ``[low, high]`` onto [0, 1] (``low <= 0 <= high``): each step's reward
        ``r -> (r - (1 - gamma) low) / (high - low)``, negative for rewards below ``(1 - gamma) low``.

        With :meth:`terminal_value` continuing terminated episodes, a return ``G`` of any length maps
        to ``(G - low) / (high - low)``: the whole Q range serves the returns that occur, where
        :meth:`for_discount` over a wide per-step range squeezes them into a sliver of it.
        """
        if not low <= 0.0 <= high or not low < high:
            raise ValueError(f"low/high: expected a return range low <= 0 <= high, got {low} / {high}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma: expected a discount in [0, 1), got {gamma!r}")
        span = 1.0 - gamma
        return cls(low=span * low, high=span * high, scale=span, clip=clip or (-float("inf"), float("inf")))

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        clip_low, clip_high = self.clip if self.clip is not None else (self.low, self.high)
        return (np.clip(rewards, clip_low, clip_high) - self.low) / (self.high - self.low) * self.scale

    def terminal_value(self, gamma: float) -> float:
        """The scaled value of what follows a termination: raw reward 0 forever, ``scaled(0) / (1 - gamma)``.

        The affine map adds ``scaled(0)`` to every step's reward. Bootstrapping a termination with 0
        would then reward long episodes for their length alone (LunarLander's scale pays 0.5 of the
        scaled range per step for hovering, more than the landing bonus); continuing the terminated
        episode in an absorbing state that keeps paying ``scaled(0)`` restores the ranking of the raw
        returns. 0 for rewards scaled from ``low = 0`` (success rewards, CartPole).
        """
        shift = float(self(np.array(0.0)))
        if shift == 0.0:
            return 0.0
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma: a shifted reward scale needs a discount below 1, got {gamma!r}")
        value = shift / (1.0 - gamma)
        if value > 1.0 + 1e-9:
            raise ValueError(
                f"reward_scaler: raw reward 0 scales to {shift:g} per step, worth {value:g} > 1 forever at gamma "
                f"{gamma:g}; Q-values lie in [0, 1] (use RewardScaler.for_discount)"
            )
        return min(value, 1.0)



# ---------------------------------------------------------------------------- returns


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Monte-Carlo return-to-go ``G_t = r_t + gamma G_{t+1}`` of one episode."""
    returns = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


# ---------------------------------------------------------------------------- the store's spec


@dataclass(frozen=True, kw_only=True)
class ReplaySpec(EpisodeSpec):
    """How Q-learning episodes are written: actions are bins ``(T, d)`` in ``[0, action_bins)``;
    ``returns_to_go`` are the discounted returns of the ``reward_scaler``-scaled rewards.

    ``discretiser`` maps bins back to env actions (rollouts, Minari export); ``env_id`` names the env;
    ``terminal_value`` continues terminated episodes' returns (``RewardScaler.terminal_value``).
    """

    reward_scaler: RewardScaler
    gamma: float
    action_bins: int
    discretiser: ActionDiscretiser | None = None
    env_id: str | None = None
    terminal_value: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.reward_scaler, RewardScaler):
            raise TypeError(f"reward_scaler: expected a RewardScaler, got {type(self.reward_scaler).__name__}")
        check_number(self.gamma, "gamma", low=0.0, high=1.0)
        check_number(self.terminal_value, "terminal_value", low=0.0, high=1.0)
        check_int(self.action_bins, "action_bins", minimum=2)
        if self.discretiser is not None:
            if not isinstance(self.discretiser, ActionDiscretiser):
                raise TypeError(f"discretiser: expected an ActionDiscretiser, got {type(self.discretiser).__name__}")
            if self.discretiser.bins != self.action_bins:
                raise ValueError(
                    f"action_bins: {self.action_bins} differs from the discretiser's {self.discretiser.bins} bins"
                )

    @classmethod
    def for_discretiser(
        cls, discretiser: ActionDiscretiser, reward_scaler: RewardScaler, gamma: float, env_id: str | None = None
    ) -> ReplaySpec:
        return cls(
            reward_scaler=reward_scaler,
            gamma=gamma,
            action_bins=discretiser.bins,
            discretiser=discretiser,
            env_id=env_id,
            terminal_value=reward_scaler.terminal_value(gamma),
        )

    def check(self, episode: Episode) -> None:
        actions = episode.actions
        if actions.ndim != 2 or not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions: expected integer bins (T, d), got {actions.dtype} {actions.shape}")
        if self.discretiser is not None and actions.shape[1] != self.discretiser.num_actions:
            raise ValueError(
                f"actions: expected {self.discretiser.num_actions} action dimensions, got {actions.shape[1]}"
            )
        if actions.min() < 0 or actions.max() >= self.action_bins:
            raise ValueError(
                f"actions: bins must lie in [0, {self.action_bins}), got [{actions.min()}, {actions.max()}]"
            )

    def step_arrays(self, episode: Episode) -> dict[str, np.ndarray]:
        returns = discounted_returns(self.reward_scaler(episode.rewards), self.gamma)
        if self.terminal_value and episode.terminated[-1]:
            returns = returns + self.gamma ** np.arange(episode.length, 0, -1) * self.terminal_value
        return {"returns_to_go": returns.astype(np.float32)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplaySpec:
        discretiser = data.get("discretiser")
        return cls(
            reward_scaler=_scaler_from_json(data["reward_scaler"]),
            gamma=data["gamma"],
            action_bins=data["action_bins"],
            discretiser=None if discretiser is None else _discretiser_from_json(discretiser),
            env_id=data.get("env_id"),
            terminal_value=data.get("terminal_value", 0.0),
        )


def _scaler_from_json(data: dict[str, Any]) -> RewardScaler:
    clip = data.get("clip")
    clip = None if clip is None else tuple(clip)
    return RewardScaler(low=data["low"], high=data["high"], scale=data["scale"], clip=clip)


def _discretiser_from_json(data: dict[str, Any]) -> ActionDiscretiser:
    return ActionDiscretiser(
        low=tuple(data["low"]), high=tuple(data["high"]), bins=data["bins"], discrete=data["discrete"]
    )


# ---------------------------------------------------------------------------- the dataset


class ReplayDataset(EpisodeStore):
    """An episode store written with a :class:`ReplaySpec`; ``batch(indices)`` returns what
    :class:`QLearner` trains on.

    ``frames`` stacks the last ``frames`` observations (repeating an episode's first one at its
    start); ``n_step > 1`` yields ``rewards (b, n)``, zero past the episode end, with ``horizon``.
    ``instructions`` maps instruction strings to their features, ``(k, L)`` word ids (batches get
    ``text_ids``: ``model.tokenize``) or ``(k, e)`` embeddings (``text_embeds``: a frozen sentence
    encoder); each distinct instruction of the store's ``instruction`` attribute is featurized once.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        frames: int = 1,
        n_step: int = 1,
        instructions: Callable[[list[str]], torch.Tensor] | None = None,
    ):
        super().__init__(path)
        for name, value in (("frames", frames), ("n_step", n_step)):
            check_int(value, name, minimum=1)
        if self.spec_json is None or self.spec_json.get("type") != ReplaySpec.__qualname__:
            raise ValueError(
                f"path: {self.path} was written without a ReplaySpec (no action bins, no returns-to-go); "
                f"write it with ReplayDataset.write(path, episodes, spec)"
            )
        self.frames, self.n_step = frames, n_step
        self.spec = ReplaySpec.from_json(self.spec_json)
        self.discretiser = self.spec.discretiser
        self.reward_scaler = self.spec.reward_scaler
        self.gamma = float(self.spec.gamma)
        self.returns_to_go = self.step_arrays["returns_to_go"]
        self.text_embeds = self.attributes.get("text_embed")
        self.image = self.observations.ndim == 4
        self.instruction_features: torch.Tensor | None = None
        if instructions is not None:
            self.instruction_features = self._featurize(instructions)

    def _featurize(self, instructions: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Features of every episode's instruction ``(E, ...)``, computed once per distinct instruction."""
        if "instruction" not in self.attributes:
            raise ValueError(f"instructions: {self.path} has no 'instruction' attribute to featurize")
        unique, inverse = np.unique(np.asarray(self.attributes["instruction"]), return_inverse=True)
        features = instructions([str(text) for text in unique])
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) != len(unique):
            raise ValueError(
                f"instructions: expected a ({len(unique)}, L) or ({len(unique)}, e) tensor for {len(unique)} "
                f"instructions, got {getattr(features, 'shape', type(features).__name__)}"
            )
        return features.cpu()[torch.from_numpy(inverse.reshape(-1))]

    def instructions(self) -> list[str]:
        """Every episode's instruction (the ``instruction`` attribute)."""
        if "instruction" not in self.attributes:
            raise ValueError(f"instructions: {self.path} has no 'instruction' attribute")
        return [str(text) for text in self.attributes["instruction"]]

    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        episodes: Sequence[Episode],
        spec: ReplaySpec,
        *,
        frames: int = 1,
        n_step: int = 1,
        instructions: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> ReplayDataset:
        """Write ``episodes`` (actions as bins) with ``spec`` to the folder ``path``, replacing a store
        there, and open it with ``frames`` / ``n_step`` / ``instructions``."""
        if not isinstance(spec, ReplaySpec):
            raise TypeError(f"spec: expected a ReplaySpec, got {type(spec).__name__}")
        path = write_episodes(path, episodes, spec, env_id=spec.env_id)
        return cls(path, frames=frames, n_step=n_step, instructions=instructions)

    @property
    def action_bins(self) -> int:
        return self.spec.action_bins

    @property
    def num_actions(self) -> int:
        return int(self.actions.shape[1])

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
        indices = self._check_indices(indices, "indices", len(self))
        episode = self.episode_of(indices)
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
        if self.instruction_features is not None:
            features = self.instruction_features[torch.from_numpy(episode)]
            batch["text_embeds" if features.is_floating_point() else "text_ids"] = features
        elif self.text_embeds is not None:
            batch["text_embeds"] = torch.from_numpy(np.asarray(self.text_embeds[episode], dtype=np.float32))
        return batch

    def sample(self, batch_size: int, generator: np.random.Generator) -> dict[str, torch.Tensor]:
        return self.batch(generator.integers(0, len(self), size=batch_size))


# ---------------------------------------------------------------------------- gymnasium


Policy = Callable[[np.ndarray], np.ndarray]
"""``policy(observations (k, ...)) -> bins (k, d)``: one row per environment stepped together; with
``frames > 1`` the rows are the last ``frames`` observations ``(k, frames, ...)``, as in a dataset batch."""


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
    attributes: rollouts.Attributes | None = None,
    policy_sees_attributes: bool = False,
    reset_options: dict | None = None,
) -> list[Episode]:
    """Run ``n`` episodes (seeds ``seed, seed + 1, ...``) with a policy that acts in bins, stored as bins
    and sent to the env through ``discretiser``; several envs step in lockstep, batching the policy.

    ``frames > 1`` shows the policy each env's last ``frames`` observations, the episode's first one
    repeated before it has that many (the stacking :class:`ReplayDataset` trains on). ``attributes``,
    ``policy_sees_attributes`` and ``reset_options`` are :func:`quintet.data.rollout`'s (an
    instruction-following policy reads each episode's instruction from its attributes).
    """
    if text_embed is not None:
        if attributes is not None:
            raise ValueError("text_embed: give it as attributes={'text_embed': ...} when attributes are given")
        attributes = {"text_embed": np.asarray(text_embed)}

    def bins_policy(observations: np.ndarray, *context) -> np.ndarray:
        bins = np.asarray(policy(observations, *context))
        if bins.shape != (len(observations), discretiser.num_actions) or not np.issubdtype(bins.dtype, np.integer):
            raise ValueError(
                f"policy: expected integer bins ({len(observations)}, {discretiser.num_actions}), "
                f"got {bins.dtype} {bins.shape}"
            )
        return bins.astype(np.int64)

    return rollouts.rollout(
        env,
        bins_policy,
        n,
        to_env=discretiser.from_bins,
        seed=seed,
        max_steps=max_steps,
        frames=frames,
        attributes=attributes,
        policy_sees_attributes=policy_sees_attributes,
        reset_options=reset_options,
    )


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
    spec = ReplaySpec.for_discretiser(discretiser, reward_scaler, gamma, env_id=rollouts.env_id_of(env))
    return ReplayDataset.write(path, episodes, spec, frames=frames, n_step=n_step)


def evaluate(
    env: Any, policy: Policy, n: int, *, discretiser: ActionDiscretiser, seed: int = 0, frames: int = 1
) -> np.ndarray:
    """Undiscounted returns of ``n`` episodes with seeds ``seed, seed + 1, ...`` (envs of a list step in lockstep)."""
    episodes = rollout(env, policy, n, discretiser=discretiser, seed=seed, frames=frames)
    return np.asarray([e.raw_return for e in episodes])


# ---------------------------------------------------------------------------- Minari


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
    dataset = load_minari(dataset)
    discretiser = ActionDiscretiser.from_space(dataset.action_space, bins)
    episodes = read_minari(dataset, actions=discretiser.to_bins)
    if reward_scaler is None:
        rewards = np.concatenate([e.rewards for e in episodes])
        low, high = float(rewards.min()), float(rewards.max())
        reward_scaler = RewardScaler.for_discount(low, high if high > low else low + 1.0, gamma)
    env_id = dataset.spec.env_spec.id if dataset.spec.env_spec is not None else None
    if path is None:
        path = cache_dir() / "minari" / dataset.id.replace("/", "--")
    spec = ReplaySpec.for_discretiser(discretiser, reward_scaler, gamma, env_id=env_id)
    return ReplayDataset.write(path, episodes, spec, frames=frames, n_step=n_step)


def to_minari(replay: ReplayDataset, dataset_id: str, *, env: Any = None, **metadata: Any) -> Any:
    """Export ``replay`` as a Minari dataset (arrow format) named ``dataset_id``; actions leave as the
    environment values of their bins, string attributes (an ``instruction``) as text parts of Dict
    observations. ``env`` (an Env, id or spec) defaults to the logged env id."""
    if not isinstance(replay, ReplayDataset):
        raise TypeError(f"replay: expected a ReplayDataset, got {type(replay).__name__}")
    if replay.discretiser is None:
        raise ValueError("replay: has no action discretiser, its bins cannot be mapped back to env actions")
    metadata.setdefault("algorithm_name", "quintet.qtransformer")
    texts = tuple(name for name, values in replay.attributes.items() if values.dtype.kind == "U")
    return write_minari(replay, dataset_id, env=env, actions=replay.discretiser.from_bins, texts=texts, **metadata)
