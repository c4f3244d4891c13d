"""Process-group set-up and the few collectives the Trainer needs, written on ``torch.distributed``.

One process (no ``torchrun``) is a world of size 1 and every helper here is then a no-op, so the
same training loop runs on 1 CPU, 1 GPU, or N processes / GPUs launched by ``torchrun``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool
    """this process group was created here (and is destroyed when training ends)"""
    control_group: Any = None
    """a CPU (gloo) group for the small decisions every rank must share each step (stop, checkpoint),
    so agreeing on them never waits on the accelerator"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device, *, local_rank: int = 0) -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU; ``"cuda"`` means this process's GPU."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device: expected a string such as 'auto', 'cpu' or 'cuda', got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device: {device!r} is not a device (expected 'auto', 'cpu', 'cuda' or 'cuda:N')") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} was asked for but CUDA is not available")
        index = local_rank if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
        resolved = torch.device("cuda", index)
    return resolved


def setup_distributed(device: str | torch.device) -> DistributedContext:
    """Join the process group ``torchrun`` describes in the environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank=local_rank)
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=resolved if resolved.type == "cuda" else None)
        initialized_here = True
    control_group = None
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if world_size > 1:
            control_group = _control_group()
    else:
        rank, world_size = 0, 1
    return DistributedContext(rank, world_size, local_rank, resolved, initialized_here, control_group)


_CONTROL_GROUPS: dict[int, Any] = {}


def _control_group() -> Any:
    """The default group when it is gloo already, else one gloo group per process group (made once)."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    key = id(dist.group.WORLD)
    if key not in _CONTROL_GROUPS:
        _CONTROL_GROUPS[key] = dist.new_group(backend="gloo")
    return _CONTROL_GROUPS[key]


def teardown_distributed(context: DistributedContext, *, finished: bool = True) -> None:
    """Leave the process group this process joined; ``finished=False`` (a rank failed) skips the barrier."""
    if context.initialized_here and dist.is_initialized():
        # Every rank reaches this line before any tears down: a gloo peer whose partner has already
        # closed its sockets can abort in its background thread ("terminate called without an active
        # exception"), which turned a finished run into a SIGABRT.
        if finished:
            dist.barrier()
        _CONTROL_GROUPS.clear()
        dist.destroy_process_group()


def agree_any(flags: list[bool], context: DistributedContext) -> list[bool]:
    """Each flag set on any rank, on every rank (one small CPU collective; no-op with one process)."""
    if not context.is_distributed:
        return list(flags)
    tensor = torch.tensor([float(flag) for flag in flags])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=context.control_group)
    return [bool(value) for value in tensor.tolist()]


def all_reduce_mean(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if context.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= context.world_size
    return tensor


def broadcast_object(obj: Any, context: DistributedContext) -> Any:
    if not context.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``obj``, indexed by rank, on every rank."""
    if not context.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()
