"""The offline datasets the Q-Transformer presets generate when no ``--data`` is given, cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quintet.data import cache_dir
from quintet.data.episodes import META_FILE
from quintet.qtransformer.config import QTransformerConfig
from quintet.qtransformer.data import ActionDiscretiser, ReplayDataset, rollout
from quintet.qtransformer.envs import lunar_heuristic_policy, make_env, random_policy, write_dataset
from quintet.qtransformer.presets import RLSettings


def lunarlander_dataset(rl: RLSettings, action_bins: int, *, seed: int = 0, frames: int = 1) -> ReplayDataset:
    """The fixed offline dataset: noisy heuristic-controller episodes, generated once and cached."""
    name = f"lunarlander-heuristic-{rl.dataset_episodes}-noise{rl.action_noise}-bins{action_bins}-seed{seed}"
    path = cache_dir() / name
    if (path / META_FILE).is_file():  # the meta file is written last: its presence means complete
        return ReplayDataset(path, frames=frames, n_step=rl.n_step)
    envs = make_env(rl.env_id, rl.collect_envs)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, action_bins)
    policy = lunar_heuristic_policy(envs[0], rl.action_noise, np.random.default_rng(seed), discretiser)
    episodes = rollout(envs, policy, rl.dataset_episodes, discretiser=discretiser, seed=seed)
    return write_dataset(path, episodes, rl, discretiser, frames=frames)


def random_dataset(rl: RLSettings, config: QTransformerConfig, path: Path, *, seed: int = 0) -> ReplayDataset:
    """``rl.initial_episodes`` uniform-random episodes as a ReplayDataset at ``path``."""
    envs = make_env(rl.env_id, rl.collect_envs)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, config.action_bins)
    policy = random_policy(discretiser, np.random.default_rng(seed))
    episodes = rollout(envs, policy, rl.initial_episodes, discretiser=discretiser)
    return write_dataset(path, episodes, rl, discretiser, frames=config.frames)


def offline_dataset(rl: RLSettings, config: QTransformerConfig, name: str) -> ReplayDataset:
    """The dataset an offline preset called ``name`` trains on without ``--data``."""
    if rl.offline_policy == "lunar-heuristic":
        return lunarlander_dataset(rl, config.action_bins, frames=config.frames)
    return random_dataset(rl, config, cache_dir() / f"{name}-random")
