"""The Q-Transformer as a registered system: presets, the Trainer task (offline or online-offline), the demo."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from quintet.qtransformer.config import QTransformerConfig
from quintet.qtransformer.data import ReplayDataset, evaluate
from quintet.qtransformer.datasets import babyai_dataset, offline_dataset
from quintet.qtransformer.demo import METRIC_MEANINGS, demo_runs, demo_section
from quintet.qtransformer.envs import EVAL_SEED, greedy_policy, make_env, reward_scaler
from quintet.qtransformer.flops import training_step_flops
from quintet.qtransformer.instructed import Featurizer, evaluate_instructed, instructed_metrics, solved_strip
from quintet.qtransformer.instructions import HFSentenceEncoder
from quintet.qtransformer.learner import QLearner
from quintet.qtransformer.model import QTransformer
from quintet.qtransformer.online import OnlineReplay
from quintet.qtransformer.presets import BabyAISettings, RLSettings, qtransformer_presets
from quintet.registry import DemoRun, Preset, System, TaskRequest
from quintet.training.pipeline import RunResult
from quintet.training.task import ReportSection, SampleFolder, Task, TrainSettings


class QTransformerSystem(System):
    name = "qtransformer"
    description = "Q-Transformer (Chebotar et al. 2023): offline RL with per-dimension autoregressive Q-functions"
    model_classes = (QTransformer,)
    # three environments: CartPole collects its own data while it learns, LunarLander and BabyAI (pixels +
    # instructions) learn offline
    demo_budget_share = 3.5  # ~400 s: CartPole (stops once solved, ~75 s), then LunarLander and BabyAI share the rest
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
        if config.instruction_encoder is not None:
            vocab, words = config.instruction_encoder.vocab_size, config.instruction_encoder.max_words
            batch["text_ids"] = torch.randint(2, vocab, (batch_size, words), generator=generator)
        elif config.condition_on_text:
            batch["text_embeds"] = torch.randn(batch_size, config.text_embed_dim, generator=generator)
        return batch

    def generate(self, model: QTransformer, batch: dict, *, use_cache: bool) -> torch.Tensor:
        return model.get_optimal_actions(
            batch["obs"], text_embeds=batch.get("text_embeds"), text_ids=batch.get("text_ids"), use_cache=use_cache
        )

    def make_task(self, request: TaskRequest) -> Task:
        """Train on the ReplayDataset folder ``request.data``; without it on the preset's own data: CartPole's
        online-offline rounds (collected in the run folder), or a generated offline dataset (the noisy
        LunarLander heuristic, the noisy BabyAI bot, or random episodes), generated when training starts
        and cached. BabyAI presets read each episode's ``instruction``."""
        rl: RLSettings = request.preset.recipe
        config = request.stage.model_config
        model = self.task_model(request)
        instructions = instruction_featurizer(rl, model) if isinstance(rl, BabyAISettings) else None
        if request.data is not None:
            source = ReplayDataset(request.data, frames=config.frames, n_step=rl.n_step, instructions=instructions)
        elif rl.steps_per_round:
            source = OnlineReplay(model, rl, seed=request.settings.seed, instructions=instructions)
        elif isinstance(rl, BabyAISettings):
            source = functools.cache(lambda: babyai_dataset(rl, config, instructions=instructions))
        else:
            source = functools.cache(lambda: offline_dataset(rl, config, request.preset.name))
        return build_task(model, source, rl, request.settings, instructions=instructions)

    def demo_runs(self, *, quick: bool) -> list[DemoRun]:
        return demo_runs(self.presets(), quick=quick)

    def demo_section(self, runs: list[RunResult], *, out_dir: Path, quick: bool) -> ReportSection:
        return demo_section(runs, out_dir=Path(out_dir))


def instruction_featurizer(rl: BabyAISettings, model: QTransformer) -> Featurizer:
    """How a BabyAI preset's instructions reach the model: its own instruction encoder's word ids, or the
    embeddings of the frozen Hugging Face encoder ``rl.text_encoder``."""
    config = model.config
    if rl.text_encoder is None:
        if model.instruction_encoder is None:
            raise ValueError("model_config: a BabyAI preset without a text_encoder needs an instruction_encoder")
        return model.instruction_encoder.tokenize
    if config.instruction_encoder is not None or not config.condition_on_text:
        raise ValueError(
            "text_encoder: a Hugging Face encoder feeds text_embeds; the model needs condition_on_text=True "
            "and no instruction_encoder"
        )
    return HFSentenceEncoder(rl.text_encoder, dim=config.text_embed_dim)


def build_task(
    model: QTransformer,
    source: ReplayDataset | OnlineReplay | Callable[[], ReplayDataset],
    rl: RLSettings,
    settings: TrainSettings,
    *,
    instructions: Featurizer | None = None,
) -> Task:
    """The Trainer's task: Q-learning (eq. 1, eq. 2) on a fixed dataset, on an online run's growing one, or
    on a dataset made when training starts (``source`` a function: nothing is generated before then).

    ``instructions`` (BabyAI presets): the featurizer of the data's instructions; evaluation then plays
    BabyAI and reports success rates (:mod:`quintet.qtransformer.instructed`)."""
    online = source if isinstance(source, OnlineReplay) else None
    instructed = isinstance(rl, BabyAISettings)
    if instructed and instructions is None:
        raise ValueError("instructions: a BabyAI preset's task needs the featurizer of its instructions")
    # greedy rollouts need the env's action bins (online and generated data have them, a user's dataset
    # may not) and, for a text-conditioned model, an instruction
    acts = instructed or not model.config.condition_on_text
    # what follows a termination (RewardScaler.terminal_value): generated data is written with the
    # preset's reward scale, a user's dataset says its own
    terminal_value = reward_scaler(rl).terminal_value(rl.gamma)
    if isinstance(source, ReplayDataset):
        check_bins(source, model)
        acts = acts and source.discretiser is not None
        terminal_value = source.spec.terminal_value
        dataset, source = source, lambda: dataset
    offline = None if online is not None else source
    learner = QLearner(
        model,
        gamma=rl.gamma,
        conservative_weight=rl.conservative_weight,
        n_step=rl.n_step,
        target_ema=rl.target_ema,
        terminal_value=terminal_value,
    )

    def train_batch(index: int) -> dict:
        dataset = online.dataset_for(index) if online is not None else offline()
        rng = np.random.default_rng((settings.seed, index))
        return dataset.sample(settings.batch_size, rng)

    outputs = SampleFolder("qtransformer")

    def start(run) -> None:
        act_under_fsdp(model)
        outputs.start(run)
        if online is not None:
            online.start(run)
        else:
            check_bins(offline(), model)  # the dataset is generated (or opened) before the clock starts

    def current_data() -> ReplayDataset:
        return online.dataset if online is not None and online.dataset is not None else offline()

    def evaluate_model(module: torch.nn.Module) -> dict[str, float]:
        if instructed:
            metrics, _ = instructed_metrics(unwrap(module, model), rl, instructions, current_data())
            return metrics
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

    def sample(module: torch.nn.Module) -> dict:
        """A solved held-out episode's frames with its instruction; the success rates by family beside."""
        right = evaluate_instructed(unwrap(module, model), rl, instructions)
        strip = solved_strip(right.episodes, outputs.path("solved_episode.png"))
        result = {"success_rate": round(right.overall, 3), "by_family": right.by_family}
        if strip is not None:
            result |= {"images": [str(strip[0])], "instruction": strip[1]}
        return result

    return Task(
        model=model,
        loss=lambda module, batch: learner.loss(batch, module),
        train_batch=train_batch,
        settings=settings,
        evaluate=evaluate_model if acts else None,
        sample=sample if instructed else None,
        extra_state={"target": learner.target},
        after_step=lambda step: learner.update_target(),
        batch_flops=lambda batch: training_step_flops(model.config, batch),
        start=start,
        stop_when=stop_when if rl.target_return is not None else None,
    )


def act_under_fsdp(model: QTransformer) -> None:
    """Under FSDP (sharded ``DTensor`` parameters) the acting methods gather the weights as ``forward``
    does: collection rounds and evaluations act on every rank in lockstep."""
    if any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        for name in ("get_actions", "get_optimal_actions"):
            register_fsdp_forward_method(model, name)


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
