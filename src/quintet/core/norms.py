"""Normalisation layers, plain and conditioned (FiLM / adaptive norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * g."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


NORMS = {"rms": RMSNorm, "layer": nn.LayerNorm}


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"norm: expected one of {sorted(NORMS)}, got {kind!r}")
    return NORMS[kind](dim)


class ConditionedNorm(nn.Module):
    """A norm whose output is modulated by a conditioning vector: FiLM / adaptive norm.

    ``norm(x) * (1 + scale(c)) + shift(c)``; the projection starts at zero so a fresh model is the
    unconditioned one. ``cond`` is ``(b, dim_cond)`` (one vector per sample) or ``(b, n, dim_cond)``.
    """

    def __init__(self, kind: str, dim: int, dim_cond: int):
        super().__init__()
        self.norm = make_norm(kind, dim)
        self.to_scale_shift = nn.Linear(dim_cond, dim * 2)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(cond).chunk(2, dim=-1)
        if scale.ndim == 2:
            scale, shift = scale.unsqueeze(1), shift.unsqueeze(1)
        return self.norm(x) * (1 + scale) + shift
