"""What a training checkpoint holds, written and read side by side, so a resumed run continues exactly.

A checkpoint (see :mod:`quintet.training.checkpoint` for the folder layout) holds the weights
(``save_pretrained``), the EMA weights, and ``trainer_state.pt``: optimizer and scheduler state, the
task's extra modules (a target network), every rank's random state, the step, the training time so far
and the logged history. :meth:`RunState.save` writes all of it; :meth:`RunState.restore_weights` (before
the model is wrapped for several processes) and :meth:`RunState.restore_progress` (after) read it back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from quintet.core.config import CheckpointError, config_to_dict
from quintet.training.checkpoint import (
    CHECKPOINTS_DIR,
    EMA_DIR,
    FORMAT_VERSION,
    MODEL_DIR,
    load_module_weights,
    write_checkpoint,
)
from quintet.training.distributed import DistributedContext, broadcast_object, gather_objects
from quintet.training.parallel import is_sharded
from quintet.training.task import TrainSettings


def capture_rng(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


@dataclass(frozen=True)
class Progress:
    """Where a restored run stands."""

    step: int
    elapsed_s: float
    history: list[dict[str, Any]]
    note: str | None
    """set when the random state could not be restored exactly (another process count)"""


@dataclass(kw_only=True)
class RunState:
    """The objects one run checkpoints, and how to save and restore them."""

    model: nn.Module
    parallel_model: nn.Module
    """``model`` as wrapped for several processes (``model`` itself with one)"""
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    extra_state: dict[str, nn.Module]
    context: DistributedContext
    parallel: str
    settings: TrainSettings
    run_config: dict[str, Any]

    # -------------------------------------------------------------------------------- restore

    def restore_weights(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Load the weights, extra modules and EMA (before the model is wrapped)."""
        device = self.context.device
        load_module_weights(self.model, checkpoint / MODEL_DIR, map_location=device)
        for name, module in self.extra_state.items():
            if name not in state["extra_state"]:
                raise CheckpointError(f"{checkpoint}: has no state for extra module {name!r}")
            module.load_state_dict(state["extra_state"][name])
        if self.ema is not None:
            if state.get("ema_n_averaged") is None:
                raise CheckpointError(f"{checkpoint}: the run kept no EMA; resume it without ema_decay")
            load_module_weights(self.ema.module, checkpoint / EMA_DIR, map_location=device)
            self.ema.n_averaged.copy_(state["ema_n_averaged"])

    def restore_progress(self, state: dict[str, Any]) -> Progress:
        """Load optimizer, scheduler and random state (after wrapping); where the run stands."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.parallel_model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        self.scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        saved_rng, context = state["rng"], self.context
        note = None
        if len(saved_rng) == context.world_size:
            restore_rng(saved_rng[context.rank], context.device)
        else:
            # another process count reads other batches anyway; reseed so that each rank still differs
            seed_everything(self.settings.seed + context.rank + 1_000_003 * step)
            note = (
                f"the checkpoint was written by {len(saved_rng)} process(es) and this run has {context.world_size}: "
                "its random state is reseeded, so the run does not repeat an uninterrupted one exactly"
            )
        return Progress(step=step, elapsed_s=float(state["elapsed_s"]), history=list(state["history"]), note=note)

    # -------------------------------------------------------------------------------- save

    def _model_to_save(self) -> nn.Module | None:
        """The full weights as a ``save_pretrained``-capable module (collective under FSDP)."""
        if not is_sharded(self.context, self.parallel):
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.parallel_model, options=options)
        if not self.context.is_main:
            return None
        with torch.device("meta"):
            clone = type(self.model)(self.model.config)
        clone.load_state_dict(full, assign=True)
        return clone

    def save(self, run_dir: Path, *, step: int, elapsed_s: float, history: list[dict], keep: int) -> Path:
        """Write checkpoint ``step`` (rank 0 writes; every rank takes part); returns its folder on every rank."""
        # imported here: torch.distributed.checkpoint takes a second to import, a cost only saving needs
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(self.parallel_model, self.optimizer, options=options)
        model = self._model_to_save()
        rng = gather_objects(capture_rng(self.context.device), self.context)
        written = None
        if self.context.is_main:
            models = {MODEL_DIR: model}
            if self.ema is not None:
                models[EMA_DIR] = self.ema.module
            settings = config_to_dict(self.settings)
            world = self.context.world_size
            state = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "elapsed_s": elapsed_s,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "ema_n_averaged": self.ema.n_averaged.cpu() if self.ema is not None else None,
                "extra_state": {
                    name: {k: v.cpu() for k, v in module.state_dict().items()}
                    for name, module in self.extra_state.items()
                },
                "rng": rng,
                "data_position": {
                    "step": step,
                    "grad_accum": self.settings.grad_accum,
                    "world_size": world,
                    "next_index": step * self.settings.grad_accum * world,
                },
                "settings": settings,
                "run_config": self.run_config,
                "history": history,
            }
            written = write_checkpoint(
                run_dir / CHECKPOINTS_DIR,
                step,
                models=models,
                state=state,
                run_config={**self.run_config, "settings": settings, "step": step},
                keep=keep,
            )
        return broadcast_object(written, self.context)
