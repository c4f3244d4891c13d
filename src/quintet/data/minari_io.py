"""Episodes to and from Minari (the Farama offline-RL dataset format), for the ``rl`` extra.

Minari datasets live under ``$MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``); nothing here
downloads: ``read_minari`` takes a dataset already there (or a loaded ``MinariDataset``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from quintet.data.episodes import Episode, EpisodeStore


def load_minari(dataset: Any) -> Any:
    """A ``MinariDataset`` from itself or from its id (a local dataset)."""
    import minari

    return minari.load_dataset(dataset) if isinstance(dataset, str) else dataset


def read_minari(
    dataset: Any, *, actions: Callable[[np.ndarray], np.ndarray] | None = None
) -> list[Episode]:
    """Every episode of a Minari dataset (or its id) as an :class:`Episode`.

    ``actions`` maps each episode's env actions to the actions to keep (the Q-Transformer: to bins).
    Only array observations (Box spaces) can be imported.
    """
    episodes = []
    for data in load_minari(dataset).iterate_episodes():
        if not isinstance(data.observations, np.ndarray):
            raise TypeError("dataset: only array observations (Box spaces) can be imported, got a dict/tuple space")
        env_actions = np.asarray(data.actions)
        episodes.append(
            Episode(
                observations=np.asarray(data.observations),
                actions=env_actions if actions is None else actions(env_actions),
                rewards=np.asarray(data.rewards, dtype=np.float32),
                terminated=np.asarray(data.terminations, dtype=bool),
                truncated=np.asarray(data.truncations, dtype=bool),
            )
        )
    return episodes


def write_minari(
    episodes: EpisodeStore | Iterable[Episode],
    dataset_id: str,
    *,
    env: Any = None,
    actions: Callable[[np.ndarray], np.ndarray] | None = None,
    **metadata: Any,
) -> Any:
    """Write ``episodes`` (a store, or any episodes) as a Minari dataset (arrow format) named ``dataset_id``.

    ``actions`` maps stored actions to env actions (the Q-Transformer: bins to values). ``env`` (an
    Env, an id or an EnvSpec) defaults to a store's env id; ``metadata`` goes to
    ``minari.create_dataset_from_buffers`` (``algorithm_name``, ``author``, ...).
    """
    import minari
    from minari.data_collector import EpisodeBuffer

    if isinstance(episodes, EpisodeStore):
        env = env if env is not None else episodes.env_id
        episodes = episodes.episodes()
    if env is None:
        raise ValueError("env: the episodes name no env id; pass env=")
    buffers = [
        EpisodeBuffer(
            id=index,
            observations=episode.observations,
            actions=episode.actions if actions is None else actions(episode.actions),
            rewards=list(map(float, episode.rewards)),
            terminations=list(map(bool, episode.terminated)),
            truncations=list(map(bool, episode.truncated)),
            infos={},
        )
        for index, episode in enumerate(episodes)
    ]
    if not buffers:
        raise ValueError("episodes: expected at least one episode")
    metadata.setdefault("algorithm_name", "quintet")
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, data_format="arrow", **metadata)
