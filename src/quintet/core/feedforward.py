"""Position-wise feedforward: GELU MLP or SwiGLU (Shazeer 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float = 4.0, *, activation: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation: expected 'gelu' or 'swiglu', got {activation!r}")
        self.activation = activation
        # SwiGLU keeps the parameter count of a GELU MLP of the same mult with 2/3 of the hidden width.
        hidden = int(dim * mult * 2 / 3) if activation == "swiglu" else int(dim * mult)
        self.proj_in = nn.Linear(dim, hidden * 2 if activation == "swiglu" else hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        if self.activation == "swiglu":
            value, gate = h.chunk(2, dim=-1)
            h = value * F.silu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(self.dropout(h))
