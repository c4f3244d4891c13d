"""Gymnasium environments and the policies that act in them: greedy / epsilon-greedy Q-Transformer,
uniform random, and gymnasium's LunarLander heuristic with action noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quintet.qtransformer.data import ActionDiscretiser, Episode, ReplayDataset, RewardScaler
from quintet.qtransformer.model import QTransformer
from quintet.qtransformer.presets import RLSettings

EVAL_SEED = 10_000
"""evaluation episodes use seeds from here on, apart from the seeds that collected the data"""


def make_env(env_id: str, count: int = 1) -> list:
    import gymnasium as gym

    return [gym.make(env_id) for _ in range(count)]


def greedy_policy(model: QTransformer, *, epsilon: float = 0.0, generator: torch.Generator | None = None):
    """A ``Policy`` (numpy observations ``(k, s)`` -> bins ``(k, d)``) acting with one frame."""

    device = next(model.parameters()).device

    def policy(observations: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=device)[:, None]
        if epsilon > 0:
            bins = model.get_actions(obs, epsilon, generator=generator)
        else:
            bins = model.get_optimal_actions(obs)
        return bins.reshape(len(observations), -1).cpu().numpy()

    return policy


def random_policy(discretiser: ActionDiscretiser, rng: np.random.Generator):
    return lambda observations: rng.integers(0, discretiser.bins, size=(len(observations), discretiser.num_actions))


def lunar_heuristic_policy(env, noise: float, rng: np.random.Generator, discretiser: ActionDiscretiser):
    """Gymnasium's built-in LunarLander controller, with Gaussian action noise of std ``noise``.

    The controller reads the env only for its action kind, so one env serves envs stepped in lockstep.
    """
    from gymnasium.envs.box2d.lunar_lander import heuristic

    def policy(observations: np.ndarray) -> np.ndarray:
        actions = np.stack([heuristic(env.unwrapped, o) for o in observations]).astype(np.float64)
        actions = np.clip(actions + noise * rng.standard_normal(actions.shape), -1.0, 1.0)
        return discretiser.to_bins(actions)

    return policy


def write_dataset(path: Path, episodes: list[Episode], rl: RLSettings, discretiser: ActionDiscretiser) -> ReplayDataset:
    """``episodes`` as a ReplayDataset with the preset's reward scaling, discount and n-step windows."""
    return ReplayDataset.write(
        path,
        episodes,
        reward_scaler=RewardScaler.for_discount(rl.reward_low, rl.reward_high, rl.gamma),
        gamma=rl.gamma,
        action_bins=discretiser.bins,
        discretiser=discretiser,
        env_id=rl.env_id,
        n_step=rl.n_step,
    )
