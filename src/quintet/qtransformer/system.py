"""The Q-Transformer as a registered system: presets, the Trainer task (offline or online-offline), the demo."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch

from quintet.data import cache_dir
from quintet.qtransformer.config import QTransformerConfig
from quintet.qtransformer.data import META_FILE, ActionDiscretiser, ReplayDataset, evaluate, rollout
from quintet.qtransformer.envs import (
    EVAL_SEED,
    greedy_policy,
    lunar_heuristic_policy,
    make_env,
    random_policy,
    write_dataset,
)
from quintet.qtransformer.learner import QLearner
from quintet.qtransformer.model import QTransformer
from quintet.qtransformer.online import OnlineReplay
from quintet.qtransformer.presets import CARTPOLE, LUNARLANDER, RL_SETTINGS, TINY, TRAIN_SETTINGS, RLSettings
from quintet.registry import Preset, System, register
from quintet.training.task import ReportSection, Task, TrainSettings


def lunarlander_dataset(settings: RLSettings, action_bins: int, *, seed: int = 0, frames: int = 1) -> ReplayDataset:
    """The fixed offline dataset: noisy heuristic-controller episodes, generated once and cached."""
    name = (
        f"lunarlander-heuristic-{settings.dataset_episodes}-noise{settings.action_noise}-bins{action_bins}-seed{seed}"
    )
    path = cache_dir() / name
    if (path / META_FILE).is_file():
        return ReplayDataset(path, frames=frames, n_step=settings.n_step)
    envs = make_env(settings.env_id, settings.collect_envs)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, action_bins)
    policy = lunar_heuristic_policy(envs[0], settings.action_noise, np.random.default_rng(seed), discretiser)
    episodes = rollout(envs, policy, settings.dataset_episodes, discretiser=discretiser, seed=seed)
    return write_dataset(path, episodes, settings, discretiser, frames=frames)


class QTransformerSystem(System):
    name = "qtransformer"
    description = "Q-Transformer (Chebotar et al. 2023): offline RL with per-dimension autoregressive Q-functions"
    model_class = QTransformer
    # two environments, one of which collects its own data while it learns
    demo_budget_share = 2.25

    def __init__(self) -> None:
        self._learners: weakref.WeakKeyDictionary[QTransformer, QLearner] = weakref.WeakKeyDictionary()

    def presets(self) -> dict[str, Preset]:
        return {
            "tiny": Preset(
                system=self.name,
                name="tiny",
                description="smallest model (2 action dimensions, 2 stacked frames), for tests",
                data="4 uniform-random LunarLanderContinuous-v3 episodes",
                expected_minutes=0.01,
                model_config=TINY,
                settings=TRAIN_SETTINGS["tiny"],
            ),
            "cartpole": Preset(
                system=self.name,
                name="cartpole",
                description="CartPole-v1: epsilon-greedy collection rounds + offline training until return >= 475",
                data="CartPole-v1 (gymnasium), collected online into the run folder (or a --data ReplayDataset)",
                expected_minutes=5.0,
                model_config=CARTPOLE,
                settings=TRAIN_SETTINGS["cartpole"],
            ),
            "demo": Preset(
                system=self.name,
                name="demo",
                description="the demo's first part: the cartpole preset under the demo's time budget",
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
        """Train ``preset`` on the ReplayDataset folder ``data``; without it on the preset's own data: the
        noisy-heuristic LunarLander episodes, or CartPole's online-offline rounds (collected in the run
        folder), or random episodes for ``tiny``."""
        settings = settings or preset.settings
        rl = RL_SETTINGS[preset.name]
        model = self.build_model(preset)
        if data is not None:
            source = ReplayDataset(data, frames=preset.model_config.frames, n_step=rl.n_step)
        elif rl.steps_per_round:
            source = OnlineReplay(model, rl, seed=settings.seed)
        elif preset.name == "lunarlander-offline":
            source = lunarlander_dataset(rl, preset.model_config.action_bins, frames=preset.model_config.frames)
        else:
            source = random_dataset(rl, preset.model_config, cache_dir() / f"{preset.name}-random")
        return build_task(model, source, rl, settings)

    def demo(self, out_dir: Path, *, budget_s: float, quick: bool = False) -> ReportSection:
        from quintet.qtransformer.demo import run_demo

        return run_demo(self, Path(out_dir), budget_s=budget_s, quick=quick)


def random_dataset(rl: RLSettings, config: QTransformerConfig, path: Path, *, seed: int = 0) -> ReplayDataset:
    """``rl.initial_episodes`` uniform-random episodes as a ReplayDataset at ``path``."""
    envs = make_env(rl.env_id, rl.collect_envs)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space, config.action_bins)
    policy = random_policy(discretiser, np.random.default_rng(seed))
    episodes = rollout(envs, policy, rl.initial_episodes, discretiser=discretiser)
    return write_dataset(path, episodes, rl, discretiser, frames=config.frames)


def build_task(
    model: QTransformer, source: ReplayDataset | OnlineReplay, rl: RLSettings, settings: TrainSettings
) -> Task:
    """The Trainer's task: Q-learning (eq. 1, eq. 2) on a fixed dataset or on an online run's growing one."""
    if isinstance(source, ReplayDataset) and (source.num_actions, source.action_bins) != (
        model.config.num_actions,
        model.config.action_bins,
    ):
        raise ValueError(
            f"data: dataset has {source.num_actions} x {source.action_bins} bins, the model "
            f"{model.config.num_actions} x {model.config.action_bins}"
        )
    online = source if isinstance(source, OnlineReplay) else None
    learner = QLearner(
        model,
        gamma=rl.gamma,
        conservative_weight=rl.conservative_weight,
        n_step=rl.n_step,
        target_ema=rl.target_ema,
    )

    def train_batch(index: int) -> dict:
        dataset = online.dataset_for(index) if online is not None else source
        rng = np.random.default_rng((settings.seed, index))
        return dataset.sample(settings.batch_size, rng)

    def evaluate_model(module: torch.nn.Module) -> dict[str, float]:
        envs = make_env(rl.env_id, rl.eval_episodes)
        returns = evaluate(
            envs,
            greedy_policy(unwrap(module, model)),
            rl.eval_episodes,
            discretiser=source.discretiser,
            seed=EVAL_SEED,
            frames=model.config.frames,
        )
        return {"eval_return_mean": float(returns.mean()), "eval_return_std": float(returns.std())}

    def stop_when(metrics: dict[str, float]) -> str | None:
        achieved = metrics.get("eval_return_mean", -np.inf)
        return (
            f"greedy return {achieved:.1f} reached the target {rl.target_return:g}"
            if achieved >= rl.target_return
            else None
        )

    return Task(
        model=model,
        loss=lambda module, batch: learner.loss(batch, module),
        train_batch=train_batch,
        settings=settings,
        # greedy rollouts need the env's action bins and, for a text-conditioned model, an instruction
        evaluate=evaluate_model if source.discretiser is not None and not model.config.condition_on_text else None,
        extra_state={"target": learner.target},
        after_step=lambda step: learner.update_target(),
        start=online.start if online is not None else None,
        stop_when=stop_when if rl.target_return is not None else None,
    )


def unwrap(module: torch.nn.Module, default: QTransformer) -> QTransformer:
    """The QTransformer inside an EMA (``.module``) or compiled (``._orig_mod``) wrapper."""
    while not isinstance(module, QTransformer):
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return default
        module = inner
    return module


register(QTransformerSystem())
