"""Instruction following, measured: success rates of a greedy Q-Transformer on held-out BabyAI seeds.

- ``eval_success_rate`` (and per instruction family): the instruction the env checks is the one the
  policy reads; ``eval_success_rate_guided``: the same with classifier-free guidance on it.
- ``eval_success_rate_shuffled``: the policy reads another instruction of the same family (from the
  training data) while the env checks the real one: how much success comes from reading it.
- ``eval_success_rate_other_goal``: the same start, the instruction retargeted to another object of
  the scene (the env checks that one): do different words lead to the other goal.
- ``eval_deadlock_rate``: the share of right-instruction episodes that failed stuck, their view
  unchanged over the last :data:`DEADLOCK_STEPS` steps: a greedy policy repeating an action that does
  nothing (moving into an object), which a memoryless deterministic policy repeats until time runs out.
- ``data_success_rate`` (and per family): the offline data's own success rate, for comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from quintet.qtransformer.babyai import family_of
from quintet.qtransformer.data import ActionDiscretiser, Episode, ReplayDataset, rollout
from quintet.qtransformer.envs import EVAL_SEED, greedy_policy
from quintet.qtransformer.model import QTransformer
from quintet.qtransformer.presets import BabyAISettings

Featurizer = Callable[[list[str]], torch.Tensor]
DEADLOCK_STEPS = 3
"""a failed episode whose last this many observations are one view is deadlocked (more than the frames
a policy stacks: it saw the same input and will act the same way again)"""


def family_key(family: str) -> str:
    """A family as it appears in metric names: ``"go to"`` -> ``"go_to"``."""
    return family.replace(" ", "_")


@dataclass
class SuccessRates:
    overall: float
    by_family: dict[str, float]
    episodes: list[Episode]
    deadlocked: float = 0.0

    @classmethod
    def of(cls, episodes: list[Episode], families: Sequence[str]) -> SuccessRates:
        """Success (a positive return: BabyAI rewards only success) overall and per family, and the share
        of deadlocked failures."""
        success = np.array([episode.raw_return > 0 for episode in episodes])
        families = np.asarray(families)
        by_family = {f: float(success[families == f].mean()) for f in sorted(set(families.tolist()))}
        stuck = [not ok and deadlocked(episode) for ok, episode in zip(success, episodes)]
        overall = float(success.mean())
        return cls(overall=overall, by_family=by_family, episodes=episodes, deadlocked=float(np.mean(stuck)))


def deadlocked(episode: Episode) -> bool:
    """Whether the episode's last :data:`DEADLOCK_STEPS` observations are the same view."""
    last = episode.observations[-DEADLOCK_STEPS:]
    return len(last) == DEADLOCK_STEPS and all(np.array_equal(last[0], view) for view in last[1:])


def data_success(dataset: ReplayDataset) -> SuccessRates:
    """The offline data's own success rates (its episodes grouped by their instruction's family)."""
    families = [family_of(text) for text in dataset.instructions()]
    success = dataset.episode_returns() > 0
    by_family = {f: float(success[np.array(families) == f].mean()) for f in sorted(set(families))}
    return SuccessRates(overall=float(success.mean()), by_family=by_family, episodes=[])


def instruction_pool(dataset: ReplayDataset) -> dict[str, list[str]]:
    """The distinct instructions of a dataset by family: what a shuffled instruction is drawn from."""
    pool: dict[str, set[str]] = {}
    for text in dataset.instructions():
        pool.setdefault(family_of(text), set()).add(text)
    return {family: sorted(texts) for family, texts in pool.items()}


def evaluate_instructed(
    model: QTransformer,
    rl: BabyAISettings,
    instructions: Featurizer,
    *,
    episodes: int | None = None,
    seed: int = EVAL_SEED,
    cond_scale: float = 1.0,
    goal: Literal["instructed", "other"] = "instructed",
    shown: Literal["right", "shuffled"] = "right",
    pool: dict[str, list[str]] | None = None,
) -> SuccessRates:
    """Greedy episodes on seeds ``seed, seed + 1, ...`` (held out from the data's ``0, 1, ...``).

    ``goal="other"`` retargets each start's instruction to another object; ``shown="shuffled"`` lets
    the policy read another instruction of the family from ``pool`` (the env checks the real one).
    """
    n = rl.eval_episodes if episodes is None else episodes
    if shown == "shuffled" and not pool:
        raise ValueError("pool: a shuffled evaluation draws its instructions from a pool by family")
    from quintet.qtransformer.babyai_env import make_envs

    envs = make_envs(rl.world, min(rl.collect_envs, n))

    def attributes(observation: np.ndarray, info: dict) -> dict:
        mission, family = info["mission"], info["family"]
        read = mission
        if shown == "shuffled":
            others = [text for text in pool.get(family, []) if text != mission]
            if others:
                read = others[int(np.random.default_rng((info["seed"], 1)).integers(len(others)))]
        return {"instruction": mission, "family": family, "shown": read}

    policy = greedy_policy(model, instructions=instructions, cond_scale=cond_scale, instruction_key="shown")
    played = rollout(
        envs,
        policy,
        n,
        discretiser=ActionDiscretiser.from_space(envs[0].action_space),
        seed=seed,
        frames=model.config.frames,
        attributes=attributes,
        policy_sees_attributes=True,
        reset_options={"goal": goal},
    )
    return SuccessRates.of(played, [episode.attributes["family"] for episode in played])


def instructed_metrics(
    model: QTransformer, rl: BabyAISettings, instructions: Featurizer, dataset: ReplayDataset
) -> tuple[dict[str, float], SuccessRates]:
    """Every success rate of the module docstring, by its stable name; and the right-instruction episodes."""
    pool = instruction_pool(dataset)
    right = evaluate_instructed(model, rl, instructions)
    metrics = {"eval_success_rate": right.overall}
    metrics |= {f"eval_success_rate_{family_key(f)}": rate for f, rate in right.by_family.items()}
    metrics["eval_return_mean"] = float(np.mean([e.raw_return for e in right.episodes]))
    metrics["eval_deadlock_rate"] = right.deadlocked
    guided = evaluate_instructed(model, rl, instructions, cond_scale=rl.guided_scale)
    shuffled = evaluate_instructed(model, rl, instructions, shown="shuffled", pool=pool)
    metrics["eval_success_rate_guided"] = guided.overall
    metrics["eval_success_rate_shuffled"] = shuffled.overall
    metrics["eval_success_rate_other_goal"] = evaluate_instructed(model, rl, instructions, goal="other").overall
    data = data_success(dataset)
    metrics["data_success_rate"] = data.overall
    metrics |= {f"data_success_rate_{family_key(f)}": rate for f, rate in data.by_family.items()}
    return metrics, right


def solved_strip(episodes: list[Episode], path: Path, *, max_frames: int = 10) -> tuple[Path, str] | None:
    """A strip of the frames of a solved episode (the longest that fits ``max_frames``) and its instruction."""
    from quintet.data.images import save_image_grid

    solved = [e for e in episodes if e.raw_return > 0 and len(e.observations) <= max_frames]
    if not solved:
        solved = [e for e in episodes if e.raw_return > 0]
    if not solved:
        return None
    episode = max(solved, key=lambda e: (min(len(e.observations), max_frames), e.raw_return))
    frames = episode.observations[:max_frames]
    return save_image_grid(frames, path, nrow=len(frames)), str(episode.attributes["instruction"])
