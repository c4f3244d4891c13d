"""Episodes from gymnasium environments: lockstep rollouts with any policy, and recording frames.

:func:`rollout` runs ``n`` episodes on one env or on several stepped in lockstep (one batched
policy call per step), seeds ``seed, seed + 1, ...`` in the order episodes start. The caller says how
actions are stored vs sent to the env (``to_env``: the Q-Transformer stores bins and sends Box
values; Genie stores Discrete ids as they are) and may transform observations before they are stored
and shown to the policy (:func:`resize_frames`: RGB frames to 64 x 64 uint8). :func:`record` plays an
env and writes the episode store that Genie trains on.

Needs the ``rl`` extra (gymnasium); Atari ids (``ALE/...``) need the ``atari`` extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from quintet.data.episodes import Episode, EpisodeSpec, EpisodeStore, write_episodes

Policy = Callable[[np.ndarray], np.ndarray]
"""``policy(observations (k, ...)) -> actions (k, ...)`` as the store keeps them: one row per env stepped
together; with ``frames > 1`` the rows are each env's last ``frames`` observations ``(k, frames, ...)``."""

Attributes = Mapping[str, Any] | Callable[[Any, dict], Mapping[str, Any]]
"""per-episode attributes: fixed ones, or ``attributes(first raw observation, reset info) -> dict``"""


def make_env(env_id: str, count: int = 1, **kwargs: Any) -> list:
    """``count`` instances of the gymnasium env ``env_id`` (``ALE/...`` ids register ale-py's Atari games)."""
    import gymnasium as gym

    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    return [gym.make(env_id, **kwargs) for _ in range(count)]


def as_envs(env: Any) -> list:
    envs = list(env) if isinstance(env, (list, tuple)) else [env]
    if not envs or not all(hasattr(e, "step") and hasattr(e, "reset") for e in envs):
        raise TypeError("env: expected a gymnasium Env or a list of them")
    return envs


def env_id_of(env: Any) -> str | None:
    return getattr(getattr(as_envs(env)[0], "spec", None), "id", None)


def rollout(
    env: Any,
    policy: Policy,
    n: int,
    *,
    to_env: Callable[[np.ndarray], np.ndarray] | None = None,
    observation_transform: Callable[[Any], np.ndarray] | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    frames: int = 1,
    attributes: Attributes | None = None,
    policy_sees_attributes: bool = False,
    reset_options: dict | None = None,
) -> list[Episode]:
    """Run ``n`` episodes of ``env`` (an Env, or a list stepped in lockstep, batching the policy).

    - ``policy``: observations -> actions as stored; ``to_env(actions (k, ...))`` gives what the envs
      step with (default: the stored actions themselves).
    - ``observation_transform(raw observation)``: what is stored and shown to the policy (default: as is).
    - ``frames > 1`` shows the policy each env's last ``frames`` observations, the episode's first
      repeated before it has that many (the stacking the Q-Transformer's batches use).
    - ``max_steps`` truncates longer episodes; ``attributes`` become every episode's attributes.
    - ``policy_sees_attributes``: call ``policy(observations, attributes)`` with each row's episode
      attributes (a list of dicts): an instruction-following policy reads its instruction there.
    - ``reset_options`` go to every ``env.reset(seed=..., options=...)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1 episodes, got {n!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames: expected an integer >= 1, got {frames!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps: expected an integer >= 1 or None, got {max_steps!r}")
    if attributes is not None and not (isinstance(attributes, Mapping) or callable(attributes)):
        raise TypeError(f"attributes: expected a dict or a callable, got {type(attributes).__name__}")
    envs = as_envs(env)
    transform = observation_transform or np.asarray
    episodes: list[Episode] = []
    next_seed = seed
    active: dict[int, dict[str, Any]] = {}

    def start(slot: int) -> None:
        nonlocal next_seed
        observation, info = envs[slot].reset(seed=next_seed, options=reset_options)
        next_seed += 1
        extra = attributes(observation, info) if callable(attributes) else attributes
        active[slot] = {
            "obs": [np.asarray(transform(observation))],
            "actions": [],
            "rewards": [],
            "term": [],
            "trunc": [],
            "attributes": dict(extra or {}),
        }

    def policy_input(slot: int) -> np.ndarray:
        history = active[slot]["obs"]
        return history[-1] if frames == 1 else stack_frames(history, frames)

    for slot in range(min(len(envs), n)):
        start(slot)
    while active:
        slots = sorted(active)
        observations = np.stack([policy_input(s) for s in slots])
        if policy_sees_attributes:
            actions = np.asarray(policy(observations, [active[s]["attributes"] for s in slots]))
        else:
            actions = np.asarray(policy(observations))
        if actions.ndim < 1 or len(actions) != len(slots):
            raise ValueError(f"policy: expected one action per env ({len(slots)} rows), got shape {actions.shape}")
        env_actions = actions if to_env is None else to_env(actions)
        for row, slot in enumerate(slots):
            record = active[slot]
            observation, reward, terminated, truncated, _ = envs[slot].step(env_actions[row])
            truncated = truncated or (max_steps is not None and len(record["rewards"]) + 1 >= max_steps)
            record["obs"].append(np.asarray(transform(observation)))
            record["actions"].append(actions[row])
            record["rewards"].append(float(reward))
            record["term"].append(bool(terminated))
            record["trunc"].append(bool(truncated and not terminated))
            if terminated or truncated:
                episodes.append(
                    Episode(
                        observations=np.stack(record["obs"]),
                        actions=np.stack(record["actions"]),
                        rewards=np.asarray(record["rewards"], dtype=np.float32),
                        terminated=np.asarray(record["term"]),
                        truncated=np.asarray(record["trunc"]),
                        attributes=record["attributes"],
                    )
                )
                del active[slot]
                if next_seed - seed < n:
                    start(slot)
    return episodes


# ---------------------------------------------------------------------------- recording frames


def resize_frames(size: int | tuple[int, int] = 64) -> Callable[[np.ndarray], np.ndarray]:
    """A transform: an RGB frame ``(h, w, 3)`` uint8 -> ``(3, size, size)`` uint8 (channels first, as
    models take images).

    Pillow's BOX filter: each output pixel is the mean of the input pixels it covers, so a sprite a
    few pixels wide (a ball, a bullet) fades rather than vanishes between samples, as it can under
    nearest / unfiltered bilinear sampling. About 0.1 ms per 210 x 160 Atari frame.
    """
    from PIL import Image

    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 1:
        raise ValueError(f"size: expected positive sides, got {size!r}")

    def transform(frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame: expected an RGB image (h, w, 3) uint8, got {frame.dtype} {frame.shape}")
        if frame.shape[:2] != (height, width):
            frame = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BOX))
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    return transform


def is_rgb_space(space: Any) -> bool:
    """Whether observations of ``space`` are RGB frames ``(h, w, 3)`` uint8."""
    from gymnasium import spaces

    return isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[2] == 3


def random_policy(action_space: Any, seed: int = 0) -> Policy:
    """Uniform random actions of ``action_space``, reproducible from ``seed``."""
    action_space.seed(seed)
    return lambda observations: np.stack([action_space.sample() for _ in range(len(observations))])


def record(
    env: Any,
    path: str | os.PathLike,
    n: int,
    *,
    policy: Policy | None = None,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    max_steps: int | None = None,
    num_envs: int = 1,
    frames: int = 1,
    spec: EpisodeSpec | None = None,
    attributes: Attributes | None = None,
) -> EpisodeStore:
    """Play ``n`` episodes of ``env`` and write (frames, actions, episode boundaries) as a store at ``path``.

    ``env``: an env id (``num_envs`` instances are made with ``render_mode="rgb_array"``), an Env or a
    list of Envs. Frames are the observation when it is an RGB image, else ``env.render()`` (the env
    must render ``rgb_array``); each is resized to ``size`` and stored ``(3, h, w)`` uint8. The policy
    sees the stored frames (stacked when ``frames > 1``) and returns actions as stored and sent to
    the env (Discrete ids); default: uniform random actions seeded by ``seed``.
    """
    from gymnasium.wrappers import AddRenderObservation

    if isinstance(env, str):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs: expected an integer >= 1, got {num_envs!r}")
        envs = make_env(env, num_envs, render_mode="rgb_array")
    else:
        envs = as_envs(env)
    env_id = env_id_of(envs)
    if not is_rgb_space(envs[0].observation_space):
        if any(e.render_mode != "rgb_array" for e in envs):
            raise ValueError(
                f"env: observations {envs[0].observation_space} are not RGB frames and the env does not render "
                f"them (make it with render_mode='rgb_array')"
            )
        envs = [AddRenderObservation(e, render_only=True) for e in envs]
    if policy is None:
        policy = random_policy(envs[0].action_space, seed)
    episodes = rollout(
        envs,
        policy,
        n,
        observation_transform=resize_frames(size),
        seed=seed,
        max_steps=max_steps,
        frames=frames,
        attributes=attributes,
    )
    return EpisodeStore(write_episodes(path, episodes, spec, env_id=env_id))


def stack_frames(history: Sequence[np.ndarray], frames: int) -> np.ndarray:
    """The last ``frames`` of ``history`` ``(frames, ...)``, its first repeated while it is shorter."""
    recent = list(history[-frames:])
    return np.stack([history[0]] * (frames - len(recent)) + recent)
