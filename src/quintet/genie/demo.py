"""Genie's samples, play hook and demo section: real vs imagined strips, controllability, a GIF.

Shape glossary: ``b`` clips, ``t`` frames, ``c``/``h``/``w`` image channels/height/width.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quintet.genie.data import action_meanings, spread_starts
from quintet.genie.evaluation import rollout_metrics
from quintet.genie.play import play_headless, play_window
from quintet.genie.world import World
from quintet.training.task import PlayOptions, ReportSection

HELD = ("NOOP", "UP", "DOWN", "LEFT", "RIGHT")
"""the actions of the controllability figure, each held for the whole rollout"""


def _meanings(recipe, data) -> list[str] | None:
    """The game's action names when the model acts with the recorded game's actions, else None; actions
    the recording never played are blanked, so keys fall back to the nearest one the model has seen."""
    if recipe.action_source != "true" or data.store.env_id != recipe.recording.env_id:
        return None
    meanings = action_meanings(recipe.recording)
    played = recipe.recording.actions
    return [name if played is None or i in played else "" for i, name in enumerate(meanings)]


def _start(prepared, clips, recipe, index: int = 0) -> tuple[np.ndarray, list | None]:
    """Real frames ``(context, c, h, w)`` and the actions between them, from held-out episode ``index``."""
    data = prepared()["data"]
    rows = data.rows(
        spread_starts(data.clip_starts(recipe.context_frames, "val"), index + 1)[index:], recipe.context_frames
    )
    frames = data.frames(rows)[0].numpy()
    _, actions = clips(rows)
    return frames, None if actions is None else [a.tolist() if a.ndim else int(a) for a in actions[0]]


def _labelled_grid(rows: list[tuple[str, torch.Tensor]], path: Path, *, title: str, columns: list[str]) -> Path:
    """A figure of image rows ``(t, c, h, w)`` in [0, 1], each with a label, via matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(images) for _, images in rows)
    figure, axes = plt.subplots(len(rows), width, figsize=(1.1 * width + 1.6, 1.15 * len(rows) + 0.6), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(width):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(images):
                axis.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                axis.axis("off")
            if r == 0 and c < len(columns):
                axis.set_title(columns[c], fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def strips_figure(rollouts, recipe, path: Path, *, clips: int = 3) -> Path:
    """Per clip: the real frames, then the frames imagined under the same actions and under random ones."""
    context = recipe.context_frames
    rows = []
    for i in range(min(clips, rollouts.real.shape[0])):
        real = rollouts.real[i]
        rows.append((f"clip {i + 1}: real", real))
        rows.append(("imagined,\nreal actions", torch.cat((real[:context], rollouts.imagined[i]))))
        if rollouts.imagined_random is not None:
            rows.append(("imagined,\nrandom actions", torch.cat((real[:context], rollouts.imagined_random[i]))))
    columns = [f"t={t}" + (" (given)" if t < context else "") for t in range(rollouts.real.shape[1])]
    return _labelled_grid(rows, path, title="real vs imagined frames under the same actions", columns=columns)


def control_figure(world: World, start, meanings: list[str], frames: int, path: Path) -> Path | None:
    """From one real start, each of NOOP / UP / DOWN / LEFT / RIGHT held for ``frames`` imagined frames."""
    rows = []
    for name in HELD:
        if name not in meanings:
            continue
        action = meanings.index(name)
        first = world.reset(*start)
        imagined = [first] + [world.step(action) for _ in range(frames)]
        rows.append((f"hold {name}", torch.from_numpy(np.stack(imagined)).float() / 255))
    if not rows:
        return None
    columns = ["start (real)"] + [f"+{t}" for t in range(1, frames + 1)]
    return _labelled_grid(rows, path, title="one start, different held actions (all imagined)", columns=columns)


@torch.no_grad()
def side_by_side_gif(world: World, prepared, clips, recipe, path: Path, *, steps: int) -> tuple[Path, float]:
    """A GIF of a held-out stretch: real frames left, frames imagined under the same actions right.
    Returns its path and the imagined frames per second."""
    from quintet.data.images import save_gif

    data = prepared()["data"]
    steps = min(steps, data.longest("val") - recipe.context_frames)
    span = recipe.context_frames + steps
    rows = data.rows(spread_starts(data.clip_starts(span, "val"), 1), span)
    real = data.frames(rows)[0].numpy()
    _, actions = clips(rows)
    steps_actions = None if actions is None else [int(a) if a.ndim == 0 else a.tolist() for a in actions[0]]
    context = recipe.context_frames
    imagined = [world.reset(real[:context], None if steps_actions is None else steps_actions[: context - 1])]
    began = time.perf_counter()
    for t in range(steps):
        imagined.append(world.step(None if steps_actions is None else steps_actions[context - 1 + t]))
    rate = steps / (time.perf_counter() - began)
    pairs = [
        np.concatenate((r, np.full_like(r[:, :, :2], 255), i), axis=2) for r, i in zip(real[context - 1 :], imagined)
    ]
    return save_gif(np.stack(pairs), path, fps=8.0), rate


def _world(trained, tokenizer, recipe, seed: int = 0) -> World:
    return World(tokenizer, trained, temperature=recipe.temperature, cfg_scale=recipe.cfg_scale, seed=seed)


def dynamics_samples(trained, tokenizer, recipe, prepared, clips, outputs) -> dict[str, Any]:
    """The dynamics stage's samples: strips, controllability figure, and the side-by-side GIF."""
    data = prepared()["data"]
    span = recipe.context_frames + recipe.rollout_frames
    rows = data.rows(spread_starts(data.clip_starts(span, "val"), 3), span)
    tokens, actions = clips(rows)
    rollouts = rollout_metrics(
        trained,
        tokenizer,
        data.frames(rows),
        tokens,
        actions,
        context=recipe.context_frames,
        choices=prepared()["choices"],
    )
    images = [str(strips_figure(rollouts, recipe, outputs.path("real_vs_imagined.png")))]
    world = _world(trained, tokenizer, recipe)
    meanings = _meanings(recipe, data)
    if meanings is not None:
        figure = control_figure(
            world,
            _start(prepared, clips, recipe),
            meanings,
            recipe.rollout_frames + 2,
            outputs.path("controllability.png"),
        )
        if figure is not None:
            images.append(str(figure))
    gif, rate = side_by_side_gif(world, prepared, clips, recipe, outputs.path("real_vs_imagined.gif"), steps=24)
    return {"images": images, "gif": str(gif), "imagined_fps": round(rate, 1), **rollouts.metrics}


def play(trained, tokenizer, recipe, prepared, clips, options: PlayOptions) -> dict[str, Any]:
    """``quintet play genie``: a window (arrows / WASD / space, or digits), or ``--headless --actions``."""
    data = prepared()["data"]
    world = _world(trained, tokenizer, recipe, seed=options.seed)
    start = _start(prepared, clips, recipe)
    if options.headless:
        actions = list(options.actions or ())
        if not actions:
            rng = np.random.default_rng(options.seed)
            choices = prepared()["choices"]
            pool = np.arange(world.num_actions or 1) if choices is None else choices.numpy()
            actions = [int(a) for a in rng.choice(pool, options.steps)]
        elif options.steps:
            actions = (actions * (options.steps // len(actions) + 1))[: options.steps]
        if world.num_actions is None:
            actions = [None] * len(actions)
        out = Path(options.out) if options.out is not None else Path("play.gif")
        return play_headless(world, actions, out, fps=options.fps, start=start)
    return play_window(world, start=start, meanings=_meanings(recipe, data), fps=options.fps, steps=options.steps)


def section(system, runs, *, out_dir: Path, quick: bool) -> ReportSection:
    run = runs[0]
    stages = run.stages
    dynamics = stages["dynamics"]
    metrics: dict[str, float] = {}
    for stage in stages.values():
        if stage.result is not None:
            metrics.update({k: float(v) for k, v in stage.result.eval_metrics.items()})
    samples = dynamics.task.sample(dynamics.model)
    figures = list(samples["images"])
    for stage in stages.values():
        curve = getattr(stage.result, "loss_curve", None)
        if curve is not None:
            figures.append(str(curve))
    recipe = run.preset.recipe
    seconds = {name: stage.result.seconds for name, stage in stages.items() if stage.result is not None}
    steps = {name: stage.result.step for name, stage in stages.items() if stage.result is not None}
    delta = metrics.get("delta_psnr")
    config = dynamics.model.config
    how = (
        f"in {config.maskgit_steps} parallel (MaskGIT) refinement steps"
        if config.objective == "maskgit"
        else f"token by token ({config.tokens_per_frame} per frame, a key/value cache across frames)"
    )
    verdict = (
        f"Controllability delta PSNR = {delta:+.2f} dB: "
        + (
            "the real actions steer the imagined boxer the way they steered the real one."
            if delta is not None and delta > 0
            else "the model has not learned to follow the actions yet."
        )
        if delta is not None
        else ""
    )
    summary = (
        f"Genie world model on {run.preset.data}: {recipe.recording.episodes} episodes recorded "
        f"({recipe.recording.episodes - recipe.val_episodes} for training). Trained "
        + ", ".join(f"{name} {seconds[name]:.0f} s ({steps[name]} steps)" for name in seconds)
        + f". The tokenizer codes each {recipe.recording.frame_size} x {recipe.recording.frame_size} frame as "
        f"{config.token_grid[0]} x {config.token_grid[1]} tokens "
        f"(recon PSNR {metrics.get('recon_psnr', float('nan')):.1f} dB); "
        f"the dynamics model imagines the next frame from past frames and the action taken, {how}. Given "
        f"{recipe.context_frames} real frames and then the real actions, its {recipe.rollout_frames} imagined "
        f"frames reach {metrics.get('rollout_psnr_k', float('nan')):.2f} dB PSNR against the real ones "
        f"(repeating the last real frame: {metrics.get('copy_psnr_k', float('nan')):.2f} dB). {verdict} "
        f"It imagines {samples.get('imagined_fps', 0):.0f} frames per second here; play it with "
        f"`quintet play genie --checkpoint {run.run_dir}` (a window), or `--headless --actions 3,3,3,5,5,5 "
        f"--out play.gif`."
    )
    if "latent_action_nmi" in metrics:
        summary += (
            f" The latent action model, never shown an action label, agrees with the true actions with "
            f"NMI {metrics['latent_action_nmi']:.2f}."
        )
    return ReportSection(
        title="Genie: a world model of Atari Boxing, learned from recorded play",
        summary=summary,
        train_seconds=sum(seconds.values()),
        metrics={**metrics, "imagined_fps": float(samples.get("imagined_fps", 0.0))},
        figures=figures,
        samples={"animation (real | imagined under the same actions)": samples["gif"]},
    )
