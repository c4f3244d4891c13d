"""Argument checks for public entry points: clear ``ValueError`` / ``TypeError`` naming the argument.

Library code never uses ``assert`` for input checks (asserts vanish under ``python -O`` and carry
no message a user can act on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_tensor(
    value: object,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    dtype: str | torch.dtype | None = None,
) -> torch.Tensor:
    """Check ``value`` is a tensor of the given rank and dtype kind ("float", "int", "bool")."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            ranks = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name}: expected a {ranks}-D tensor, got shape {tuple(value.shape)}")
    if dtype is not None:
        ok = (
            {
                "float": value.is_floating_point(),
                "int": not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool,
                "bool": value.dtype == torch.bool,
            }.get(dtype)
            if isinstance(dtype, str)
            else value.dtype == dtype
        )
        if ok is None:
            raise ValueError(f"unknown dtype kind {dtype!r}")
        if not ok:
            raise TypeError(f"{name}: expected a {dtype} tensor, got dtype {value.dtype}")
    return value


def check_dim(value: torch.Tensor, name: str, axis: int, expected: int, what: str = "size") -> None:
    if value.shape[axis] != expected:
        raise ValueError(f"{name}: expected {what} {expected} on axis {axis}, got shape {tuple(value.shape)}")


def check_ids(ids: torch.Tensor, name: str, num_tokens: int) -> torch.Tensor:
    """Integer token ids in ``[0, num_tokens)``."""
    check_tensor(ids, name, dtype="int")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_tokens):
        raise ValueError(f"{name}: ids must lie in [0, {num_tokens}), got range [{int(ids.min())}, {int(ids.max())}]")
    return ids


def check_int(value: object, name: str, *, minimum: int = 1) -> None:
    """An integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def check_number(
    value: object,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A real number (not a bool) in the interval from ``low`` to ``high`` (open ends as flagged)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        if math.isinf(high):
            expected = f"{'>' if low_open else '>='} {low:g}"
        else:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a value {expected}, got {value!r}")
