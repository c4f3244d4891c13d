"""Q-Transformer benchmarks: greedy decoding (cached vs uncached decoder), training step, collection, and
the pixel + instruction path (issue 14): training samples/s and peak memory with 64 x 64 RGB
observations of 2 frames at batch 64, greedy acting latency per step at batch 1 and 16.

``python -m quintet.bench qtransformer``. Ratios: ``cached_speedup_b1`` / ``cached_speedup_b32``
(uncached / cached decode time at 8 action dimensions x 256 bins with the paper's decoder width;
target >= 3), and the same for a small decoder.

Caching saves the FLOPs of re-reading the prefix and the per-step context keys/values; at batch 1
a decoding step on a CPU costs about the same with 1 or 8 query rows (it reads every weight
once either way, plus per-call overhead), so the speed-up shows at batch 32.
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from quintet.bench import peak_memory, time_fn
from quintet.qtransformer import (
    ActionDiscretiser,
    QLearner,
    QTransformer,
    QTransformerConfig,
    RewardScaler,
    StateEncoderConfig,
    collect_episodes,
)
from quintet.qtransformer.envs import greedy_policy, make_env
from quintet.qtransformer.presets import BABYAI
from quintet.qtransformer.system import QTransformerSystem

DECODERS = {
    # RT-1's transformer, which the paper's Q-function builds on: width 512, 8 layers, 8 heads
    "paper": dict(dim=512, depth=8, heads=8, dim_head=64),
    "small": dict(dim=256, depth=4, heads=8, dim_head=32),
}


def decoding_model(dim: int, depth: int, heads: int, dim_head: int) -> QTransformer:
    """8 action dimensions x 256 bins after 6 frames x 8 TokenLearner tokens (48 context tokens)."""
    torch.manual_seed(0)
    config = QTransformerConfig(
        num_actions=8,
        action_bins=256,
        encoder=StateEncoderConfig(state_dim=32, dim=dim, depth=2, num_tokens=8),
        dim=dim,
        depth=2,
        heads=heads,
        dim_head=dim_head,
        frames=6,
        num_learned_tokens=8,
        q_head_depth=depth,
        q_head_heads=heads,
        q_head_dim_head=dim_head,
        dueling=True,
    )
    return QTransformer(config).eval()


def time_decoding(model: QTransformer, batch: int, min_time: float, rounds: int = 5) -> dict:
    """Cached and uncached decoding timed in alternating rounds; the ratio of the fastest rounds.

    Alternation and the minimum keep a slow spell of a shared machine from landing on one side only.
    """
    obs = torch.randn(batch, model.config.frames, 32)
    with torch.no_grad():
        context = model.encode_state(obs, None).flatten(1, 2)

        def decode(use_cache: bool):
            return lambda: model.q_head.decode(context, guide=lambda logits: logits, use_cache=use_cache)

        cached, uncached = [], []
        for _ in range(rounds):
            cached.append(time_fn(decode(True), min_run_time=min_time / rounds))
            uncached.append(time_fn(decode(False), min_run_time=min_time / rounds))
        end_to_end = time_fn(lambda: model.get_optimal_actions(obs), min_run_time=min_time)
    return {
        "decoder_cached_ms": min(cached) * 1e3,
        "decoder_uncached_ms": min(uncached) * 1e3,
        "decoder_cached_ms_rounds": [t * 1e3 for t in cached],
        "decoder_uncached_ms_rounds": [t * 1e3 for t in uncached],
        "speedup": min(uncached) / min(cached),
        "greedy_actions_end_to_end_ms": end_to_end * 1e3,
    }


def bench_decoding(quick: bool) -> dict:
    results = {}
    for name, shape in DECODERS.items():
        model = decoding_model(**shape)
        results[name] = {"decoder": shape} | {
            f"b{batch}": time_decoding(model, batch, 0.5 if quick else 3.0) for batch in (1, 32)
        }
    return results


def time_training_step(system: QTransformerSystem, name: str, min_time: float) -> dict:
    stage = system.presets()[name].stages[0]
    torch.manual_seed(0)
    model = system.build_model(stage).train()
    learner = QLearner(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = system.example_batch(model, batch_size=stage.settings.batch_size, generator=torch.Generator())

    def step():
        loss, _ = learner.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_target()

    return {"batch_size": stage.settings.batch_size, "step_ms": time_fn(step, min_run_time=min_time) * 1e3}


def bench_training_step(quick: bool) -> dict:
    system = QTransformerSystem()
    return {
        name: time_training_step(system, name, 0.5 if quick else 2.0) for name in ("cartpole", "lunarlander-offline")
    }


def bench_collection(quick: bool) -> dict:
    episodes = 8 if quick else 32
    envs = make_env("CartPole-v1", 8)
    discretiser = ActionDiscretiser.from_space(envs[0].action_space)
    scaler = RewardScaler.for_discount(0.0, 1.0, 0.98)
    rng = np.random.default_rng(0)
    model = QTransformerSystem().build_model(QTransformerSystem().presets()["cartpole"].stages[0]).eval()
    policies = {
        "random": lambda obs: rng.integers(0, 2, size=(len(obs), 1)),
        "q_transformer_greedy": greedy_policy(model),
    }
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, policy in policies.items():
            started = time.perf_counter()
            dataset = collect_episodes(
                envs, policy, episodes, Path(folder) / name, discretiser=discretiser, reward_scaler=scaler, gamma=0.98
            )
            seconds = time.perf_counter() - started
            results[name] = {"env_steps": len(dataset), "env_steps_per_s": len(dataset) / seconds, "parallel_envs": 8}
    return results


def image_model() -> QTransformer:
    """The ``babyai`` preset's model on 64 x 64 views (MaxViT windows of 8: 2 x 2 windows of its 16 x 16 map)."""
    torch.manual_seed(0)
    encoder = replace(BABYAI.encoder, window_size=8)
    return QTransformer(replace(BABYAI, encoder=encoder, frames=2))


def bench_images(quick: bool) -> dict:
    """One optimizer step of Q-learning on 64 x 64 x 2-frame RGB observations with instructions at batch
    64 (target pass, loss, backward, AdamW, target EMA), and greedy acting at batch 1 and 16."""
    model = image_model().train()
    learner = QLearner(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch_size, size = 64, 64
    words = model.tokenize(["go to the red ball", "open the blue door", "pick up a key", "go to a grey box"] * 16)
    batch = {
        "obs": torch.rand(batch_size, 3, 2, size, size, generator=generator),
        "next_obs": torch.rand(batch_size, 3, 2, size, size, generator=generator),
        "actions": torch.randint(model.config.action_bins, (batch_size,), generator=generator),
        "rewards": (torch.rand(batch_size, generator=generator) < 0.1).float(),
        "dones": torch.rand(batch_size, generator=generator) < 0.1,
        "returns_to_go": torch.rand(batch_size, generator=generator),
        "text_ids": words,
    }

    def step():
        loss, _ = learner.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_target()

    step_s = time_fn(step, min_run_time=1.0 if quick else 5.0)
    peak = peak_memory(step)
    model.eval()
    acting = {}
    for acting_batch in (1, 16):
        obs = torch.rand(acting_batch, 3, 2, size, size, generator=generator)
        ids = words[:acting_batch]
        act = functools.partial(model.get_optimal_actions, obs, text_ids=ids)
        seconds = time_fn(act, min_run_time=0.5 if quick else 2.0)
        acting[f"b{acting_batch}"] = {"ms_per_step": seconds * 1e3, "steps_per_s_per_env": acting_batch / seconds}
    return {
        "config": f"babyai preset model on 64 x 64 RGB, 2 frames, {model.config.action_bins} bins, "
        "bag-of-words instruction encoder",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_batch": batch_size,
        "train_step_ms": step_s * 1e3,
        "train_samples_per_s": batch_size / step_s,
        "train_peak_memory_mb": None if peak is None else peak / 2**20,
        "greedy_acting": acting,
    }


def run(quick: bool = False) -> dict:
    # one thread: on a shared few-core machine, OpenMP threads competing with other processes make
    # small-kernel timings swing by 10x; single-threaded numbers are stable and comparable
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        decoding = bench_decoding(quick)
        images = bench_images(quick)
        return {
            "config": "8 action dims x 256 bins, 48 frame tokens of context; decoders: "
            + ", ".join(f"{name} (dim {shape['dim']}, {shape['depth']} layers)" for name, shape in DECODERS.items()),
            "threads": 1,
            "decoding": decoding,
            "training_step": bench_training_step(quick),
            "collection": bench_collection(quick),
            "images": images,
            "ratios": {
                "image_train_samples_per_s": images["train_samples_per_s"],
                "image_acting_ms_b1": images["greedy_acting"]["b1"]["ms_per_step"],
                "image_acting_ms_b16": images["greedy_acting"]["b16"]["ms_per_step"],
                # how much cheaper per env a step of 16 envs acting together is than 16 single steps
                "image_acting_batching_gain_b16": 16
                * images["greedy_acting"]["b1"]["ms_per_step"]
                / images["greedy_acting"]["b16"]["ms_per_step"],
                "cached_speedup_b1": decoding["paper"]["b1"]["speedup"],
                "cached_speedup_b32": decoding["paper"]["b32"]["speedup"],
                "small_decoder_cached_speedup_b1": decoding["small"]["b1"]["speedup"],
                "small_decoder_cached_speedup_b32": decoding["small"]["b32"]["speedup"],
            },
        }
    finally:
        torch.set_num_threads(threads)
