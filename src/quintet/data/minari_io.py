"""Episodes to and from Minari (the Farama offline-RL dataset format), for the ``rl`` extra.

Minari datasets live under ``$MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``); nothing here
downloads: ``read_minari`` takes a dataset already there (or a loaded ``MinariDataset``).

String attributes of episodes (an instruction) travel as ``Text`` parts of a ``Dict`` observation,
``{"observation": <the array>, <name>: <the text at every step>}``, the way MiniGrid observes its
mission; :func:`read_minari` turns them back into attributes.
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


OBSERVATION_KEY = "observation"


def _split_observations(observations: Any) -> tuple[np.ndarray, dict[str, str]]:
    """An episode's observations -> the array and its text attributes (a Dict with text parts)."""
    if isinstance(observations, np.ndarray):
        return observations, {}
    if isinstance(observations, dict) and isinstance(observations.get(OBSERVATION_KEY), np.ndarray):
        texts = {key: value for key, value in observations.items() if key != OBSERVATION_KEY}
        if all(isinstance(value, list) and value and isinstance(value[0], str) for value in texts.values()):
            return observations[OBSERVATION_KEY], {key: value[0] for key, value in texts.items()}
    raise TypeError(
        "dataset: only array observations (Box spaces), or a Dict of an 'observation' array and texts, can be "
        "imported"
    )


def read_minari(dataset: Any, *, actions: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Episode]:
    """Every episode of a Minari dataset (or its id) as an :class:`Episode`.

    ``actions`` maps each episode's env actions to the actions to keep (the Q-Transformer: to bins).
    Observations are arrays (Box spaces), or Dicts of an ``observation`` array and texts, which
    become the episode's attributes.
    """
    episodes = []
    for data in load_minari(dataset).iterate_episodes():
        observations, attributes = _split_observations(data.observations)
        env_actions = np.asarray(data.actions)
        episodes.append(
            Episode(
                observations=np.asarray(observations),
                actions=env_actions if actions is None else actions(env_actions),
                rewards=np.asarray(data.rewards, dtype=np.float32),
                terminated=np.asarray(data.terminations, dtype=bool),
                truncated=np.asarray(data.truncations, dtype=bool),
                attributes=attributes,
            )
        )
    return episodes


def write_minari(
    episodes: EpisodeStore | Iterable[Episode],
    dataset_id: str,
    *,
    env: Any = None,
    actions: Callable[[np.ndarray], np.ndarray] | None = None,
    texts: tuple[str, ...] = (),
    **metadata: Any,
) -> Any:
    """Write ``episodes`` (a store, or any episodes) as a Minari dataset (arrow format) named ``dataset_id``.

    ``actions`` maps stored actions to env actions (the Q-Transformer: bins to values). ``texts``
    names string attributes to keep (an instruction): observations then become Dicts of the array
    and those texts. ``env`` (an Env, an id or an EnvSpec) defaults to a store's env id; ``metadata``
    goes to ``minari.create_dataset_from_buffers`` (``algorithm_name``, ``author``, ...).
    """
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    if isinstance(episodes, EpisodeStore):
        env = env if env is not None else episodes.env_id
        episodes = episodes.episodes()
    if env is None:
        raise ValueError("env: the episodes name no env id; pass env=")

    def observations(episode: Episode) -> Any:
        if not texts:
            return episode.observations
        missing = [name for name in texts if not isinstance(episode.attributes.get(name), str)]
        if missing:
            raise ValueError(f"texts: episodes have no string attribute(s) {missing}")
        steps = len(episode.observations)
        return {OBSERVATION_KEY: episode.observations} | {name: [episode.attributes[name]] * steps for name in texts}

    buffers = [
        EpisodeBuffer(
            id=index,
            observations=observations(episode),
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
    if texts:
        made = gym.make(env) if isinstance(env, str) else env
        text = gym.spaces.Text(max_length=256, charset=_printable())
        metadata["observation_space"] = gym.spaces.Dict(
            {OBSERVATION_KEY: made.observation_space} | {name: text for name in texts}
        )
    metadata.setdefault("algorithm_name", "quintet")
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, data_format="arrow", **metadata)


def _printable() -> str:
    import string

    return "".join(sorted(set(string.printable) - set("\t\n\r\x0b\x0c")))
