"""One logging interval of a run: losses, gradient norms, task metrics and throughput.

Everything a step produces stays on the device (detached tensors, summed as they come) and is read
to the host once, when the interval is logged, so no step waits on the device just to report a
number. Time spent evaluating or checkpointing is paused out of the throughput.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from quintet.training.distributed import DistributedContext, all_reduce_mean


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


class IntervalMeter:
    """Accumulates the steps between two log events; :meth:`read` turns them into one event's numbers."""

    def __init__(self, context: DistributedContext, *, samples_per_micro: int):
        self.context = context
        self.samples_per_micro = samples_per_micro
        self.start()

    def start(self) -> None:
        self.pending_losses: list[torch.Tensor] = []
        self.pending_norms: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.metric_sums: dict[str, torch.Tensor | float] = {}
        self.micro_batches = 0
        self.tokens = 0
        self.flops = 0.0
        self.paused_s = 0.0
        self.started = time.perf_counter()

    def add_micro(self, metrics: dict[str, Any], *, tokens: int = 0, flops: float = 0.0) -> None:
        for key, value in metrics.items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            self.metric_sums[key] = self.metric_sums[key] + value if key in self.metric_sums else value
        self.micro_batches += 1
        self.tokens += tokens
        self.flops += flops

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.pending_losses.append(loss)
        if grad_norm is not None:
            self.pending_norms.append(grad_norm)

    def pause(self, seconds: float) -> None:
        self.paused_s += seconds

    def flush(self, step: int, latest_checkpoint: str) -> None:
        """Bring the pending step losses to the host (one sync); stop on the first non-finite one."""
        if not self.pending_losses:
            return
        losses = all_reduce_mean(torch.stack(self.pending_losses).float(), self.context).tolist()
        first_step = step - len(losses) + 1
        self.pending_losses.clear()
        for offset, value in enumerate(losses):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"training stopped: the loss is {value} at step {first_step + offset}; "
                    f"the latest checkpoint ({latest_checkpoint}) is unchanged"
                )
        self.losses.extend(losses)
        if self.pending_norms:
            self.norms.extend(torch.stack(self.pending_norms).float().tolist())
            self.pending_norms.clear()

    def read(self) -> dict[str, float] | None:
        """The interval's means and rates (after :meth:`flush`), or None when it holds no step."""
        steps = len(self.losses)
        if steps == 0:
            return None
        seconds = max(1e-9, time.perf_counter() - self.started - self.paused_s)
        numbers: dict[str, float] = {"loss": sum(self.losses) / steps}
        if self.norms:
            numbers["grad_norm"] = sum(self.norms) / len(self.norms)
        if self.metric_sums:
            keys = sorted(self.metric_sums)
            device = self.context.device
            sums = torch.stack([torch.as_tensor(self.metric_sums[k], device=device).double() for k in keys])
            means = all_reduce_mean(sums / self.micro_batches, self.context).tolist()
            numbers.update(zip(keys, means))
        world = self.context.world_size
        numbers["steps_per_s"] = steps / seconds
        numbers["samples_per_s"] = self.micro_batches * self.samples_per_micro * world / seconds
        if self.tokens:
            numbers["tokens_per_s"] = self.tokens * world / seconds
        if self.flops:
            numbers["flops_per_s"] = self.flops * world / seconds
        return numbers
