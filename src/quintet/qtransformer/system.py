"""The Q-Transformer as a registered system: presets, the Trainer task (offline or online-offline), the demo."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from quintet.qtransformer.config import QTransformerConfig
from quintet.qtransformer.data import ReplayDataset, evaluate
from quintet.qtransformer.datasets import offline_dataset
from quintet.qtransformer.demo import METRIC_MEANINGS, demo_runs, demo_section
from quintet.qtransformer.envs import EVAL_SEED, greedy_policy, make_env
from quintet.qtransformer.learner import QLearner
from quintet.qtransformer.model import QTransformer
from quintet.qtransformer.online import OnlineReplay
from quintet.qtransformer.presets import RLSettings, qtransformer_presets
from quintet.registry import DemoRun, Preset, System, TaskRequest
from quintet.training.pipeline import RunResult
from quintet.training.task import ReportSection, Task, TrainSettings


class QTransformerSystem(System):
    name = "qtransformer"
    description = "Q-Transformer (Chebotar et al. 2023): offline RL with per-dimension autoregressive Q-functions"
    model_classes = (QTransformer,)
    # two environments, one of which collects its own data while it learns
    demo_budget_share = 2.25
    metric_meanings = METRIC_MEANINGS

    def presets(self) -> dict[str, Preset]:
        return qtransformer_presets(self.name)

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

    def generate(self, model: QTransformer, batch: dict, *, use_cache: bool) -> torch.Tensor:
        return model.get_optimal_actions(batch["obs"], text_embeds=batch.get("text_embeds"), use_cache=use_cache)

    def make_task(self, request: TaskRequest) -> Task:
        """Train on the ReplayDataset folder ``request.data``; without it on the preset's own data: CartPole's
        online-offline rounds (collected in the run folder), or a generated offline dataset (the noisy
        LunarLander heuristic, or random episodes), generated when training starts and cached."""
        rl: RLSettings = request.preset.recipe
        config = request.stage.model_config
        model = self.task_model(request)
        if request.data is not None:
            source = ReplayDataset(request.data, frames=config.frames, n_step=rl.n_step)
        elif rl.steps_per_round:
            source = OnlineReplay(model, rl, seed=request.settings.seed)
        else:
            source = functools.cache(lambda: offline_dataset(rl, config, request.preset.name))
        return build_task(model, source, rl, request.settings)

    def demo_runs(self, *, quick: bool) -> list[DemoRun]:
        return demo_runs(self.presets())

    def demo_section(self, runs: list[RunResult], *, out_dir: Path, quick: bool) -> ReportSection:
        return demo_section(runs, out_dir=Path(out_dir))


def build_task(
    model: QTransformer,
    source: ReplayDataset | OnlineReplay | Callable[[], ReplayDataset],
    rl: RLSettings,
    settings: TrainSettings,
) -> Task:
    """The Trainer's task: Q-learning (eq. 1, eq. 2) on a fixed dataset, on an online run's growing one, or
    on a dataset made when training starts (``source`` a function: nothing is generated before then)."""
    online = source if isinstance(source, OnlineReplay) else None
    # greedy rollouts need the env's action bins (online and generated data have them, a user's dataset
    # may not) and, for a text-conditioned model, an instruction
    acts = not model.config.condition_on_text
    if isinstance(source, ReplayDataset):
        check_bins(source, model)
        acts = acts and source.discretiser is not None
        dataset, source = source, lambda: dataset
    offline = None if online is not None else source
    learner = QLearner(
        model,
        gamma=rl.gamma,
        conservative_weight=rl.conservative_weight,
        n_step=rl.n_step,
        target_ema=rl.target_ema,
    )

    def train_batch(index: int) -> dict:
        dataset = online.dataset_for(index) if online is not None else offline()
        rng = np.random.default_rng((settings.seed, index))
        return dataset.sample(settings.batch_size, rng)

    def start(run) -> None:
        if online is not None:
            online.start(run)
        else:
            check_bins(offline(), model)  # the dataset is generated (or opened) before the clock starts

    def evaluate_model(module: torch.nn.Module) -> dict[str, float]:
        envs = make_env(rl.env_id, rl.eval_episodes)
        discretiser = online.discretiser if online is not None else offline().discretiser
        returns = evaluate(
            envs,
            greedy_policy(unwrap(module, model)),
            rl.eval_episodes,
            discretiser=discretiser,
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
        evaluate=evaluate_model if acts else None,
        extra_state={"target": learner.target},
        after_step=lambda step: learner.update_target(),
        start=start,
        stop_when=stop_when if rl.target_return is not None else None,
    )


def check_bins(dataset: ReplayDataset, model: QTransformer) -> None:
    if (dataset.num_actions, dataset.action_bins) != (model.config.num_actions, model.config.action_bins):
        raise ValueError(
            f"data: dataset has {dataset.num_actions} x {dataset.action_bins} bins, the model "
            f"{model.config.num_actions} x {model.config.action_bins}"
        )


def unwrap(module: torch.nn.Module, default: QTransformer) -> QTransformer:
    """The QTransformer inside an EMA (``.module``) or compiled (``._orig_mod``) wrapper."""
    while not isinstance(module, QTransformer):
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return default
        module = inner
    return module
