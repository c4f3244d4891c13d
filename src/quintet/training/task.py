"""What a system hands the Trainer: a model, its loss, a batch source and optional report hooks."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quintet.core.validation import check_int, check_number


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Optimisation settings of one run (presets fill these; the CLI overrides them)."""

    steps: int = 1000
    """optimizer steps to train for"""
    batch_size: int = 16
    """samples per micro-batch on each process"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 3e-4
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    """linear warm-up steps before the cosine decay"""
    min_lr_ratio: float = 0.1
    """the cosine decays to lr * min_lr_ratio"""
    grad_clip: float = 1.0
    """max global gradient norm (0 disables clipping)"""
    ema_decay: float | None = None
    """keep an EMA of the weights with this decay (None: no EMA)"""
    eval_every: int = 200
    """evaluate every this many steps (0: only at the end)"""
    checkpoint_every: int = 500
    """checkpoint every this many steps (0: only at the end)"""
    checkpoint_every_s: float | None = 900.0
    """also checkpoint once this many seconds have passed since the last checkpoint (None: off), so a
    hard kill loses a bounded amount of work"""
    keep_last: int = 2
    """complete checkpoints to keep; older ones are deleted only once a newer one is complete"""
    log_every: int = 10
    """log train metrics every this many steps"""
    time_budget_s: float | None = None
    """stop (and checkpoint) once this many seconds of training have passed"""
    seed: int = 0
    """seeds the Trainer's random state (dropout, ...) and the task's data order"""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            check_int(getattr(self, name), name, minimum=0)
        check_number(self.lr, "lr", low=0.0, low_open=True)
        check_number(self.weight_decay, "weight_decay", low=0.0)
        check_number(self.min_lr_ratio, "min_lr_ratio", low=0.0, high=1.0)
        check_number(self.grad_clip, "grad_clip", low=0.0)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {self.betas!r}")
        for beta in self.betas:
            check_number(beta, "betas", low=0.0, high=1.0, high_open=True)
        if self.ema_decay is not None:
            check_number(self.ema_decay, "ema_decay", low=0.0, high=1.0, low_open=True, high_open=True)
        if self.time_budget_s is not None:
            check_number(self.time_budget_s, "time_budget_s", low=0.0, low_open=True)
        if self.checkpoint_every_s is not None:
            check_number(self.checkpoint_every_s, "checkpoint_every_s", low=0.0, low_open=True)


@dataclass(kw_only=True)
class Task:
    """One trainable system instance.

    - ``loss(module, batch) -> (loss, metrics)``: ``module`` is ``model`` as the Trainer wraps it
      (DDP / FSDP / compiled); call it, not ``model``, so gradients synchronise. Metric values are
      detached 0-dim tensors (or plain numbers): the Trainer sums them on the device and reads them
      only when it logs, so a step never waits on the device to read a metric.
    - ``train_batch(index) -> batch``: micro-batch number ``index`` (global and unique per process:
      ``(step * grad_accum + micro) * world_size + rank``), a deterministic function of the index and
      the run's seed, so a resumed run sees exactly the batches an uninterrupted one would.
    - ``evaluate(model) -> metrics`` under stable names (``val_loss``, ``val_bpb``, ``eval_return_mean``).
    - ``sample(model) -> dict`` for the report: ``{"text": str}``, ``{"images": [png paths]}``, ...
    - ``play(model, options) -> dict``: interactive or scripted use of a trained model (``quintet play``),
      e.g. acting inside a world model; returns what it wrote (``{"gif": path}``, ...).
    - ``extra_state``: modules besides ``model`` whose state is checkpointed too (e.g. a target net).
    - ``batch_tokens(batch) -> int``: tokens in a micro-batch, for the tokens/s readout (without it the
      progress line shows samples/s). Read tensor shapes only: a value read from a tensor's data
      would synchronise the device every step.
    - ``batch_flops(batch) -> float``: forward + backward FLOPs of a micro-batch, from its shapes and
      the model's config (the model FLOPs utilisation readout); shapes only, like ``batch_tokens``.
    - ``start(run) -> None``: called once the run folder, the process group and any checkpoint are
      set up, before the first batch; a task that keeps data beside its checkpoints (an online
      replay buffer) learns where here (:class:`RunInfo`).
    - ``stop_when(eval_metrics) -> reason | None``: after each evaluation, a reason to end training
      early (e.g. "target return reached"), or None to go on; rank 0's answer holds for every rank.
    """

    model: nn.Module
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]
    train_batch: Callable[[int], Any]
    settings: TrainSettings = field(default_factory=TrainSettings)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    sample: Callable[[nn.Module], dict[str, Any]] | None = None
    play: Callable[[nn.Module, PlayOptions], dict[str, Any]] | None = None
    extra_state: dict[str, nn.Module] = field(default_factory=dict)
    after_step: Callable[[int], None] | None = None
    """called after each optimizer step (e.g. to update a target network)"""
    batch_tokens: Callable[[Any], int] | None = None
    batch_flops: Callable[[Any], float] | None = None
    start: Callable[[RunInfo], None] | None = None
    stop_when: Callable[[dict[str, float]], str | None] | None = None


@dataclass(frozen=True, kw_only=True)
class PlayOptions:
    """What ``quintet play`` passes to :attr:`Task.play`."""

    headless: bool = False
    """no window: run the given actions and write the rollout to ``out``"""
    actions: tuple[int, ...] | None = None
    """scripted actions (headless), one per imagined step"""
    out: Path | None = None
    """where a headless rollout is written (e.g. an animated GIF)"""
    fps: float = 10.0
    """frames per second shown (window) or written (GIF)"""
    steps: int = 0
    """steps to play (0: as many as ``actions``, or until the window closes)"""
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """Where and how a Trainer runs a task: what :attr:`Task.start` receives."""

    run_dir: Path
    rank: int
    world_size: int
    grad_accum: int
    start_step: int
    """0 for a fresh run, the checkpoint's step when resuming"""
    resumed: bool
    """False: a fresh run, which replaces what an earlier run left in ``run_dir``"""

    def step_of(self, index: int) -> int:
        """The optimizer step that asks for micro-batch ``index`` (see :class:`Task`)."""
        return index // (self.grad_accum * self.world_size)


class SampleFolder:
    """Where a task writes its figures: ``subfolder`` of the stage's run folder once training starts
    (call :meth:`start` from :attr:`Task.start`), else a fresh temporary folder (``quintet sample``
    prints the paths)."""

    def __init__(self, system: str, *, subfolder: str = "") -> None:
        self.system = system
        self.subfolder = subfolder
        self.folder: Path | None = None

    def start(self, run: RunInfo) -> None:
        self.folder = Path(run.run_dir) / self.subfolder

    def path(self, name: str) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix=f"quintet-{self.system}-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / name


@dataclass(kw_only=True)
class ReportSection:
    """One system's part of the demo report (``runs/demo/report.html``)."""

    title: str
    summary: str
    """what was trained, on what, for how long, and what the numbers mean"""
    train_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    """paths of PNG files (loss curves, samples) to embed"""
    samples: dict[str, str] = field(default_factory=dict)
    """titled text samples"""
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """titled tables, each a list of rows"""
