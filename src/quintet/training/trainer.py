"""The one training loop every system uses.

A system hands over a :class:`~quintet.training.task.Task` (model, loss, batches, hooks); the
Trainer owns everything else: devices and processes (``torch.distributed``: DDP by default, FSDP2
``fully_shard`` by option), gradient accumulation, clipping, bf16 autocast, AdamW with warm-up and
cosine decay, an optional EMA of the weights, periodic evaluation, atomic checkpoints that resume
exactly, and the logs (console, ``metrics.jsonl``, TensorBoard, a loss-curve PNG).

Micro-batch ``micro`` of optimizer step ``step`` on process ``rank`` is ``task.train_batch(index)``
with ``index = (step * grad_accum + micro) * world_size + rank``: the data position is the step, so
a resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from quintet.core.config import CheckpointError, config_to_dict
from quintet.training.checkpoint import (
    CHECKPOINTS_DIR,
    EMA_DIR,
    FORMAT_VERSION,
    MODEL_DIR,
    check_plain,
    latest_checkpoint,
    load_module_weights,
    load_trainer_state,
    write_checkpoint,
)
from quintet.training.distributed import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    gather_objects,
    setup_distributed,
    teardown_distributed,
)
from quintet.training.progress import METRICS_FILE, TENSORBOARD_DIR, RunLogger, format_rate
from quintet.training.report import plot_loss_curves
from quintet.training.task import RunInfo, Task

PARALLEL_MODES = ("ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp32")
LOSS_CURVE_FILE = "loss_curve.png"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


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
    """why training ended before ``settings.steps`` ("time budget", "interrupted"), else None"""


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


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ensure_writable_dir(path: Path, name: str) -> Path:
    """Create ``path`` if needed and check a file can be written there; ValueError naming ``name`` if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".quintet-write-test"
        probe.write_text("ok", encoding="ascii")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{name}: cannot write to {path} ({reason})") from error
    return path


def _capture_rng(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


class Trainer:
    """Train ``task`` into ``run_dir``; ``fit()`` returns a :class:`TrainResult`.

    - ``device``: "auto" (the GPU when there is one), "cpu", "cuda" or "cuda:N"; under ``torchrun``
      each process takes the GPU of its local rank.
    - ``parallel``: with several processes, "ddp" (replicated weights) or "fsdp" (FSDP2 ``fully_shard``
      of every ``TransformerBlock`` and the root).
    - ``precision``: "auto" is bf16 autocast on a GPU that supports it and float32 elsewhere.
    - ``resume``: continue from the latest checkpoint of ``run_dir``; without it a run that already
      lives in ``run_dir`` is replaced.
    - ``run_config``: plain data describing the run (system, preset, ...), stored in every checkpoint.
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
        keep_checkpoints: int = 2,
        find_unused_parameters: bool = False,
        live_progress: bool | None = None,
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
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: expected an integer >= 1, got {keep_checkpoints!r}")
        if parallel == "fsdp" and task.settings.ema_decay is not None:
            raise ValueError("ema_decay: an EMA of the weights is not supported with parallel='fsdp'")
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
        self.keep_checkpoints = keep_checkpoints
        self.find_unused_parameters = bool(find_unused_parameters)
        self.live_progress = live_progress

        self.model: nn.Module = task.model
        self.ema: AveragedModel | None = None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._latest_checkpoint: Path | None = None
        self._last_saved_step: int | None = None
        self._stop_requested = threading.Event()
        self._last_eval: tuple[int, dict[str, float]] | None = None

    # ------------------------------------------------------------------ public helpers

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and sample from: the EMA when the run keeps one, else the model."""
        return self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------ fit

    def fit(self) -> TrainResult:
        self.context = setup_distributed(self.device_request)
        self.device = self.context.device
        self.logger: RunLogger | None = None
        previous_handler = self._install_interrupt_handler()
        try:
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
            eval_metrics = {}
            if self.task.evaluate is not None:
                # a run that stopped right after an evaluation (stop_when) is not evaluated twice
                evaluated_now = self._last_eval is not None and self._last_eval[0] == self.step
                eval_metrics = self._last_eval[1] if evaluated_now else self._evaluate()
            if self._last_saved_step != self.step:
                self._save_checkpoint()
            loss_curve = None
            if self.context.is_main and any(e["kind"] == "train" for e in self.history):
                loss_curve = plot_loss_curves(self.history, self.run_dir / LOSS_CURVE_FILE, title="loss")
            train_events = [e for e in self.history if e["kind"] == "train"]
            last_train = train_events[-1] if train_events else {}
            train_metrics = {k: v for k, v in last_train.items() if k not in ("kind", "step", "time_s")}
            if stopped_early:
                self.logger.message(f"stopped at step {self.step} ({stopped_early}); continue it with resume")
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
        finally:
            if self.logger is not None:
                self.logger.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            teardown_distributed(self.context)

    def _install_interrupt_handler(self):
        """First Ctrl-C: finish the current step, checkpoint and return; a second one aborts."""
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            self._stop_requested.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, request_stop)
        return previous

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        context, settings = self.context, self.settings
        checkpoint, state = self._prepare_run_dir()

        self.model.to(self.device)
        for module in self.task.extra_state.values():
            module.to(self.device)
        if checkpoint is not None:
            load_module_weights(self.model, checkpoint / MODEL_DIR, map_location=self.device)
            for name, module in self.task.extra_state.items():
                if name not in state["extra_state"]:
                    raise CheckpointError(f"{checkpoint}: has no state for extra module {name!r}")
                module.load_state_dict(state["extra_state"][name])
        if settings.ema_decay is not None:
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True
            )
            if checkpoint is not None:
                if state.get("ema_n_averaged") is None:
                    raise CheckpointError(f"{checkpoint}: the run kept no EMA; resume it without ema_decay")
                load_module_weights(self.ema.module, checkpoint / EMA_DIR, map_location=self.device)
                self.ema.n_averaged.copy_(state["ema_n_averaged"])

        self._autocast_dtype = self._resolve_precision()
        self._wrapped = self._wrap(self.model)
        self.module = torch.compile(self._wrapped) if self.compile else self._wrapped
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                step,
                warmup_steps=settings.warmup_steps,
                total_steps=settings.steps,
                min_lr_ratio=settings.min_lr_ratio,
            ),
        )

        self._elapsed_offset = 0.0
        rng_note = None
        if checkpoint is None:
            _seed_everything(settings.seed + context.rank)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self._wrapped, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            self._last_saved_step = self.step
            self._latest_checkpoint = checkpoint
            self._elapsed_offset = float(state["elapsed_s"])
            self.history = list(state["history"])
            rng_note = self._restore_rng(state)

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
        if rng_note:
            self.logger.message(rng_note)

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

    def _restore_rng(self, state: dict[str, Any]) -> str | None:
        """Restore this rank's random state; returns a note when it had to be reseeded instead."""
        saved = state["rng"]
        if len(saved) == self.context.world_size:
            _restore_rng(saved[self.context.rank], self.device)
            return None
        # another process count reads other batches anyway; reseed so that each rank still differs
        _seed_everything(self.settings.seed + self.context.rank + 1_000_003 * self.step)
        return (
            f"the checkpoint was written by {len(saved)} process(es) and this run has {self.context.world_size}: "
            "its random state is reseeded, so the run does not repeat an uninterrupted one exactly"
        )

    def _resolve_precision(self) -> torch.dtype | None:
        if self.precision == "fp32":
            return None
        if self.precision == "bf16":
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.context.is_distributed:
            return model
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters
            )
        from torch.distributed.fsdp import fully_shard

        from quintet.core.transformer import TransformerBlock

        # fully_shard shards each rank's own copy: start every rank from rank 0's weights
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        for module in model.modules():
            if isinstance(module, TransformerBlock):
                fully_shard(module)
        fully_shard(model)
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for parameter in self._wrapped.parameters():
            if parameter.requires_grad:
                # nanoGPT's rule: matrices and embeddings decay, biases and norm gains do not
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        if not decay and not no_decay:
            raise ValueError("task.model: has no trainable parameters")
        groups = [
            {"params": decay, "weight_decay": self.settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        kernel = {"fused": True} if self.device.type == "cuda" and self.parallel != "fsdp" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=self.settings.lr, betas=self.settings.betas, **kernel)

    # ------------------------------------------------------------------ the loop

    def _elapsed(self) -> float:
        return self._elapsed_offset + (time.perf_counter() - self._loop_start)

    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if not self.context.is_distributed or self.settings.grad_accum == 1:
            yield
        elif self.parallel == "ddp":
            with contextlib.nullcontext() if enabled else self._wrapped.no_sync():
                yield
        else:
            self._wrapped.set_requires_gradient_sync(enabled)
            yield

    def _should_stop(self) -> str | None:
        """Why training stops before this step ("time budget", "interrupted"), or None.

        Under several processes the ranks agree on it with one collective at log steps only, so the
        budget and Ctrl-C are honoured up to ``log_every`` steps late there.
        """
        if self.context.is_distributed and self.step % self.settings.log_every:
            return None
        budget = self.settings.time_budget_s
        reasons = ("time budget", "interrupted")
        local = [budget is not None and self._elapsed() >= budget, self._stop_requested.is_set()]
        if self.context.is_distributed:
            # any rank that is out of time or interrupted stops them all, at the same step
            flags = torch.tensor([float(x) for x in local], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            local = [bool(x) for x in flags.tolist()]
        for reason, flag in zip(reasons, local):
            if flag:
                return reason
        return None

    def _train_loop(self) -> str | None:
        settings, context, task = self.settings, self.context, self.task
        grad_accum, world, rank = settings.grad_accum, context.world_size, context.rank
        self._loop_start = time.perf_counter()
        self._pending_losses: list[torch.Tensor] = []
        self._pending_norms: list[torch.Tensor] = []
        self._start_interval()
        self.module.train()
        stopped_early = None
        while self.step < settings.steps:
            stopped_early = self._should_stop()
            if stopped_early:
                break
            step_loss = None
            for micro in range(grad_accum):
                index = (self.step * grad_accum + micro) * world + rank
                batch = move_to_device(task.train_batch(index), self.device)
                if task.batch_tokens is not None:
                    self._interval_tokens += task.batch_tokens(batch)
                with self._gradient_sync(micro == grad_accum - 1):
                    with self._autocast():
                        loss, metrics = task.loss(self.module, batch)
                    (loss / grad_accum).backward()
                detached = loss.detach()
                step_loss = detached if step_loss is None else step_loss + detached
                for key, value in metrics.items():
                    self._interval_metrics[key] = self._interval_metrics.get(key, 0.0) + float(value)
            if settings.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self._wrapped.parameters(), settings.grad_clip, foreach=True)
                self._pending_norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.step += 1
            self._pending_losses.append(step_loss / grad_accum)
            self._interval_micro += grad_accum
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
        if self._pending_losses:
            self._log_train()
        return stopped_early

    def _paused(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` (evaluation, checkpoint) without counting its time against throughput."""
        start = time.perf_counter()
        try:
            return action()
        finally:
            self._interval_paused += time.perf_counter() - start

    def _start_interval(self) -> None:
        self._interval_losses: list[float] = []
        self._interval_norms: list[float] = []
        self._interval_metrics: dict[str, float] = {}
        self._interval_micro = 0
        self._interval_tokens = 0
        self._interval_start = time.perf_counter()
        self._interval_paused = 0.0

    def _flush_pending(self) -> None:
        """Bring the steps' losses to the host (one sync) and stop on the first non-finite one."""
        if not self._pending_losses:
            return
        losses = all_reduce_mean(torch.stack(self._pending_losses).float(), self.context).tolist()
        first_step = self.step - len(losses) + 1
        self._pending_losses.clear()
        for offset, value in enumerate(losses):
            if not math.isfinite(value):
                latest = self._latest_checkpoint.name if self._latest_checkpoint is not None else "none yet"
                raise NonFiniteLossError(
                    f"training stopped: the loss is {value} at step {first_step + offset}; "
                    f"the latest checkpoint ({latest}) is unchanged"
                )
        self._interval_losses.extend(losses)
        if self._pending_norms:
            norms = torch.stack(self._pending_norms).float().tolist()
            self._pending_norms.clear()
            self._interval_norms.extend(norms)

    def _log_train(self) -> None:
        self._flush_pending()
        steps = len(self._interval_losses)
        if steps == 0:
            return
        seconds = max(1e-9, time.perf_counter() - self._interval_start - self._interval_paused)
        event: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "time_s": round(self._elapsed(), 4),
            "loss": sum(self._interval_losses) / steps,
            "lr": self.scheduler.get_last_lr()[0],
        }
        if self._interval_norms:
            event["grad_norm"] = sum(self._interval_norms) / len(self._interval_norms)
        if self._interval_metrics:
            keys = sorted(self._interval_metrics)
            means = torch.tensor([self._interval_metrics[k] / self._interval_micro for k in keys], dtype=torch.float64)
            means = all_reduce_mean(means.to(self.device), self.context).tolist()
            event.update(zip(keys, means))
        world = self.context.world_size
        event["steps_per_s"] = steps / seconds
        if self.task.batch_tokens is not None:
            event["tokens_per_s"] = self._interval_tokens * world / seconds
            rate = format_rate(event["tokens_per_s"], "tok")
        else:
            event["samples_per_s"] = self._interval_micro * self.settings.batch_size * world / seconds
            rate = format_rate(event["samples_per_s"], "samples")
        eta = (self.settings.steps - self.step) / event["steps_per_s"]
        if self.settings.time_budget_s is not None:
            eta = min(eta, max(0.0, self.settings.time_budget_s - self._elapsed()))
        self.history.append(event)
        self.logger.record(event)
        self.logger.show_train(event, rate=rate, eta_s=eta)
        self._start_interval()

    def _evaluate(self) -> dict[str, float]:
        self._flush_pending()
        context, task = self.context, self.task
        sharded = context.is_distributed and self.parallel == "fsdp"
        target = self.eval_model if not sharded else self._wrapped
        metrics: dict[str, float] | None = None
        if sharded or context.is_main:
            devices = [self.device] if self.device.type == "cuda" else []
            was_training = target.training
            target.eval()
            # evaluation draws from its own copy of the RNG, so how often it runs never changes training
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast():
                try:
                    raw = task.evaluate(target)
                finally:
                    target.train(was_training)
                    if sharded:
                        # FSDP keeps the root's weights gathered after a forward with no backward
                        self._wrapped.reshard()
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

    # ------------------------------------------------------------------ checkpoints

    def _model_to_save(self) -> nn.Module | None:
        """The full weights as a ``save_pretrained``-capable module (collective under FSDP)."""
        if not (self.context.is_distributed and self.parallel == "fsdp"):
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self._wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.context.is_main:
            return None
        with torch.device("meta"):
            clone = type(self.model)(self.model.config)
        clone.load_state_dict(full, assign=True)
        return clone

    def _save_checkpoint(self) -> None:
        # imported here: torch.distributed.checkpoint takes a second to import, a cost only saving needs
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self._flush_pending()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(self._wrapped, self.optimizer, options=options)
        model = self._model_to_save()
        rng = gather_objects(_capture_rng(self.device), self.context)
        if self.context.is_main:
            models = {MODEL_DIR: model}
            if self.ema is not None:
                models[EMA_DIR] = self.ema.module
            settings = config_to_dict(self.settings)
            state = {
                "format_version": FORMAT_VERSION,
                "step": self.step,
                "elapsed_s": self._elapsed(),
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "ema_n_averaged": self.ema.n_averaged.cpu() if self.ema is not None else None,
                "extra_state": {
                    name: {k: v.cpu() for k, v in module.state_dict().items()}
                    for name, module in self.task.extra_state.items()
                },
                "rng": rng,
                "data_position": {
                    "step": self.step,
                    "grad_accum": self.settings.grad_accum,
                    "world_size": self.context.world_size,
                    "next_index": self.step * self.settings.grad_accum * self.context.world_size,
                },
                "settings": settings,
                "run_config": self.run_config,
                "history": self.history,
            }
            run_config = {**self.run_config, "settings": settings, "step": self.step}
            self._latest_checkpoint = write_checkpoint(
                self.run_dir / CHECKPOINTS_DIR,
                self.step,
                models=models,
                state=state,
                run_config=run_config,
                keep=self.keep_checkpoints,
            )
        self._latest_checkpoint = broadcast_object(self._latest_checkpoint, self.context)
        self._last_saved_step = self.step


__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "ensure_writable_dir",
    "lr_factor",
    "move_to_device",
]
