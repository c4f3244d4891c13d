"""The one training loop every system uses.

A system hands over a :class:`~quintet.training.task.Task` (model, loss, batches, hooks); the
Trainer owns everything else: devices and processes (``torch.distributed``: DDP by default, FSDP2
by option, see :mod:`~quintet.training.parallel`), gradient accumulation, clipping, bf16 autocast,
AdamW with warm-up and cosine decay (:mod:`~quintet.training.optim`), an optional EMA of the
weights, periodic evaluation, atomic checkpoints that resume exactly (:mod:`~quintet.training.state`),
and the logs (console, ``metrics.jsonl``, TensorBoard, a loss-curve PNG).

Micro-batch ``micro`` of optimizer step ``step`` on process ``rank`` is ``task.train_batch(index)``
with ``index = (step * grad_accum + micro) * world_size + rank``: the data position is the step, so
a resumed run reads exactly the batches an uninterrupted one would.

Three names for the model: ``model`` is the task's module (single-device code, what is saved),
``parallel_model`` is it wrapped for several processes (DDP / FSDP; ``model`` itself with one), and
``train_model`` is what the loss calls (``parallel_model``, compiled when asked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quintet.core.io import ensure_writable_dir
from quintet.training.checkpoint import CHECKPOINTS_DIR, check_plain, latest_checkpoint, load_trainer_state
from quintet.training.distributed import (
    agree_any,
    barrier,
    broadcast_object,
    setup_distributed,
    teardown_distributed,
)
from quintet.training.ema import WeightEMA
from quintet.training.flops import peak_flops_per_s
from quintet.training.meter import IntervalMeter, NonFiniteLossError
from quintet.training.optim import build_optimizer, build_scheduler
from quintet.training.parallel import PARALLEL_MODES, full_tensor, gradient_sync, is_sharded, wrap
from quintet.training.progress import METRICS_FILE, TENSORBOARD_DIR, RunLogger, format_rate
from quintet.training.report import plot_loss_curves
from quintet.training.signals import StopSignals
from quintet.training.state import RunState, restore_weights, seed_everything
from quintet.training.task import RunInfo, Task

PRECISIONS = ("auto", "bf16", "fp32")
LOSS_CURVE_FILE = "loss_curve.png"


@dataclass
class TrainResult:
    step: int
    """optimizer steps completed"""
    seconds: float
    """wall-clock seconds of training (summed over resumed segments; final evaluation excluded)"""
    train_metrics: dict[str, float]
    """the last logged train metrics (``loss``, ``lr``, the task's metrics, throughput)"""
    eval_metrics: dict[str, float]
    """``task.evaluate`` at the end (empty without an evaluate hook)"""
    history: list[dict[str, Any]]
    """one dict per log / eval event: ``kind`` ("train" / "eval"), ``step``, ``time_s``, ``loss``, metrics"""
    run_dir: Path
    checkpoint: Path | None = None
    """the latest checkpoint folder"""
    loss_curve: Path | None = None
    """PNG of the loss curves"""
    stopped_early: str | None = None
    """why training ended before ``settings.steps`` ("time budget", "interrupted", a ``stop_when``
    reason), else None"""


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor inside (dicts, lists, tuples, dataclasses) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: move_to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch


class Trainer:
    """Train ``task`` into ``run_dir``; ``fit()`` returns a :class:`TrainResult`.

    - ``device``: "auto" (the GPU when there is one), "cpu", "cuda" or "cuda:N"; under ``torchrun``
      each process takes the GPU of its local rank.
    - ``parallel``: with several processes, "ddp" (replicated weights) or "fsdp" (FSDP2 ``fully_shard``
      of the model's shard units and the root).
    - ``precision``: "auto" is bf16 autocast on a GPU that supports it and float32 elsewhere.
    - ``resume``: continue from the latest checkpoint of ``run_dir``; without it a run that already
      lives in ``run_dir`` is replaced.
    - ``run_config``: plain data describing the run (system, preset, stage, ...), stored in every checkpoint.
    - ``stop_signals``: an installed :class:`~quintet.training.signals.StopSignals` shared with the caller
      (a run of several stages); without it ``fit`` installs its own while it runs.
    """

    def __init__(
        self,
        task: Task,
        *,
        run_dir: str | Path,
        resume: bool = False,
        device: str | torch.device = "auto",
        run_config: dict[str, Any] | None = None,
        parallel: str = "ddp",
        precision: str = "auto",
        compile: bool = False,
        find_unused_parameters: bool = False,
        live_progress: bool | None = None,
        stop_signals: StopSignals | None = None,
    ):
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a quintet.training.Task, got {type(task).__name__}")
        if not isinstance(task.model, nn.Module):
            raise TypeError(f"task.model: expected an nn.Module, got {type(task.model).__name__}")
        if not callable(getattr(task.model, "save_pretrained", None)):
            raise TypeError(f"task.model: {type(task.model).__name__} has no save_pretrained (use PretrainedModel)")
        if not isinstance(run_dir, (str, Path)):
            raise TypeError(f"run_dir: expected a path, got {type(run_dir).__name__}")
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel: expected one of {PARALLEL_MODES}, got {parallel!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        run_config = {} if run_config is None else run_config
        check_plain(run_config, "run_config")
        self.task = task
        self.settings = task.settings
        self.run_dir = Path(run_dir)
        self.resume = bool(resume)
        self.device_request = device
        self.run_config = dict(run_config)
        self.parallel = parallel
        self.precision = precision
        self.compile = bool(compile)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.live_progress = live_progress
        self.stop_signals = stop_signals

        self.model: nn.Module = task.model
        self.ema: WeightEMA | None = None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._latest_checkpoint: Path | None = None
        self._last_saved_step: int | None = None
        self._last_eval: tuple[int, dict[str, float]] | None = None

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and sample from: the EMA when the run keeps one (whole, not sharded),
        else the model."""
        return self.ema.module if self.ema is not None and self.ema.module is not None else self.model

    # ------------------------------------------------------------------ fit

    def fit(self) -> TrainResult:
        self.context = setup_distributed(self.device_request)
        self.device = self.context.device
        self.logger: RunLogger | None = None
        own_signals = self.stop_signals is None
        signals = StopSignals() if own_signals else self.stop_signals
        finished = False
        try:
            with signals if own_signals else contextlib.nullcontext():
                self.stop_signals = signals
                result = self._fit()
            finished = True
            return result
        finally:
            if own_signals:
                self.stop_signals = None
            if self.logger is not None:
                self.logger.close()
            teardown_distributed(self.context, finished=finished)

    def _fit(self) -> TrainResult:
        self._setup()
        if self.task.start is not None:
            self.task.start(
                RunInfo(
                    run_dir=self.run_dir,
                    rank=self.context.rank,
                    world_size=self.context.world_size,
                    grad_accum=self.settings.grad_accum,
                    start_step=self.step,
                    resumed=self.resume,
                )
            )
        stopped_early = self._train_loop()
        seconds = self._elapsed()
        interrupted = stopped_early == "interrupted"
        if interrupted and self._last_saved_step != self.step:
            # preempted: the checkpoint first, while the scheduler's grace period lasts; no final evaluation
            self._save_checkpoint()
        eval_metrics = self._last_eval[1] if self._last_eval is not None else {}
        if self.task.evaluate is not None and not interrupted:
            # a run that stopped right after an evaluation (stop_when) is not evaluated twice
            if self._last_eval is None or self._last_eval[0] != self.step:
                eval_metrics = self._evaluate()
        if self._last_saved_step != self.step:
            self._save_checkpoint()
        loss_curve = None
        if self.context.is_main and any(e["kind"] == "train" for e in self.history):
            loss_curve = plot_loss_curves(self.history, self.run_dir / LOSS_CURVE_FILE, title="loss")
        train_events = [e for e in self.history if e["kind"] == "train"]
        last_train = train_events[-1] if train_events else {}
        train_metrics = {k: v for k, v in last_train.items() if k not in ("kind", "step", "time_s")}
        if stopped_early:
            how = f" by {self.stop_signals.received}" if interrupted and self.stop_signals.received else ""
            self.logger.message(
                f"stopped at step {self.step} ({stopped_early}{how}); checkpoint "
                f"{self._latest_checkpoint.name} holds it (resume: --resume, or Trainer(..., resume=True))"
            )
        return TrainResult(
            step=self.step,
            seconds=seconds,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            history=list(self.history),
            run_dir=self.run_dir,
            checkpoint=self._latest_checkpoint,
            loss_curve=loss_curve,
            stopped_early=stopped_early,
        )

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        context, settings = self.context, self.settings
        checkpoint, saved = self._prepare_run_dir()

        self.model.to(self.device)
        for module in self.task.extra_state.values():
            module.to(self.device)
        if checkpoint is not None:
            # the extra modules, and whole weights, load before wrapping (sharded ones after)
            restore_weights(self.model, self.task.extra_state, checkpoint, saved, device=self.device)

        self._autocast_dtype = self._resolve_precision()
        self.parallel_model = wrap(
            self.model, context, self.parallel, find_unused_parameters=self.find_unused_parameters
        )
        self.train_model = torch.compile(self.parallel_model) if self.compile else self.parallel_model
        if settings.ema_decay is not None:
            # after wrapping: under FSDP the EMA keeps a copy of each rank's shards only
            self.ema = WeightEMA(self.model, settings.ema_decay, sharded=is_sharded(context, self.parallel))
        fused = self.device.type == "cuda" and self.parallel != "fsdp"
        self.optimizer = build_optimizer(self.parallel_model, settings, fused=fused)
        self.scheduler = build_scheduler(self.optimizer, settings)
        self.state = RunState(
            model=self.model,
            parallel_model=self.parallel_model,
            ema=self.ema,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra_state=self.task.extra_state,
            context=context,
            parallel=self.parallel,
            settings=settings,
            run_config=self.run_config,
        )
        self._peak_flops = None
        if self.task.batch_flops is not None:
            self._peak_flops = peak_flops_per_s(self.device, self._autocast_dtype)

        self._elapsed_offset = 0.0
        note = None
        if checkpoint is None:
            seed_everything(settings.seed + context.rank)
        else:
            progress = self.state.restore_progress(checkpoint, saved)
            self.step = self._last_saved_step = progress.step
            self._latest_checkpoint = checkpoint
            self._elapsed_offset = progress.elapsed_s
            self.history = progress.history
            note = progress.note

        self.logger = RunLogger(
            self.run_dir,
            total_steps=settings.steps,
            start_step=self.step,
            enabled=context.is_main,
            live=self.live_progress,
            history=self.history,
        )
        if checkpoint is not None:
            self.logger.message(f"resumed from {checkpoint} at step {self.step}")
        if note:
            self.logger.message(note)
        if self._peak_flops is not None:
            self.logger.message(
                f"MFU is measured against {self._peak_flops[0] / 1e12:.3g} TFLOP/s ({self._peak_flops[1]})"
            )

    def _prepare_run_dir(self) -> tuple[Path | None, dict[str, Any] | None]:
        """Rank 0 readies the run folder; every rank reads the checkpoint to resume from (if any)."""
        checkpoints_dir = self.run_dir / CHECKPOINTS_DIR
        if self.context.is_main:
            ensure_writable_dir(self.run_dir, "run_dir")
            if not self.resume:
                # a fresh run replaces what an earlier run left in this folder
                for leftover in (checkpoints_dir, self.run_dir / TENSORBOARD_DIR):
                    if leftover.is_dir():
                        shutil.rmtree(leftover)
                for leftover in (self.run_dir / METRICS_FILE, self.run_dir / LOSS_CURVE_FILE):
                    leftover.unlink(missing_ok=True)
        barrier(self.context)
        if not self.resume:
            return None, None
        checkpoint = latest_checkpoint(checkpoints_dir)
        if checkpoint is None:
            raise ValueError(f"resume: {self.run_dir} holds no checkpoint to resume from")
        return checkpoint, load_trainer_state(checkpoint)

    def _resolve_precision(self) -> torch.dtype | None:
        if self.precision == "fp32":
            return None
        if self.precision == "bf16":
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    # ------------------------------------------------------------------ the loop

    def _elapsed(self) -> float:
        return self._elapsed_offset + (time.perf_counter() - self._loop_start)

    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _poll(self) -> tuple[str | None, bool]:
        """Before each step: why training stops now ("time budget", "interrupted"), or None; and whether
        a checkpoint is due by the clock (``checkpoint_every_s``).

        Under several processes the ranks agree on both with one small CPU collective per step, so they
        all stop (and checkpoint) at the same step and none is left waiting in a collective.
        """
        settings = self.settings
        every_s = settings.checkpoint_every_s
        flags = agree_any(
            [
                settings.time_budget_s is not None and self._elapsed() >= settings.time_budget_s,
                self.stop_signals.received is not None,
                every_s is not None and time.perf_counter() - self._last_saved_time >= every_s,
            ],
            self.context,
        )
        reason = "time budget" if flags[0] else "interrupted" if flags[1] else None
        return reason, flags[2]

    def _train_step(self) -> None:
        """One optimizer step: ``grad_accum`` micro-batches, clipping, the update, the EMA."""
        settings, context, task = self.settings, self.context, self.task
        grad_accum = settings.grad_accum
        step_loss = None
        for micro in range(grad_accum):
            index = (self.step * grad_accum + micro) * context.world_size + context.rank
            batch = move_to_device(task.train_batch(index), self.device)
            with gradient_sync(
                self.parallel_model, context, self.parallel, enabled=micro == grad_accum - 1, grad_accum=grad_accum
            ):
                with self._autocast():
                    loss, metrics = task.loss(self.train_model, batch)
                (loss / grad_accum).backward()
            detached = loss.detach()
            step_loss = detached if step_loss is None else step_loss + detached
            self.meter.add_micro(
                metrics,
                tokens=task.batch_tokens(batch) if task.batch_tokens is not None else 0,
                flops=task.batch_flops(batch) if task.batch_flops is not None else 0.0,
            )
        norm = None
        if settings.grad_clip > 0:
            norm = full_tensor(
                torch.nn.utils.clip_grad_norm_(self.parallel_model.parameters(), settings.grad_clip, foreach=True)
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.meter.add_step(step_loss / grad_accum, norm)

    def _train_loop(self) -> str | None:
        settings, task = self.settings, self.task
        self._loop_start = self._last_saved_time = time.perf_counter()
        self.meter = IntervalMeter(self.context, samples_per_micro=settings.batch_size)
        self.train_model.train()
        stopped_early = None
        while self.step < settings.steps:
            stopped_early, checkpoint_due = self._poll()
            if stopped_early:
                break
            if checkpoint_due and self._last_saved_step != self.step:
                self._paused(self._save_checkpoint)
            self._train_step()
            if task.after_step is not None:
                task.after_step(self.step)
            self.logger.advance()

            if self.step % settings.log_every == 0 or self.step == settings.steps:
                self._log_train()
            if settings.eval_every and self.step % settings.eval_every == 0 and self.step != settings.steps:
                if task.evaluate is not None:
                    metrics = self._paused(self._evaluate)
                    if task.stop_when is not None:
                        # rank 0 decides: sharded evaluation leaves each rank its own metrics
                        stopped_early = broadcast_object(task.stop_when(metrics), self.context)
                        if stopped_early:
                            break
            if settings.checkpoint_every and self.step % settings.checkpoint_every == 0:
                if self.step != settings.steps:
                    self._paused(self._save_checkpoint)
        if self.meter.pending_losses:
            self._log_train()
        return stopped_early

    def _paused(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` (evaluation, checkpoint) without counting its time against throughput."""
        start = time.perf_counter()
        try:
            return action()
        finally:
            self.meter.pause(time.perf_counter() - start)

    def _flush(self) -> None:
        latest = self._latest_checkpoint.name if self._latest_checkpoint is not None else "none yet"
        self.meter.flush(self.step, latest)

    def _log_train(self) -> None:
        self._flush()
        numbers = self.meter.read()
        if numbers is None:
            return
        event: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "time_s": round(self._elapsed(), 4),
            "loss": numbers.pop("loss"),
            "lr": self.scheduler.get_last_lr()[0],
        }
        event.update(numbers)
        if self._peak_flops is not None and "flops_per_s" in event:
            event["mfu"] = event["flops_per_s"] / (self._peak_flops[0] * self.context.world_size)
        if "tokens_per_s" in event:
            rate = format_rate(event["tokens_per_s"], "tok")
        else:
            rate = format_rate(event["samples_per_s"], "samples")
        eta = (self.settings.steps - self.step) / event["steps_per_s"]
        if self.settings.time_budget_s is not None:
            eta = min(eta, max(0.0, self.settings.time_budget_s - self._elapsed()))
        self.history.append(event)
        self.logger.record(event)
        self.logger.show_train(event, rate=rate, eta_s=eta)
        self.meter.start()

    def _evaluate(self) -> dict[str, float]:
        self._flush()
        context, task = self.context, self.task
        sharded = is_sharded(context, self.parallel)
        target = self.eval_model if not sharded else self.parallel_model
        metrics: dict[str, float] | None = None
        if sharded or context.is_main:
            devices = [self.device] if self.device.type == "cuda" else []
            was_training = target.training
            target.eval()
            # a sharded run's EMA is swapped into the sharded model while it is evaluated
            weights = self.ema.applied(target) if sharded and self.ema is not None else contextlib.nullcontext()
            # evaluation draws from its own copy of the RNG, so how often it runs never changes training
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast(), weights:
                try:
                    raw = task.evaluate(target)
                finally:
                    target.train(was_training)
                    if sharded:
                        # FSDP keeps the root's weights gathered after a forward with no backward
                        self.parallel_model.reshard()
            if not isinstance(raw, dict):
                raise TypeError(f"task.evaluate: expected a dict of metric name -> number, got {type(raw).__name__}")
            metrics = {str(key): float(value) for key, value in raw.items()}
        if not sharded:
            metrics = broadcast_object(metrics, context)
        event: dict[str, Any] = {"kind": "eval", "step": self.step, "time_s": round(self._elapsed(), 4)}
        train_events = [e for e in self.history if e["kind"] == "train"]
        if train_events:
            event["loss"] = train_events[-1]["loss"]
        event.update(metrics)
        self._last_eval = (self.step, metrics)
        self.history.append(event)
        self.logger.record(event)
        self.logger.show_eval(event)
        return metrics

    def _save_checkpoint(self) -> None:
        self._flush()
        self._latest_checkpoint = self.state.save(
            self.run_dir, step=self.step, elapsed_s=self._elapsed(), history=self.history
        )
        self._last_saved_step = self.step
        self._last_saved_time = time.perf_counter()


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "move_to_device"]
