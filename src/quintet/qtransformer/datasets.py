"""The offline datasets the Q-Transformer presets generate when no ``--data`` is given, cached."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from quintet.core.io import atomic_write
from quintet.data import cache_dir
from quintet.data.episodes import META_FILE
from quintet.qtransformer.config import QTransformerConfig
from quintet.qtransformer.data import ActionDiscretiser, ReplayDataset, rollout
from quintet.qtransformer.envs import lunar_heuristic_policy, make_env, random_policy, replay_spec, write_dataset
from quintet.qtransformer.presets import BabyAISettings, RLSettings


def cached_dataset(
    name: str, spec: object, write: Callable[[Path], object], open_dataset: Callable[[Path], ReplayDataset]
) -> ReplayDataset:
    """The dataset cached as ``name`` (plus a digest of its ``spec``: how it is written) in
    :func:`quintet.data.cache_dir`, written by ``write(folder)`` the first time.

    Several processes may ask at once (torchrun ranks, parallel tests): each writes into a private
    temporary folder that :func:`quintet.core.io.atomic_write` renames into place, so a reader never
    sees a half-written dataset; a process that loses the race drops its copy and opens the winner's
    (the same episodes: the name fixes how they were played)."""
    digest = hashlib.sha1(repr(spec).encode()).hexdigest()[:10]
    path = cache_dir() / f"{name}-{digest}"
    if not (path / META_FILE).is_file():
        written: list[Path] = []

        def write_folder(temporary: Path) -> None:
            temporary.unlink()  # atomic_write made a file; the dataset is a folder
            written.append(temporary)
            write(temporary)

        try:
            atomic_write(path, write_folder)
        except OSError:
            for temporary in written:
                shutil.rmtree(temporary, ignore_errors=True)
            if not (path / META_FILE).is_file():  # not a lost race: a real failure
                raise
    return open_dataset(path)


def lunarlander_dataset(rl: RLSettings, action_bins: int, *, seed: int = 0, frames: int = 1) -> ReplayDataset:
    """The fixed offline dataset: noisy heuristic-controller episodes, generated once and cached."""
    envs = make_env(rl.env_id, rl.collect_envs)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, action_bins)
    spec = replay_spec(rl, discretiser)

    def write(path: Path) -> None:
        policy = lunar_heuristic_policy(envs[0], rl.action_noise, np.random.default_rng(seed), discretiser)
        episodes = rollout(envs, policy, rl.dataset_episodes, discretiser=discretiser, seed=seed)
        write_dataset(path, episodes, rl, discretiser)

    return cached_dataset(
        f"lunarlander-heuristic-{rl.dataset_episodes}-noise{rl.action_noise}-bins{action_bins}-seed{seed}",
        spec,
        write,
        lambda path: ReplayDataset(path, frames=frames, n_step=rl.n_step),
    )


def random_dataset(rl: RLSettings, config: QTransformerConfig, name: str, *, seed: int = 0) -> ReplayDataset:
    """``rl.initial_episodes`` uniform-random episodes (seeds ``seed, seed + 1, ...``), cached as ``name``."""
    envs = make_env(rl.env_id, rl.collect_envs)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, config.action_bins)

    def write(path: Path) -> None:
        policy = random_policy(discretiser, np.random.default_rng(seed))
        episodes = rollout(envs, policy, rl.initial_episodes, discretiser=discretiser, seed=seed)
        write_dataset(path, episodes, rl, discretiser)

    return cached_dataset(
        f"{name}-random-{rl.env_id}-{rl.initial_episodes}-bins{config.action_bins}-seed{seed}",
        replay_spec(rl, discretiser),
        write,
        lambda path: ReplayDataset(path, frames=config.frames, n_step=rl.n_step),
    )


def babyai_dataset(
    rl: BabyAISettings,
    config: QTransformerConfig,
    *,
    instructions: Callable[[list[str]], torch.Tensor] | None = None,
    seed: int = 0,
) -> ReplayDataset:
    """The BabyAI offline data (seeds ``seed, seed + 1, ...``): the bot taking a random action with
    probability ``rl.action_noise``, pursuing another object in a share ``rl.misdirected`` of the
    episodes. Frames are stored uint8 and memory-mapped, the mission as each episode's
    ``instruction`` (and its ``family``); generated once and cached."""
    from quintet.qtransformer.babyai_env import bot_policy, make_envs

    world = rl.world
    env = make_envs(world)[0]
    discretiser = ActionDiscretiser.from_space(env.action_space)

    def write(path: Path) -> None:
        episodes = rollout(
            [env],
            bot_policy(
                env,
                np.random.default_rng(seed),
                noise=rl.action_noise,
                misdirected=rl.misdirected,
                recover=rl.recover,
                random_episodes=rl.random_episodes,
            ),
            rl.dataset_episodes,
            discretiser=discretiser,
            seed=seed,
            attributes=lambda observation, info: {"instruction": info["mission"], "family": info["family"]},
        )
        write_dataset(path, episodes, rl, discretiser)

    return cached_dataset(
        f"babyai-{rl.dataset_episodes}-noise{rl.action_noise}-misdirected{rl.misdirected}-recover{rl.recover}"
        f"-random{rl.random_episodes}-seed{seed}",
        (world, replay_spec(rl, discretiser)),
        write,
        lambda path: ReplayDataset(path, frames=config.frames, n_step=rl.n_step, instructions=instructions),
    )


def offline_dataset(rl: RLSettings, config: QTransformerConfig, name: str) -> ReplayDataset:
    """The dataset an offline preset called ``name`` trains on without ``--data``."""
    if rl.offline_policy == "lunar-heuristic":
        return lunarlander_dataset(rl, config.action_bins, frames=config.frames)
    return random_dataset(rl, config, name)
