"""The Q-Transformer as a registered system: presets, the Trainer task, the online-offline loop, the demo."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quintet.data import cache_dir
from quintet.qtransformer.config import QTransformerConfig
from quintet.qtransformer.data import (
    ActionDiscretiser,
    Episode,
    ReplayDataset,
    RewardScaler,
    evaluate,
    rollout,
)
from quintet.qtransformer.learner import QLearner
from quintet.qtransformer.model import QTransformer
from quintet.qtransformer.presets import CARTPOLE, LUNARLANDER, RL_SETTINGS, TINY, TRAIN_SETTINGS, RLSettings
from quintet.registry import Preset, System, register
from quintet.training.task import ReportSection, Task, TrainSettings

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


def lunarlander_dataset(settings: RLSettings, action_bins: int, *, seed: int = 0) -> ReplayDataset:
    """The fixed offline dataset: noisy heuristic-controller episodes, generated once and cached."""
    path = cache_dir() / f"lunarlander-heuristic-{settings.dataset_episodes}-noise{settings.action_noise}-seed{seed}"
    if (path / "meta.json").is_file():
        return ReplayDataset(path, n_step=settings.n_step)
    envs = make_env(settings.env_id, 8)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, action_bins)
    rng = np.random.default_rng(seed)
    policy = lunar_heuristic_policy(envs[0], settings.action_noise, rng, discretiser)
    episodes = rollout(envs, policy, settings.dataset_episodes, discretiser=discretiser, seed=seed)
    return ReplayDataset.write(
        path,
        episodes,
        reward_scaler=RewardScaler.for_discount(settings.reward_low, settings.reward_high, settings.gamma),
        gamma=settings.gamma,
        action_bins=action_bins,
        discretiser=discretiser,
        env_id=settings.env_id,
        n_step=settings.n_step,
    )


class QTransformerSystem(System):
    name = "qtransformer"
    description = "Q-Transformer (Chebotar et al. 2023): offline RL with per-dimension autoregressive Q-functions"
    model_class = QTransformer

    def __init__(self) -> None:
        self._learners: weakref.WeakKeyDictionary[QTransformer, QLearner] = weakref.WeakKeyDictionary()

    def presets(self) -> dict[str, Preset]:
        return {
            "tiny": Preset(
                system=self.name,
                name="tiny",
                description="smallest 2-dimension model, for tests",
                data="random transitions",
                expected_minutes=0.01,
                model_config=TINY,
                settings=TRAIN_SETTINGS["tiny"],
            ),
            "cartpole": Preset(
                system=self.name,
                name="cartpole",
                description="CartPole-v1; the demo collects epsilon-greedily and trains in rounds to return >= 475",
                data="CartPole-v1: `quintet train` uses 20 random episodes (or --data); the demo collects online",
                expected_minutes=10.0,
                model_config=CARTPOLE,
                settings=TRAIN_SETTINGS["cartpole"],
            ),
            "demo": Preset(
                system=self.name,
                name="demo",
                description="the demo's first part: the cartpole preset's online-offline rounds",
                data="CartPole-v1 (gymnasium), collected online",
                expected_minutes=10.0,
                model_config=CARTPOLE,
                settings=TRAIN_SETTINGS["demo"],
            ),
            "lunarlander-offline": Preset(
                system=self.name,
                name="lunarlander-offline",
                description="LunarLanderContinuous, 2 dims x 32 bins, offline from 300 noisy heuristic episodes",
                data="LunarLanderContinuous-v3 episodes of the gymnasium heuristic with action noise",
                expected_minutes=10.0,
                model_config=LUNARLANDER,
                settings=TRAIN_SETTINGS["lunarlander-offline"],
            ),
        }

    def rl_settings(self, preset: Preset) -> RLSettings:
        return RL_SETTINGS[preset.name]

    def learner(self, model: QTransformer, settings: RLSettings | None = None) -> QLearner:
        if model not in self._learners:
            settings = settings or RL_SETTINGS["tiny"]
            self._learners[model] = QLearner(
                model,
                gamma=settings.gamma,
                conservative_weight=settings.conservative_weight,
                n_step=settings.n_step,
                target_ema=settings.target_ema,
            )
        return self._learners[model]

    def example_batch(self, model: QTransformer, *, batch_size: int, generator: torch.Generator) -> dict:
        config: QTransformerConfig = model.config
        if config.is_image:
            size = config.encoder.downsample * config.encoder.window_size
            obs_shape = (batch_size, config.encoder.channels, config.frames, size, size)
        else:
            obs_shape = (batch_size, config.frames, config.encoder.state_dim)
        action_shape = (batch_size,) if config.num_actions == 1 else (batch_size, config.num_actions)
        batch = {
            "obs": torch.randn(obs_shape, generator=generator),
            "actions": torch.randint(config.action_bins, action_shape, generator=generator),
            "rewards": torch.rand(batch_size, generator=generator) * 0.02,
            "next_obs": torch.randn(obs_shape, generator=generator),
            "dones": torch.rand(batch_size, generator=generator) < 0.2,
            "returns_to_go": torch.rand(batch_size, generator=generator) * 0.5,
        }
        if config.condition_on_text:
            batch["text_embeds"] = torch.randn(batch_size, config.text_embed_dim, generator=generator)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.learner(model).loss(batch)

    def generate(self, model: QTransformer, batch: dict, *, use_cache: bool) -> torch.Tensor:
        return model.get_optimal_actions(batch["obs"], text_embeds=batch.get("text_embeds"), use_cache=use_cache)

    def make_task(self, preset: Preset, *, data: str | None = None, settings: TrainSettings | None = None) -> Task:
        """Train ``preset`` offline on the ReplayDataset folder ``data`` (default: the preset's dataset:
        the noisy-heuristic LunarLander episodes, or random CartPole episodes)."""
        settings = settings or preset.settings
        rl = RL_SETTINGS[preset.name]
        if data is not None:
            dataset = ReplayDataset(data, frames=preset.model_config.frames, n_step=rl.n_step)
        elif preset.name == "lunarlander-offline":
            dataset = lunarlander_dataset(rl, preset.model_config.action_bins)
        else:
            dataset = random_dataset(rl, preset.model_config, cache_dir() / f"{preset.name}-random")
        model = self.build_model(preset)
        return build_task(model, dataset, rl, settings)

    def demo(self, out_dir: Path, *, budget_s: float, quick: bool = False) -> ReportSection:
        from quintet.qtransformer.demo import run_demo

        return run_demo(self, Path(out_dir), budget_s=budget_s, quick=quick)


def random_dataset(rl: RLSettings, config: QTransformerConfig, path: Path, *, episodes: int = 20, seed: int = 0):
    envs = make_env(rl.env_id, 4)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, config.action_bins)
    collected = rollout(
        envs, random_policy(discretiser, np.random.default_rng(seed)), episodes, discretiser=discretiser
    )
    return write_dataset(path, collected, rl, discretiser)


def write_dataset(path: Path, episodes: list[Episode], rl: RLSettings, discretiser: ActionDiscretiser):
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


def build_task(
    model: QTransformer,
    dataset: ReplayDataset,
    rl: RLSettings,
    settings: TrainSettings,
    *,
    learner: QLearner | None = None,
) -> Task:
    if dataset.num_actions != model.config.num_actions or dataset.action_bins != model.config.action_bins:
        raise ValueError(
            f"data: dataset has {dataset.num_actions} x {dataset.action_bins} bins, the model "
            f"{model.config.num_actions} x {model.config.action_bins}"
        )
    learner = learner or QLearner(
        model,
        gamma=rl.gamma,
        conservative_weight=rl.conservative_weight,
        n_step=rl.n_step,
        target_ema=rl.target_ema,
    )

    def train_batch(index: int) -> dict:
        rng = np.random.default_rng((settings.seed, index))
        return dataset.sample(settings.batch_size, rng)

    def evaluate_model(module: torch.nn.Module) -> dict[str, float]:
        envs = make_env(rl.env_id, rl.eval_episodes)
        returns = evaluate(
            envs,
            greedy_policy(unwrap(module, model)),
            rl.eval_episodes,
            discretiser=dataset.discretiser,
            seed=EVAL_SEED,
        )
        return {"eval_return_mean": float(returns.mean()), "eval_return_std": float(returns.std())}

    return Task(
        model=model,
        loss=lambda module, batch: learner.loss(batch, module),
        train_batch=train_batch,
        settings=settings,
        evaluate=evaluate_model if dataset.discretiser is not None else None,
        extra_state={"target": learner.target},
        after_step=lambda step: learner.update_target(),
    )


def unwrap(module: torch.nn.Module, default: QTransformer) -> QTransformer:
    """The QTransformer inside an EMA (``.module``) or compiled (``._orig_mod``) wrapper."""
    while not isinstance(module, QTransformer):
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return default
        module = inner
    return module


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_returns: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def optimise(task: Task, steps: int, *, optimizer: torch.optim.Optimizer, start: int = 0, log: TrainLog | None = None):
    """Plain optimisation of ``task`` for ``steps`` steps (AdamW + clipping); the online-offline loop
    retrains on a growing dataset between collection rounds, which a fixed Trainer run does not do."""
    task.model.train()
    for step in range(start, start + steps):
        loss, metrics = task.loss(task.model, task.train_batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if task.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(task.model.parameters(), task.settings.grad_clip)
        optimizer.step()
        task.after_step(step)
        if log is not None and step % task.settings.log_every == 0:
            log.steps.append(step)
            log.metrics.append({"loss": float(loss.detach()), **metrics})
    task.model.eval()


@dataclass
class OnlineOfflineResult:
    model: QTransformer
    eval_returns: list[tuple[int, float]]
    """(optimizer step, mean greedy return) after each round"""
    data_returns: list[tuple[int, float]]
    """(optimizer step, mean return of the episodes collected in that round)"""
    losses: list[tuple[int, float]]
    steps: int
    seconds: float
    episodes: int
    reached: bool


def train_online_offline(
    preset: Preset,
    out_dir: Path,
    *,
    budget_s: float,
    target_return: float,
    steps_per_round: int = 500,
    episodes_per_round: int = 10,
    initial_episodes: int = 20,
    epsilon: tuple[float, float] = (0.3, 0.02),
    seed: int = 0,
) -> OnlineOfflineResult:
    """Alternate epsilon-greedy collection and offline training on everything collected so far, until
    the greedy policy's mean return over ``eval_episodes`` seeds reaches ``target_return`` or the
    budget is spent. Epsilon decays linearly from ``epsilon[0]`` to ``epsilon[1]`` over the budget."""
    started = time.perf_counter()
    rl, settings = RL_SETTINGS[preset.name], preset.settings
    torch.manual_seed(seed)
    model = QTransformer(preset.model_config)
    learner = QLearner(
        model, gamma=rl.gamma, conservative_weight=rl.conservative_weight, n_step=rl.n_step, target_ema=rl.target_ema
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
    )
    envs, eval_envs = make_env(rl.env_id, 8), make_env(rl.env_id, rl.eval_episodes)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, preset.model_config.action_bins)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    episodes = rollout(envs, random_policy(discretiser, rng), initial_episodes, discretiser=discretiser, seed=seed)
    next_seed = seed + initial_episodes
    result = OnlineOfflineResult(model, [], [], [], 0, 0.0, 0, False)
    result.data_returns.append((0, float(np.mean([e.raw_return for e in episodes]))))
    log = TrainLog()
    while True:
        dataset = write_dataset(out_dir / "replay", episodes, rl, discretiser)
        task = build_task(model, dataset, rl, settings, learner=learner)
        optimise(task, steps_per_round, optimizer=optimizer, start=result.steps, log=log)
        result.steps += steps_per_round
        returns = evaluate(eval_envs, greedy_policy(model), rl.eval_episodes, discretiser=discretiser, seed=EVAL_SEED)
        result.eval_returns.append((result.steps, float(returns.mean())))
        elapsed = time.perf_counter() - started
        if returns.mean() >= target_return:
            result.reached = True
            break
        if elapsed >= budget_s:
            break
        progress = min(1.0, elapsed / budget_s)
        explore = epsilon[0] + (epsilon[1] - epsilon[0]) * progress
        policy = greedy_policy(model, epsilon=explore, generator=generator)
        new = rollout(envs, policy, episodes_per_round, discretiser=discretiser, seed=next_seed)
        next_seed += episodes_per_round
        episodes += new
        result.data_returns.append((result.steps, float(np.mean([e.raw_return for e in new]))))
    result.losses = [(s, m["loss"]) for s, m in zip(log.steps, log.metrics)]
    result.seconds = time.perf_counter() - started
    result.episodes = len(episodes)
    return result


register(QTransformerSystem())
