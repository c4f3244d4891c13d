"""Process-group set-up and the few collectives the Trainer needs, written on ``torch.distributed``.

One process (no ``torchrun``) is a world of size 1 and every helper here is then a no-op, so the
same training loop runs on 1 CPU, 1 GPU, or N processes / GPUs launched by ``torchrun``.
"""

from __future__ import annotations

import os
import time
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
        # every rank ends its collectives before any rank leaves the group
        if finished:
            dist.barrier()
        _CONTROL_GROUPS.clear()
        dist.destroy_process_group()
        wait_for_gloo_workers()


GLOO_WORKER_THREAD = "pt_gloo_runloop"


def _gloo_workers_busy(task_dir: str = "/proc/self/task") -> bool:
    """Whether a gloo worker thread of this process is running or runnable (Linux ``/proc``)."""
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/comm") as comm, open(f"{task_dir}/{tid}/stat") as stat:
                name, status = comm.read().strip(), stat.read()
        except OSError:  # the thread ended between listing and reading
            continue
        if name == GLOO_WORKER_THREAD and status[status.rindex(")") + 2] == "R":
            return True
    return False


def wait_for_gloo_workers(
    *, quiet_polls: int = 3, poll_s: float = 0.002, timeout_s: float = 2.0, task_dir: str = "/proc/self/task"
) -> None:
    """Return once every gloo worker thread has gone idle (or after ``timeout_s``).

    Why: ``destroy_process_group`` does not stop a gloo group that something still holds (a DDP
    wrapper, an FSDP device mesh: the model outlives the run), so its worker threads live on. A worker
    that finished a collective drops its reference to the tensors afterwards, which takes the GIL
    (they are Python tensors). If the main thread has meanwhile reached interpreter shutdown, Python
    ends that thread inside a C++ destructor and the process aborts ("terminate called without an
    active exception", SIGABRT) although the run had finished; a loaded machine, which deschedules
    the worker for a while, made this happen in about 3 % of two-process runs. Sleeping releases the
    GIL; a worker still busy is running or runnable, an idle one sleeps on its queue, so a few quiet
    polls in a row mean no worker will touch Python again.
    """
    if not os.path.isdir(task_dir):  # not Linux: nothing to watch
        return
    deadline, quiet = time.monotonic() + timeout_s, 0
    while quiet < quiet_polls and time.monotonic() < deadline:
        time.sleep(poll_s)
        quiet = 0 if _gloo_workers_busy(task_dir) else quiet + 1


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
