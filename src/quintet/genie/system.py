"""The Genie system for the registry: three model classes, their tasks, and the demo section.

Stages: ``tokenizer`` (:class:`FrameTokenizer`), ``latent_actions`` (:class:`LatentActionModel`) and
``dynamics`` (:class:`Genie`, which receives the trained tokenizer, and the latent action model when
it trains on inferred actions). Data is the recipe's recording of the embedded game (made on first
use, cached), or an episode store given with ``--data`` (e.g. written by ``quintet record``).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quintet.genie.config import GenieConfig
from quintet.genie.data import Recorded, load_recording, sample_starts, spread_starts, tokenize_rows
from quintet.genie.dynamics import Genie
from quintet.genie.evaluation import (
    dynamics_metrics,
    eval_batch,
    latent_action_metrics,
    rollout_metrics,
    tokenizer_metrics,
)
from quintet.genie.generation import imagine
from quintet.genie.latent_actions import LatentActionModel, latent_action_loss
from quintet.genie.objectives import ClipBatch, dynamics_loss, training_choices
from quintet.genie.presets import GenieRecipe, genie_presets
from quintet.genie.tokenizer import FrameTokenizer, tokenizer_loss
from quintet.registry import DemoRun, Preset, System, TaskRequest
from quintet.training.pipeline import RunResult
from quintet.training.task import ReportSection, SampleFolder, Task


@functools.lru_cache(maxsize=4)
def _recorded(recording, data: str | None, val_episodes: int) -> Recorded:
    """One opened recording per process, shared by the stages that train on it."""
    return Recorded(load_recording(recording, data), val_episodes)


def _seed(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


class GenieSystem(System):
    name = "genie"
    description = "world model learned from recorded play (Bruce et al. 2024): tokenizer, latent actions, dynamics"
    model_classes = (FrameTokenizer, LatentActionModel, Genie)
    demo_budget_share = 2.0  # ~230 s over the three stages: the world model needs most of it to learn the actions
    metric_meanings = {
        "recon_psnr": "PSNR (dB) of the tokenizer's reconstructions of held-out frames: the ceiling of every "
        "imagined frame (higher is better)",
        "val_loss": "the dynamics objective on held-out clips: cross-entropy of the predicted frame tokens "
        "(maskgit: of the masked ones), nats per token",
        "val_token_accuracy": "fraction of held-out frame tokens the dynamics model predicts exactly",
        "rollout_psnr_k": "PSNR (dB) of k open-loop imagined frames against the real ones, given a few real "
        "frames and then the real actions, averaged over the k frames",
        "rollout_psnr_random": "the same with uniformly random actions instead of the real ones",
        "delta_psnr": "controllability (Genie's delta PSNR): rollout PSNR under the real actions minus under "
        "random ones; above 0 means the actions steer the imagined world",
        "copy_psnr_k": "baseline: PSNR of repeating the last real frame k times (a model that imagines no motion)",
        "latent_action_nmi": "normalized mutual information of latent actions and the true actions of held-out "
        "transitions (0: unrelated, 1: the same labeling)",
        "lam_psnr": "PSNR (dB) of the latent action model's next frame from the current frame and its code",
        "codebook_usage": "fraction of the tokenizer's codes that held-out frames use",
    }

    def presets(self) -> dict[str, Preset]:
        return genie_presets(self.name)

    # ------------------------------------------------------------------ registry hooks

    def example_batch(self, model, *, batch_size: int, generator: torch.Generator) -> Any:
        config = model.config
        if isinstance(model, FrameTokenizer):
            frames = 2 if config.temporal_convs else 1
            return torch.randint(
                0,
                256,
                (batch_size, frames, config.image_channels, *config.image_size),
                generator=generator,
                dtype=torch.uint8,
            )
        if isinstance(model, LatentActionModel):
            return torch.randint(
                0,
                256,
                (batch_size, 3, config.image_channels, *config.image_size),
                generator=generator,
                dtype=torch.uint8,
            )
        frames = min(3, config.max_frames)
        tokens = torch.randint(0, config.num_codes, (batch_size, frames, *config.token_grid), generator=generator)
        actions = None
        if config.has_actions:
            actions = torch.randint(0, config.num_actions, (batch_size, frames - 1), generator=generator)
            if config.max_keys > 1:
                actions = actions[..., None]
        token_mask, hide = training_choices(config, batch_size, frames, generator=generator)
        return ClipBatch(tokens=tokens, actions=actions, token_mask=token_mask, hide_actions=hide)

    def generate(self, model, batch, *, use_cache: bool) -> torch.Tensor | None:
        """Greedy frames imagined after the batch's first frame under its actions."""
        if not isinstance(model, Genie):
            return None
        frames = batch.tokens.shape[1] - 1
        return imagine(model, batch.tokens[:, :1], batch.actions, frames, temperature=0.0, use_cache=use_cache)

    def make_task(self, request: TaskRequest) -> Task:
        recipe = request.preset.recipe or GenieRecipe()
        model = self.task_model(request)
        recorded = functools.partial(_recorded, recipe.recording, request.data, recipe.val_episodes)
        outputs = SampleFolder("genie", subfolder="samples")
        if isinstance(model, FrameTokenizer):
            return self._tokenizer_task(request, recipe, model, recorded, outputs)
        if isinstance(model, LatentActionModel):
            return self._latent_task(request, recipe, model, recorded)
        return self._dynamics_task(request, recipe, model, recorded, outputs)

    # ------------------------------------------------------------------ stage tasks

    def _tokenizer_task(self, request, recipe, model: FrameTokenizer, recorded, outputs) -> Task:
        settings = request.settings
        frames = model.config.temporal_kernel + 1 if model.config.temporal_convs else 1
        starts = functools.cache(lambda: recorded().clip_starts(frames, "train"))

        def held_out() -> torch.Tensor:
            data = recorded()
            chosen = spread_starts(data.clip_starts(frames, "val"), max(1, recipe.eval_frames // frames))
            return data.frames(data.rows(chosen, frames))

        def batch(index: int) -> torch.Tensor:
            data = recorded()
            return data.frames(data.rows(sample_starts(starts(), settings.batch_size, settings.seed, index), frames))

        def sample(trained: FrameTokenizer) -> dict:
            from quintet.data.images import save_image_grid

            real = held_out()[:8].to(next(trained.parameters()).device)
            rebuilt = trained.decode(trained.encode(real))
            grid = torch.cat((real.flatten(0, 1).float() / 255, rebuilt.flatten(0, 1).cpu()))
            return {"images": [str(save_image_grid(grid, outputs.path("reconstructions.png"), nrow=len(grid) // 2))]}

        return Task(
            model=model,
            loss=tokenizer_loss,
            train_batch=batch,
            settings=settings,
            evaluate=lambda trained: tokenizer_metrics(trained, held_out()),
            sample=sample,
            start=outputs.start,
            batch_flops=lambda frames_batch: frames_batch.shape[0] * frames_batch.shape[1] * model.flops_per_frame(),
        )

    def _latent_task(self, request, recipe, model: LatentActionModel, recorded) -> Task:
        settings = request.settings
        starts = functools.cache(lambda: recorded().clip_starts(2, "train"))

        def batch(index: int) -> torch.Tensor:
            data = recorded()
            return data.frames(data.rows(sample_starts(starts(), settings.batch_size, settings.seed, index), 2))

        def evaluate(trained: LatentActionModel) -> dict:
            data = recorded()
            rows = data.rows(spread_starts(data.clip_starts(2, "val"), recipe.eval_frames), 2)
            return latent_action_metrics(trained, data.frames(rows), data.actions(rows)[:, :1])

        return Task(
            model=model,
            loss=latent_action_loss,
            train_batch=batch,
            settings=settings,
            evaluate=evaluate,
            batch_flops=lambda frames: frames.shape[0] * (frames.shape[1] - 1) * model.flops_per_transition(),
        )

    def _dynamics_task(self, request, recipe: GenieRecipe, model: Genie, recorded, outputs) -> Task:
        from quintet.genie import demo

        settings, config = request.settings, model.config
        tokenizer = request.inputs.get("tokenizer")
        latent = request.inputs.get("latent_actions")
        _check_dynamics(config, recipe, tokenizer, latent)
        clip = recipe.clip_frames
        if clip > config.max_frames:
            raise ValueError(f"clip_frames: {clip} exceeds the model's max_frames={config.max_frames}")

        @functools.cache
        def prepared() -> dict[str, Any]:
            data = recorded()
            tokens = tokenize_rows(tokenizer, data)
            actions = _action_source(recipe, data, latent, config)
            # the actions the data holds (random actions for delta_psnr are drawn from these)
            choices = None if actions is None or actions.ndim > 1 else actions.unique()
            return {
                "data": data,
                "tokens": tokens,
                "actions": actions,
                "choices": choices,
                "train": data.clip_starts(clip, "train"),
            }

        def clips(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
            ready = prepared()
            tokens = ready["tokens"][torch.from_numpy(rows)]
            actions = ready["actions"]
            if actions is not None:
                actions = actions[torch.from_numpy(ready["data"].transition_rows(rows))]
            return tokens, actions

        def batch(index: int) -> ClipBatch:
            rows = prepared()["data"].rows(
                sample_starts(prepared()["train"], settings.batch_size, settings.seed, index), clip
            )
            tokens, actions = clips(rows)
            token_mask, hide = training_choices(config, len(rows), clip, generator=_seed(settings.seed, index))
            return ClipBatch(tokens=tokens, actions=actions, token_mask=token_mask, hide_actions=hide)

        def evaluate(trained: Genie) -> dict:
            data = prepared()["data"]
            rows = data.rows(spread_starts(data.clip_starts(clip, "val"), recipe.eval_clips), clip)
            metrics = dynamics_metrics(trained, eval_batch(trained, *clips(rows)))
            span = recipe.context_frames + recipe.rollout_frames
            rows = data.rows(spread_starts(data.clip_starts(span, "val"), recipe.eval_clips), span)
            tokens, actions = clips(rows)
            rollouts = rollout_metrics(
                trained, tokenizer, data.frames(rows), tokens, actions, context=recipe.context_frames
            )
            return {**metrics, **rollouts.metrics}

        return Task(
            model=model,
            loss=lambda module, clips_batch: dynamics_loss(module, config, clips_batch),
            train_batch=batch,
            settings=settings,
            evaluate=evaluate,
            sample=lambda trained: demo.dynamics_samples(trained, tokenizer, recipe, prepared, clips, outputs),
            play=lambda trained, options: demo.play(trained, tokenizer, recipe, prepared, clips, options),
            start=outputs.start,
            batch_tokens=lambda b: b.tokens.shape[0] * (b.tokens.shape[1] - 1) * config.tokens_per_frame,
            batch_flops=lambda b: b.tokens.shape[0] * model.flops_per_clip(b.tokens.shape[1]),
        )

    # ------------------------------------------------------------------ demo

    def demo_runs(self, *, quick: bool) -> list[DemoRun]:
        preset = self.presets()["demo"]
        if quick:  # the essentials on a shorter recording: tokenizer and world model, no latent actions
            recipe = replace(preset.recipe, recording=replace(preset.recipe.recording, episodes=4, max_steps=600))
            stages = tuple(s for s in preset.stages if s.name != "latent_actions")
            preset = replace(preset, recipe=recipe, stages=stages)
        return [DemoRun(label="boxing", preset=preset)]

    def demo_section(self, runs: list[RunResult], *, out_dir: Path, quick: bool) -> ReportSection:
        from quintet.genie import demo

        return demo.section(self, runs, out_dir=Path(out_dir), quick=quick)


def _check_dynamics(config: GenieConfig, recipe: GenieRecipe, tokenizer, latent) -> None:
    if tokenizer is None:
        raise ValueError("inputs: the dynamics stage needs the trained tokenizer stage")
    if (
        tuple(tokenizer.config.token_grid) != tuple(config.token_grid)
        or tokenizer.config.codebook_size != config.num_codes
    ):
        raise ValueError(
            f"model_config: the dynamics model takes {config.token_grid} grids of {config.num_codes} codes, the "
            f"tokenizer makes {tokenizer.config.token_grid} grids of {tokenizer.config.codebook_size}"
        )
    if recipe.action_source == "none" and config.has_actions:
        raise ValueError("model_config: action_source 'none' trains a model without actions (num_actions=None)")
    if recipe.action_source != "none" and not config.has_actions:
        raise ValueError(f"model_config: action_source {recipe.action_source!r} needs num_actions")
    if recipe.action_source == "latent":
        if latent is None:
            raise ValueError("inputs: action_source 'latent' needs the trained latent_actions stage")
        if config.num_actions != latent.config.num_latent_actions or config.max_keys != 1:
            raise ValueError(
                f"model_config: latent actions are one of {latent.config.num_latent_actions} codes per step; the "
                f"dynamics model takes num_actions={config.num_actions}, max_keys={config.max_keys}"
            )


@torch.no_grad()
def _action_source(recipe: GenieRecipe, data: Recorded, latent, config: GenieConfig) -> torch.Tensor | None:
    """Per transition: the recorded actions, the latent action model's codes, or None."""
    if recipe.action_source == "none":
        return None
    if recipe.action_source == "true":
        if not data.discrete:
            raise ValueError("data: the store holds float actions; Genie takes discrete action ids (or key sets)")
        actions = torch.from_numpy(np.asarray(data.store.actions).astype(np.int64))
        if actions.ndim == 1 and config.max_keys > 1:
            actions = actions[:, None]
        top = int(actions.max())
        if top >= config.num_actions:
            raise ValueError(f"data: the store holds action {top}, the model takes num_actions={config.num_actions}")
        return actions
    device = next(latent.parameters()).device
    codes = torch.empty(len(data.store.actions), dtype=torch.long)
    for episode in range(data.store.num_episodes):
        first, end = int(data.obs_starts[episode]), int(data.obs_starts[episode + 1])
        for start in range(first, end - 1, 256):
            stop = min(start + 257, end)
            frames = data.frames(np.arange(start, stop)).to(device)
            inferred = latent.infer(frames[None])[0].cpu()
            codes[start - episode : stop - 1 - episode] = inferred
    return codes
