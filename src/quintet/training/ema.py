"""An exponential moving average of a model's weights, whole or sharded.

``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (the first step copies), over
the parameters and the saved floating-point buffers, as ``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn`` does (written here because that one keeps a whole copy, which FSDP cannot).

One tensor per parameter: with one process or DDP they are the parameters of a whole copy of the
model (``module``: evaluated, sampled, saved with ``save_pretrained``); under FSDP they are copies of
each rank's *shards* (DTensors), updated locally with no communication and saved shard by shard,
and evaluation swaps them into the sharded model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (sharing its storage), or the tensor itself: the EMA's arithmetic is per shard."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _averaged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor for what an EMA follows: the model's state dict (parameters and saved buffers).
    Tied weights appear under each of their names, as the same tensor."""
    return model.state_dict(keep_vars=True)


class WeightEMA:
    """EMA of ``model``'s weights with ``decay``; ``sharded``: keep shard copies instead of a whole module."""

    def __init__(self, model: nn.Module, decay: float, *, sharded: bool):
        self.decay = decay
        self.sharded = sharded
        self.module: nn.Module | None = None
        named = _averaged_tensors(model)
        self.names = list(named)
        # one averaged tensor per distinct tensor: tied weights (one tensor, two names) share it
        firsts: dict[int, str] = {}
        self._slot = {name: firsts.setdefault(id(tensor), name) for name, tensor in named.items()}
        self._unique = list(dict.fromkeys(self._slot.values()))
        if sharded:
            self._averaged = {name: named[name].detach().clone() for name in self._unique}
        else:
            self.module = copy.deepcopy(model)
            self.module.requires_grad_(False)
            copied = _averaged_tensors(self.module)
            self._averaged = {name: copied[name].detach() for name in self._unique}
        self.tensors = [self._averaged[name] for name in self._unique]
        self._shards = [_local(tensor) for tensor in self.tensors]
        self.n_averaged = 0
        """updates so far (a Python number: reading it never waits on a device)"""

    def _sources(self, model: nn.Module) -> list[torch.Tensor]:
        """``model``'s tensors in the EMA's order (looked up once: the optimizer updates them in place)."""
        if getattr(self, "_source_of", None) is not model:
            named = _averaged_tensors(model)
            self._source_list = [_local(named[name].detach()) for name in self._unique]
            self._source_of = model
        return self._source_list

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = self._sources(model)
        if self.n_averaged == 0:
            torch._foreach_copy_(self._shards, current)
        else:
            floats = [(a, c) for a, c in zip(self._shards, current) if a.is_floating_point()]
            if floats:
                averaged, latest = zip(*floats)
                torch._foreach_lerp_(list(averaged), list(latest), 1.0 - self.decay)
            for a, c in zip(self._shards, current):
                if not a.is_floating_point():
                    a.copy_(c)  # integer buffers (counters) follow the model
        self.n_averaged += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> averaged tensor (shards under FSDP), every name of a tied weight included."""
        return {name: self._averaged[self._slot[name]] for name in self.names}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self._unique if name not in state]
        if missing:
            raise KeyError(f"ema: the checkpoint has no {missing[:3]}")
        torch._foreach_copy_(self._shards, [_local(state[name]) for name in self._unique])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` holding the EMA weights inside the block, its own weights again after it."""
        tensors = self._sources(model)
        with torch.no_grad():
            saved = [tensor.clone() for tensor in tensors]
            torch._foreach_copy_(tensors, self._shards)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(tensors, saved)
