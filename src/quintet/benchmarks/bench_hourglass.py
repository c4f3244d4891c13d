"""Hourglass benchmark: training speed and memory vs an equal-parameter flat LM, cached generation,
and validation bits per byte after the same wall-clock.

Targets (issue 4), float32 on CPU, both sides of every ratio measured in this process:
- train step (forward + backward) of a (2, 2, 2) hourglass with shorten factor 4, dim 256, batch 4,
  against the flat LM with the closest parameter count: at least 1.5x faster and lower peak memory
  at sequence lengths 2048 and 4096;
- 512 new tokens after a 512-token prompt: cached decoding at least 10x faster than recomputing;
- quality per compute: val bpb of the ``demo`` hourglass and its flat baseline after the same
  training time on the embedded stdlib corpus, reported whichever wins.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from quintet import registry
from quintet.bench import peak_memory, time_fn
from quintet.hourglass import FlatLM, HourglassConfig, HourglassLM, count_parameters, flat_baseline
from quintet.registry import TaskRequest

VOCAB, DIM, HEADS, DIM_HEAD = 256, 256, 4, 64


def _config(max_seq_len: int) -> HourglassConfig:
    return HourglassConfig(
        num_tokens=VOCAB,
        dim=DIM,
        depth=(2, 2, 2),
        shorten_factor=4,
        heads=HEADS,
        dim_head=DIM_HEAD,
        max_seq_len=max_seq_len,
    )


def _train_step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

    return step


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(seq_lens, batch: int, quick: bool) -> list[dict]:
    """Peak memory of one step each (which also warms up), then timed steps of the two models in
    alternation, so that load from other processes on a shared machine hits both alike."""
    rows = []
    for n in seq_lens:
        torch.manual_seed(0)
        hourglass = HourglassLM(_config(n))
        flat = FlatLM(flat_baseline(hourglass.config))
        ids = torch.randint(0, VOCAB, (batch, n + 1))
        steps = {"hourglass": _train_step(hourglass, ids), "flat": _train_step(flat, ids)}
        peak = {name: peak_memory(step) for name, step in steps.items()}
        rounds = 3 if quick or n <= 512 else 2
        # short steps: torch.utils.benchmark's median of many calls; long ones: one call per round
        measure = (lambda step: time_fn(step, min_run_time=0.5)) if n <= 512 else _seconds
        seconds = {"hourglass": [], "flat": []}
        for _ in range(rounds):
            for name, step in steps.items():
                seconds[name].append(measure(step))
        median = {name: statistics.median(values) for name, values in seconds.items()}
        rows.append(
            {
                "seq_len": n,
                "batch": batch,
                "hourglass_params": count_parameters(hourglass),
                "flat_params": count_parameters(flat),
                "flat_depth": flat.config.depth,
                "hourglass_s": median["hourglass"],
                "flat_s": median["flat"],
                "hourglass_s_all": seconds["hourglass"],
                "flat_s_all": seconds["flat"],
                "speedup": median["flat"] / median["hourglass"],
                "hourglass_peak_mb": peak["hourglass"] / 2**20 if peak["hourglass"] is not None else None,
                "flat_peak_mb": peak["flat"] / 2**20 if peak["flat"] is not None else None,
                "memory_ratio": peak["flat"] / peak["hourglass"] if peak["hourglass"] and peak["flat"] else None,
            }
        )
        print(f"  train step seq {n}: {rows[-1]}", flush=True)
    return rows


def generation(prompt_len: int, new_tokens: int) -> dict:
    torch.manual_seed(0)
    hourglass = HourglassLM(_config(prompt_len + new_tokens)).eval()
    flat = FlatLM(flat_baseline(hourglass.config)).eval()
    prompt = torch.randint(0, VOCAB, (1, prompt_len))
    runs, tokens = {}, {}
    for name, model, use_cache in (
        ("hourglass_cached", hourglass, True),
        ("hourglass_uncached", hourglass, False),
        ("flat_cached", flat, True),
    ):
        start = time.perf_counter()
        tokens[name] = model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)
        runs[name] = time.perf_counter() - start
    same = torch.equal(tokens["hourglass_cached"], tokens["hourglass_uncached"])
    result = {"prompt_len": prompt_len, "new_tokens": new_tokens, "cached_equals_uncached": same, **runs}
    result["cache_speedup"] = runs["hourglass_uncached"] / runs["hourglass_cached"]
    result["hourglass_cached_tokens_per_s"] = new_tokens / runs["hourglass_cached"]
    result["flat_cached_tokens_per_s"] = new_tokens / runs["flat_cached"]
    print(f"  generation: {result}", flush=True)
    return result


def _train_for(task, seconds: float, eval_points: int) -> dict:
    """AdamW with the preset's settings for ``seconds`` of wall-clock; val bpb at a few points."""
    settings, model = task.settings, task.model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
    )
    curve, step, trained = [], 0, 0.0
    next_eval = seconds / eval_points
    model.train()
    while trained < seconds:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * min(1.0, (step + 1) / settings.warmup_steps)
        loss, _ = task.loss(model, task.train_batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        trained += time.perf_counter() - start
        if trained >= next_eval or trained >= seconds:
            curve.append((round(trained, 2), task.evaluate(model)["val_bpb"]))
            next_eval += seconds / eval_points
    return {"steps": step, "seconds": trained, "val_bpb": curve[-1][1], "curve": curve}


def quality_per_compute(seconds: float) -> dict:
    system = registry.get_system("hourglass")
    preset = system.presets()["demo"]
    result = {"train_seconds_each": seconds, "preset": "demo"}
    stage = preset.stages[0]
    for name, config in (("hourglass", stage.model_config), ("flat", flat_baseline(stage.model_config))):
        torch.manual_seed(0)
        task = system.make_task(TaskRequest.for_stage(preset.replace_stage(stage.name, model_config=config)))
        result[name] = {"params": count_parameters(task.model), **_train_for(task, seconds, eval_points=4)}
        print(f"  {name}: {result[name]['steps']} steps, val bpb {result[name]['val_bpb']:.4f}", flush=True)
    result["bpb_gain"] = result["flat"]["val_bpb"] - result["hourglass"]["val_bpb"]
    return result


def run(quick: bool = False) -> dict:
    batch = 2 if quick else 4
    seq_lens = (256, 512) if quick else (512, 2048, 4096)
    train = train_step(seq_lens, batch, quick)
    gen = generation(64, 64) if quick else generation(512, 512)
    quality = quality_per_compute(10.0 if quick else 60.0)
    ratios = {f"train_speedup_seq{row['seq_len']}": row["speedup"] for row in train}
    ratios.update({f"train_memory_ratio_seq{row['seq_len']}": row["memory_ratio"] for row in train})
    ratios["generation_cache_speedup"] = gen["cache_speedup"]
    ratios["val_bpb_flat_minus_hourglass"] = quality["bpb_gain"]
    return {
        "config": {"dim": DIM, "heads": HEADS, "dim_head": DIM_HEAD, "depth": [2, 2, 2], "shorten_factor": 4},
        "train_step": train,
        "generation": gen,
        "quality_per_compute": quality,
        "ratios": {k: v for k, v in ratios.items() if v is not None and math.isfinite(v)},
    }
