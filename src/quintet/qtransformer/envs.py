"""Gymnasium environments and the policies that act in them: greedy / epsilon-greedy Q-Transformer,
uniform random, and gymnasium's LunarLander heuristic with action noise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from quintet.data.rollouts import make_env as make_env  # re-exported: system, online and demo import it here
from quintet.qtransformer.data import ActionDiscretiser, Episode, ReplayDataset, ReplaySpec, RewardScaler
from quintet.qtransformer.model import QTransformer
from quintet.qtransformer.presets import RLSettings

EVAL_SEED = 10_000
"""evaluation episodes use seeds from here on, apart from the seeds that collected the data"""


def model_observations(model: QTransformer, observations: np.ndarray) -> torch.Tensor:
    """Environment observations as the model takes them, converted as :class:`ReplayDataset` batches are.

    States ``(k, s)`` or stacked ``(k, f, s)`` -> ``(k, f, s)``; images ``(k, c, h, w)`` or stacked
    ``(k, f, c, h, w)`` -> ``(k, c, f, h, w)``, uint8 pixels scaled to [0, 1].
    """
    obs = torch.as_tensor(np.asarray(observations))
    obs = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.float()
    single_frame_ndim = 4 if model.config.is_image else 2
    if obs.ndim == single_frame_ndim:
        obs = obs[:, None]
    elif obs.ndim != single_frame_ndim + 1:
        kind = "images (k, [f,] c, h, w)" if model.config.is_image else "states (k, [f,] s)"
        raise ValueError(f"observations: expected {kind}, got shape {tuple(obs.shape)}")
    if model.config.is_image:
        obs = obs.permute(0, 2, 1, 3, 4)
    return obs.to(next(model.parameters()).device)


def greedy_policy(
    model: QTransformer,
    *,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
    instructions: Callable[[list[str]], torch.Tensor] | None = None,
    cond_scale: float = 1.0,
    instruction_key: str = "instruction",
):
    """A ``Policy`` (observations ``(k, [frames,] ...)`` -> bins ``(k, d)``): greedy, or epsilon-greedy.

    A text-conditioned model needs ``instructions``, the featurizer its data used (``model.tokenize``
    -> ``text_ids``, or a frozen sentence encoder -> ``text_embeds``): the policy is then called as
    ``policy(observations, attributes)`` (``rollout(..., policy_sees_attributes=True)``) and reads each
    row's instruction from ``attributes[i][instruction_key]``; ``cond_scale`` guides on it.
    """
    if model.config.condition_on_text and instructions is None:
        raise ValueError("instructions: the model is text-conditioned; pass the featurizer of its instructions")
    if not model.config.condition_on_text and instructions is not None:
        raise ValueError("instructions: the model is not text-conditioned (condition_on_text=False)")

    def policy(observations: np.ndarray, attributes: list[dict] | None = None) -> np.ndarray:
        obs = model_observations(model, observations)
        text = {}
        if instructions is not None:
            if attributes is None or len(attributes) != len(observations):
                raise ValueError("attributes: a text-conditioned policy needs each row's episode attributes")
            features = instructions([str(a[instruction_key]) for a in attributes]).to(obs.device)
            text = {"text_embeds" if features.is_floating_point() else "text_ids": features}
        if epsilon > 0:
            bins = model.get_actions(obs, epsilon, generator=generator, cond_scale=cond_scale, **text)
        else:
            bins = model.get_optimal_actions(obs, cond_scale=cond_scale, **text)
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


def reward_scaler(rl: RLSettings) -> RewardScaler:
    """A preset's reward scale: ``[reward_low, reward_high]`` onto ``[0, 1 - gamma]`` (returns within [0, 1]),
    onto [0, 1] for success rewards (``sparse_rewards``), or its ``return_range`` onto [0, 1]."""
    if rl.sparse_rewards:
        return RewardScaler(low=rl.reward_low, high=rl.reward_high, scale=1.0)
    if rl.return_range is not None:
        return RewardScaler.for_returns(*rl.return_range, rl.gamma, clip=(rl.reward_low, rl.reward_high))
    return RewardScaler.for_discount(rl.reward_low, rl.reward_high, rl.gamma)


def replay_spec(rl: RLSettings, discretiser: ActionDiscretiser) -> ReplaySpec:
    """How a preset's episodes are written: its reward scaling and discount, the env's action bins."""
    return ReplaySpec.for_discretiser(discretiser, reward_scaler(rl), rl.gamma, env_id=rl.env_id)


def write_dataset(
    path: Path,
    episodes: list[Episode],
    rl: RLSettings,
    discretiser: ActionDiscretiser,
    *,
    frames: int = 1,
    instructions: Callable[[list[str]], torch.Tensor] | None = None,
) -> ReplayDataset:
    """``episodes`` as a ReplayDataset with the preset's spec, opened to stack ``frames`` observations
    per sample with the preset's n-step windows (and its ``instructions`` featurizer)."""
    spec = replay_spec(rl, discretiser)
    return ReplayDataset.write(path, episodes, spec, frames=frames, n_step=rl.n_step, instructions=instructions)
