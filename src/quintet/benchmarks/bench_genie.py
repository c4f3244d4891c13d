"""Genie benchmark: imagined frames per second (cached vs uncached, parallel vs token by token), play, training.

Targets (issue 11), float32 on CPU, both sides of every ratio measured in this process:
- autoregressive decoding with the key/value cache at least 10x faster than recomputing the whole
  sequence for every token, over 8 imagined frames of the demo's size (8 x 8 tokens per frame);
- MaskGIT parallel decoding (the demo's refinement steps) vs token-by-token cached decoding;
- play: at least 10 imagined 64 x 64 frames per second with the demo preset's tokenizer and world model
  (decoding to pixels included), at the thread count of the run (2 CPU cores in the issue);
- training: tokens per second and peak memory of one step at 16 frames of 16 x 16 tokens, both
  objectives, with the step's FLOPs against this machine's measured matmul rate.

Models are untrained (speed does not depend on the weights); greedy decoding makes cached and
uncached runs produce the same frames, which is checked.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import torch

from quintet.bench import matmul_flops_per_s, peak_memory, time_fn
from quintet.genie import ClipBatch, Genie, GenieConfig, dynamics_loss, imagine, training_choices
from quintet.genie.presets import genie_presets
from quintet.genie.tokenizer import FrameTokenizer
from quintet.genie.world import World


def _demo_stages():
    preset = genie_presets("genie")["demo"]
    return preset.stage("tokenizer").model_config, preset.stage("dynamics").model_config


def _model(config: GenieConfig, **changes) -> Genie:
    torch.manual_seed(0)
    return Genie(dataclasses.replace(config, **changes)).eval()


def _context(config: GenieConfig, context: int, frames: int):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.num_codes, (1, context, *config.token_grid), generator=g)
    actions = torch.randint(0, config.num_actions, (1, context - 1 + frames), generator=g)
    return tokens, actions


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def decoding(frames: int, context: int, rounds: int) -> dict:
    """Imagined frames per second: autoregressive cached / uncached, maskgit cached / uncached."""
    _, demo = _demo_stages()
    models = {"autoregressive": _model(demo, objective="autoregressive"), "maskgit": _model(demo, objective="maskgit")}
    tokens, actions = _context(demo, context, frames)
    result: dict = {"frames": frames, "context_frames": context, "maskgit_steps": demo.maskgit_steps}
    outputs = {}
    for name, model in models.items():
        for use_cache in (True, False):
            run = lambda m=model, c=use_cache: imagine(m, tokens, actions, frames, temperature=0.0, use_cache=c)  # noqa: E731
            times = []
            for _ in range(rounds if use_cache else 1):  # the uncached reference is slow: one round
                seconds, outputs[name, use_cache] = _seconds(run)
                times.append(seconds)
            key = f"{name}_{'cached' if use_cache else 'uncached'}"
            result[f"{key}_s"] = statistics.median(times)
            result[f"{key}_fps"] = frames / statistics.median(times)
        result[f"{name}_cached_equals_uncached"] = bool(torch.equal(outputs[name, True], outputs[name, False]))
    result["ar_cache_speedup"] = result["autoregressive_uncached_s"] / result["autoregressive_cached_s"]
    result["maskgit_cache_speedup"] = result["maskgit_uncached_s"] / result["maskgit_cached_s"]
    result["parallel_vs_ar_cached"] = result["autoregressive_cached_s"] / result["maskgit_cached_s"]
    print(f"  decoding: {result}", flush=True)
    return result


def play(steps: int) -> dict:
    """Imagined 64 x 64 frames per second through :class:`World` with the demo preset's models, for each
    objective (the demo preset's own one is ``demo_objective``)."""
    tokenizer_config, demo = _demo_stages()
    torch.manual_seed(0)
    tokenizer = FrameTokenizer(tokenizer_config)
    tokenizer.train()
    tokenizer(torch.randint(0, 256, (8, 1, 3, *tokenizer_config.image_size), dtype=torch.uint8))  # codebook init
    tokenizer.eval()
    start = np.random.default_rng(0).integers(0, 256, (2, 3, *tokenizer_config.image_size), dtype=np.uint8)
    result: dict = {"demo_objective": demo.objective, "threads": torch.get_num_threads(), "steps": steps}
    for objective in ("maskgit", "autoregressive"):
        world = World(tokenizer, _model(demo, objective=objective), temperature=1.0)
        world.reset(start, [3])
        world.step(3)  # warm-up
        actions = np.random.default_rng(1).integers(0, demo.num_actions, steps)
        seconds, _ = _seconds(lambda w=world, chosen=actions: [w.step(int(a)) for a in chosen])
        result[f"{objective}_play_fps"] = steps / seconds
    result["demo_play_fps"] = result[f"{demo.objective}_play_fps"]
    print(f"  play: {result}", flush=True)
    return result


def training(frames: int, grid: int, batch: int) -> list[dict]:
    """One train step at ``frames`` frames of ``grid x grid`` tokens: tokens/s, peak memory, FLOP efficiency."""
    _, demo = _demo_stages()
    rate = matmul_flops_per_s()
    rows = []
    for objective in ("autoregressive", "maskgit"):
        model = _model(demo, objective=objective, token_grid=(grid, grid), max_frames=frames).train()
        config = model.config
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, config.num_codes, (batch, frames, grid, grid), generator=g)
        actions = torch.randint(0, config.num_actions, (batch, frames - 1), generator=g)
        token_mask, hide = training_choices(config, batch, frames, generator=g)
        clips = ClipBatch(tokens=tokens, actions=actions, token_mask=token_mask, hide_actions=hide)

        def step(model=model, config=config, clips=clips):
            model.zero_grad(set_to_none=True)
            dynamics_loss(model, config, clips)[0].backward()

        peak = peak_memory(step)
        seconds = time_fn(step, min_run_time=1.0)
        flops = batch * model.flops_per_clip(frames)
        predicted = batch * (frames - 1) * grid * grid
        rows.append(
            {
                "objective": objective,
                "frames": frames,
                "grid": grid,
                "batch": batch,
                "sequence_slots": model.sequence_length(frames),
                "step_s": seconds,
                "tokens_per_s": predicted / seconds,
                "peak_mb": peak / 2**20 if peak is not None else None,
                "step_gflop": flops / 1e9,
                # the time the step's FLOPs need at the measured matmul rate, over the time it took
                "flop_efficiency": flops / rate / seconds,
            }
        )
        print(f"  train step: {rows[-1]}", flush=True)
    return rows


def run(quick: bool = False) -> dict:
    frames = 2 if quick else 8
    decode = decoding(frames=frames, context=2, rounds=1 if quick else 3)
    played = play(steps=8 if quick else 32)
    train = training(frames=4 if quick else 16, grid=8 if quick else 16, batch=1)
    ratios = {
        f"ar_cached_vs_uncached_{frames}_frames": decode["ar_cache_speedup"],
        "maskgit_vs_ar_cached": decode["parallel_vs_ar_cached"],
        "demo_play_fps": played["demo_play_fps"],
        "maskgit_play_fps": played["maskgit_play_fps"],
        "autoregressive_play_fps": played["autoregressive_play_fps"],
    }
    for row in train:
        ratios[f"train_tokens_per_s_{row['objective']}"] = row["tokens_per_s"]
        ratios[f"train_flop_efficiency_{row['objective']}"] = row["flop_efficiency"]
    return {
        "config": dataclasses.asdict(_demo_stages()[1]),
        "decoding": decode,
        "play": played,
        "train_step": train,
        "ratios": ratios,
    }
