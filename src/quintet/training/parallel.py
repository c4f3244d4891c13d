"""How several processes share one model: DDP (replicated) or FSDP2 (sharded), applied by the Trainer.

Model files are single-device code (torchtitan's rule); this module is the only place that wraps
them. Under FSDP each *shard unit* is sharded on its own, so only one unit's full weights exist at a
time: the model names its units (:meth:`~quintet.core.config.PretrainedModel.fsdp_units`; by default
every submodule whose class sets ``fsdp_unit = True``, as ``core.TransformerBlock`` does), so MaxViT
blocks, spatio-temporal blocks or gated cross-attention blocks shard as well as transformer blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from quintet.training.distributed import DistributedContext

PARALLEL_MODES = ("ddp", "fsdp")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules FSDP shards one by one, innermost first (``fully_shard`` wants children before parents)."""
    named = getattr(model, "fsdp_units", None)  # PretrainedModel's; any other module: the same default rule
    units = list(named()) if callable(named) else [m for m in model.modules() if getattr(m, "fsdp_unit", False)]
    order = {id(module): index for index, module in enumerate(model.modules())}
    return sorted((u for u in units if u is not model), key=lambda m: -order[id(m)])


def wrap(model: nn.Module, context: DistributedContext, parallel: str, *, find_unused_parameters: bool) -> nn.Module:
    """``model`` ready for data-parallel training on ``context``'s processes (itself with one process)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel: expected one of {PARALLEL_MODES}, got {parallel!r}")
    if not context.is_distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    from torch.distributed.fsdp import fully_shard

    # fully_shard shards each rank's own copy: start every rank from rank 0's weights
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def is_sharded(context: DistributedContext, parallel: str) -> bool:
    return context.is_distributed and parallel == "fsdp"


@contextlib.contextmanager
def gradient_sync(
    parallel_model: nn.Module, context: DistributedContext, parallel: str, *, enabled: bool, grad_accum: int
) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if not context.is_distributed or grad_accum == 1:
        yield
    elif parallel == "ddp":
        with contextlib.nullcontext() if enabled else parallel_model.no_sync():
            yield
    else:
        parallel_model.set_requires_gradient_sync(enabled)
        yield


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) ``DTensor``; a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
