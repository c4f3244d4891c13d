"""What a training checkpoint holds, written and read side by side, so a resumed run continues exactly.

A checkpoint (see :mod:`quintet.training.checkpoint` for the folder layout) holds the weights, the EMA
weights, the optimizer state, and ``trainer_state.pt``: scheduler state, the task's extra modules (a
target network), every rank's random state, the step, the training time so far and the logged
history. A run with whole weights on each rank (one process, DDP) writes the weights with
``save_pretrained`` and the optimizer state whole; an FSDP run writes weights, EMA and optimizer
state shard by shard (``torch.distributed.checkpoint``), so no rank gathers the model, and such a
checkpoint resumes on any number of processes.

:meth:`RunState.save` writes all of it; :func:`restore_weights` (before the model is wrapped: whole
weights, extra modules) and :meth:`RunState.restore_progress` (after: the optimizer, sharded weights,
the EMA, the random state) read it back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quintet.core.config import CONFIG_FILE, CheckpointError, config_to_dict, save_config
from quintet.training.checkpoint import (
    CHECKPOINTS_DIR,
    EMA_DIR,
    FORMAT_VERSION,
    MODEL_DIR,
    SHARDED_DIR,
    begin_checkpoint,
    commit_checkpoint,
    is_sharded_checkpoint,
    load_module_weights,
    write_checkpoint,
    write_checkpoint_files,
)
from quintet.training.distributed import DistributedContext, barrier, broadcast_object, gather_objects
from quintet.training.ema import WeightEMA
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


def restore_weights(
    model: nn.Module, extra_state: dict[str, nn.Module], checkpoint: Path, state: dict[str, Any], *, device
) -> None:
    """Load the extra modules and, from a whole checkpoint, the weights (before the model is wrapped;
    a sharded checkpoint's weights load after, in :meth:`RunState.restore_progress`)."""
    for name, module in extra_state.items():
        if name not in state["extra_state"]:
            raise CheckpointError(f"{checkpoint}: has no state for extra module {name!r}")
        module.load_state_dict(state["extra_state"][name])
    if not is_sharded_checkpoint(checkpoint):
        load_module_weights(model, checkpoint / MODEL_DIR, map_location=device)


@dataclass(kw_only=True)
class RunState:
    """The objects one run checkpoints, and how to save and restore them."""

    model: nn.Module
    parallel_model: nn.Module
    """``model`` as wrapped for several processes (``model`` itself with one)"""
    ema: WeightEMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    extra_state: dict[str, nn.Module]
    context: DistributedContext
    parallel: str
    settings: TrainSettings
    run_config: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return is_sharded(self.context, self.parallel)

    # -------------------------------------------------------------------------------- restore

    def restore_progress(self, checkpoint: Path, state: dict[str, Any]) -> Progress:
        """Load the optimizer (and a sharded checkpoint's weights), the EMA and the random state (after
        wrapping); where the run stands."""
        if self.ema is not None and state.get("ema_n_averaged") is None:
            raise CheckpointError(f"{checkpoint}: the run kept no EMA; resume it without ema_decay")
        if is_sharded_checkpoint(checkpoint):
            self._load_sharded(checkpoint)
        else:
            self._load_whole(checkpoint, state)
        if self.ema is not None:
            self.ema.n_averaged = int(state["ema_n_averaged"])
        self.scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        saved_rng, context = state["rng"], self.context
        note = None
        saved_accum = state.get("data_position", {}).get("grad_accum", self.settings.grad_accum)
        if saved_accum != self.settings.grad_accum:
            note = (
                f"the checkpoint accumulated {saved_accum} micro-batches per step and this run "
                f"{self.settings.grad_accum}: it reads other batches than an uninterrupted run would"
            )
        if len(saved_rng) == context.world_size:
            restore_rng(saved_rng[context.rank], context.device)
        else:
            # another process count reads other batches anyway; reseed so that each rank still differs
            seed_everything(self.settings.seed + context.rank + 1_000_003 * step)
            note = (note + "; " if note else "") + (
                f"the checkpoint was written by {len(saved_rng)} process(es) and this run has {context.world_size}: "
                "its random state is reseeded, so the run does not repeat an uninterrupted one exactly"
            )
        return Progress(step=step, elapsed_s=float(state["elapsed_s"]), history=list(state["history"]), note=note)

    def _load_whole(self, checkpoint: Path, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.parallel_model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        if self.ema is None:
            return
        device = self.context.device
        if self.ema.module is not None:
            load_module_weights(self.ema.module, checkpoint / EMA_DIR, map_location=device)
            return
        # a whole EMA into a sharded run: each rank keeps its shard of every tensor
        from torch.distributed.tensor import DTensor, distribute_tensor

        whole = type(self.model)(self.model.config)
        load_module_weights(whole, checkpoint / EMA_DIR, map_location=device)
        full = whole.state_dict()
        shards = {}
        for name, tensor in self.ema.state_dict().items():
            value = full[name].to(device)
            shards[name] = (
                distribute_tensor(value, tensor.device_mesh, tensor.placements)
                if isinstance(tensor, DTensor)
                else value
            )
        self.ema.load_state_dict(shards)

    def _load_sharded(self, checkpoint: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.parallel_model, self.optimizer)
        state = {MODEL_DIR: model_state, "optimizer": optimizer_state}
        if self.ema is not None:
            state[EMA_DIR] = self.ema.state_dict()
        try:
            dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR), no_dist=not self.context.is_distributed)
        except (RuntimeError, ValueError, KeyError, OSError, CheckpointException) as error:
            raise CheckpointError(f"{checkpoint / SHARDED_DIR}: does not fit this run ({error})") from error
        set_state_dict(
            self.parallel_model,
            self.optimizer,
            model_state_dict=state[MODEL_DIR],
            optim_state_dict=state["optimizer"],
        )
        if self.ema is not None:
            self.ema.load_state_dict(state[EMA_DIR])

    # -------------------------------------------------------------------------------- save

    def _trainer_state(self, *, step: int, elapsed_s: float, history: list[dict], rng: list, optimizer: Any) -> dict:
        world = self.context.world_size
        return {
            "format_version": FORMAT_VERSION,
            "step": step,
            "elapsed_s": elapsed_s,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "ema_n_averaged": self.ema.n_averaged if self.ema is not None else None,
            "extra_state": {
                name: {k: v.cpu() for k, v in module.state_dict().items()} for name, module in self.extra_state.items()
            },
            "rng": rng,
            "data_position": {
                "step": step,
                "grad_accum": self.settings.grad_accum,
                "world_size": world,
                "next_index": step * self.settings.grad_accum * world,
            },
            "settings": config_to_dict(self.settings),
            "run_config": self.run_config,
            "history": history,
        }

    def _run_config(self, step: int) -> dict[str, Any]:
        return {**self.run_config, "settings": config_to_dict(self.settings), "step": step}

    def save(self, run_dir: Path, *, step: int, elapsed_s: float, history: list[dict]) -> Path:
        """Write checkpoint ``step`` (every rank takes part); returns its folder on every rank."""
        checkpoints_dir = run_dir / CHECKPOINTS_DIR
        rng = gather_objects(capture_rng(self.context.device), self.context)
        if self.sharded:
            return self._save_sharded(checkpoints_dir, step=step, elapsed_s=elapsed_s, history=history, rng=rng)
        # imported here: torch.distributed.checkpoint takes a second to import, a cost only saving needs
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(self.parallel_model, self.optimizer, options=options)
        written = None
        if self.context.is_main:
            models = {MODEL_DIR: self.model}
            if self.ema is not None:
                models[EMA_DIR] = self.ema.module
            state = self._trainer_state(
                step=step, elapsed_s=elapsed_s, history=history, rng=rng, optimizer=optimizer_state
            )
            run_config, keep = self._run_config(step), self.settings.keep_last
            written = write_checkpoint(
                checkpoints_dir, step, models=models, state=state, run_config=run_config, keep=keep
            )
        return broadcast_object(written, self.context)

    def _save_sharded(self, checkpoints_dir: Path, *, step: int, elapsed_s: float, history: list, rng: list) -> Path:
        """Each rank writes its shards into the staging folder rank 0 made; rank 0 commits it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        staging = begin_checkpoint(checkpoints_dir, step) if self.context.is_main else None
        staging = broadcast_object(staging, self.context)
        model_state, optimizer_state = get_state_dict(self.parallel_model, self.optimizer)
        state = {MODEL_DIR: model_state, "optimizer": optimizer_state}
        if self.ema is not None:
            state[EMA_DIR] = self.ema.state_dict()
        dcp.save(state, checkpoint_id=str(staging / SHARDED_DIR))
        written = None
        if self.context.is_main:
            save_config(self.model.config, staging / MODEL_DIR / CONFIG_FILE)
            trainer_state = self._trainer_state(
                step=step, elapsed_s=elapsed_s, history=history, rng=rng, optimizer=None
            )
            run_config = {**self.run_config, "settings": config_to_dict(self.settings), "step": step}
            write_checkpoint_files(staging, state=trainer_state, run_config=run_config)
            written = commit_checkpoint(checkpoints_dir, step, keep=self.settings.keep_last)
        barrier(self.context)
        return broadcast_object(written, self.context)
