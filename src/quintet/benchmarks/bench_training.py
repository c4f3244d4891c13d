"""Trainer overhead: steps/s of a small LM through the Trainer vs a bare hand-written PyTorch loop.

Both run the same model, data, AdamW, warm-up/cosine schedule and gradient clipping in one process,
interleaved, on one CPU thread; the fastest of several repeats of each is compared (a shared
machine's noise slows single repeats). The Trainer's step time is read from its own log (time
between the first and the last logged step, so set-up, the first interval's warm-up and the final
checkpoint are left out); the bare loop is timed over the same steps.
Target: ``trainer_vs_bare_step_time`` <= 1.05 (at most 5 % overhead per step), with the Trainer's
time-based checkpointing on (its clock is polled every step).

The full run also times one checkpoint write and load of the hourglass demo model with 2 processes:
DDP (rank 0 writes the whole model and optimizer) vs FSDP (every rank writes its shard with
``torch.distributed.checkpoint``), via ``quintet.benchmarks.checkpoint_io`` under torchrun.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quintet.core import PretrainedModel, Transformer
from quintet.training import Task, Trainer, TrainSettings
from quintet.training.optim import lr_factor


@dataclass(frozen=True, kw_only=True)
class BenchLMConfig:
    vocab: int = 256
    dim: int = 64
    depth: int = 2
    heads: int = 4
    dim_head: int = 16
    seq_len: int = 64


class BenchLM(PretrainedModel):
    config_class = BenchLMConfig

    def __init__(self, config: BenchLMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.transformer = Transformer(
            config.dim, config.depth, heads=config.heads, dim_head=config.dim_head, causal=True, rotary=True
        )
        self.head = nn.Linear(config.dim, config.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.embed(tokens)))


def lm_loss(module: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    logits = module(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()), {}


def make_batch(index: int, *, batch_size: int, config: BenchLMConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(index)
    return torch.randint(0, config.vocab, (batch_size, config.seq_len + 1), generator=generator)


def make_model(config: BenchLMConfig) -> BenchLM:
    torch.manual_seed(0)
    return BenchLM(config)


def trainer_step_seconds(settings: TrainSettings, config: BenchLMConfig) -> float:
    task = Task(
        model=make_model(config),
        loss=lm_loss,
        train_batch=lambda index: make_batch(index, batch_size=settings.batch_size, config=config),
        settings=settings,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        result = Trainer(task, run_dir=Path(run_dir), device="cpu", live_progress=False).fit()
    logged = [event for event in result.history if event["kind"] == "train"]
    first, last = logged[0], logged[-1]
    return (last["time_s"] - first["time_s"]) / (last["step"] - first["step"])


def bare_step_seconds(settings: TrainSettings, config: BenchLMConfig) -> float:
    """The loop one would write by hand, with the same optimisation, timed over the same steps."""
    model = make_model(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=settings.betas,
        foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, warmup_steps=settings.warmup_steps, total_steps=settings.steps, min_lr_ratio=settings.min_lr_ratio
        ),
    )
    model.train()
    start = None
    for step in range(settings.steps):
        if step == settings.log_every:
            start = time.perf_counter()
        batch = make_batch(step, batch_size=settings.batch_size, config=config)
        loss, _ = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    return (time.perf_counter() - start) / (settings.steps - settings.log_every)


def checkpoint_io() -> dict:
    """Write and load times of the hourglass demo model's checkpoint, DDP vs FSDP-sharded, 2 processes."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("ddp", "fsdp"):
            out = Path(folder) / f"{mode}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
            command += ["-m", "quintet.benchmarks.checkpoint_io", mode, str(Path(folder) / mode), str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"checkpoint_io {mode} failed: {done.stderr[-2000:]}")
            results[mode] = json.loads(out.read_text())
    return results


def run(quick: bool = False) -> dict:
    config = BenchLMConfig()
    steps, repeats = (30, 2) if quick else (60, 6)
    settings = TrainSettings(
        steps=steps,
        batch_size=8,
        warmup_steps=10,
        eval_every=0,
        checkpoint_every=0,
        checkpoint_every_s=900.0,
        log_every=10,
        lr=1e-3,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer_times, bare_times = [], []
        for repeat in range(repeats):
            # alternate which goes first, so neither profits from the other's warm caches
            if repeat % 2:
                trainer_times.append(trainer_step_seconds(settings, config))
            bare_times.append(bare_step_seconds(settings, config))
            if not repeat % 2:
                trainer_times.append(trainer_step_seconds(settings, config))
    finally:
        torch.set_num_threads(threads)
    # the fastest repeat is the one least disturbed by other work on the machine
    trainer_s, bare_s = min(trainer_times), min(bare_times)
    ratios = {"trainer_vs_bare_step_time": trainer_s / bare_s}
    io = None
    if not quick:
        io = checkpoint_io()
        ratios["fsdp_vs_ddp_checkpoint_write_time"] = io["fsdp"]["write_s"] / io["ddp"]["write_s"]
        ratios["fsdp_vs_ddp_checkpoint_load_time"] = io["fsdp"]["load_s"] / io["ddp"]["load_s"]
    return {
        "model": {"params": sum(p.numel() for p in make_model(config).parameters()), **config.__dict__},
        "settings": {"steps": steps, "batch_size": settings.batch_size, "repeats": repeats, "threads": 1},
        "trainer_steps_per_s": 1.0 / trainer_s,
        "bare_steps_per_s": 1.0 / bare_s,
        "trainer_step_ms": [1000 * t for t in trainer_times],
        "bare_step_ms": [1000 * t for t in bare_times],
        "median_ratio": statistics.median(trainer_times) / statistics.median(bare_times),
        "checkpoint_io_2_processes": io,
        "ratios": ratios,
    }
