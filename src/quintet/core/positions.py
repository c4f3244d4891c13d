"""Position encodings: sinusoidal, learned, and rotary (1-D and 2-D axial).

Shape glossary: ``n`` positions, ``d`` feature dim, ``a`` number of rotary axes (1 or 2).
"""

from __future__ import annotations

import torch
from torch import nn

from quintet.core.validation import check_tensor


def _as_positions(positions: torch.Tensor | int, device: torch.device | None) -> torch.Tensor:
    if isinstance(positions, int):
        return torch.arange(positions, device=device)
    return positions


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos table of Vaswani et al. (2017): ``positions (n,) -> (n, d)``."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: sinusoidal positions need an even dim, got {dim}")
        self.dim = dim
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor | int) -> torch.Tensor:
        positions = _as_positions(positions, self.inv_freq.device)
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class LearnedPositions(nn.Module):
    """A learned embedding per absolute position: ``positions (n,) -> (n, d)``."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, positions: torch.Tensor | int) -> torch.Tensor:
        positions = _as_positions(positions, self.embedding.weight.device)
        if positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"positions: at most {self.max_len} positions, got index {int(positions.max())}")
        return self.embedding(positions)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), 1-D or 2-D axial.

    ``forward(positions)`` takes integer or float positions ``(n,)`` (1-D) or ``(n, 2)`` (2-D: row,
    column) and returns rotation angles ``(n, d/2)`` for :func:`apply_rotary`. In the 2-D case half
    of the rotated pairs turn with the row and half with the column, so attention scores depend only
    on the relative offset ``(dy, dx)``.
    """

    def __init__(self, dim: int, *, axes: int = 1, theta: float = 10000.0):
        super().__init__()
        if axes not in (1, 2):
            raise ValueError(f"axes: expected 1 or 2, got {axes}")
        if dim % (2 * axes):
            raise ValueError(f"dim: rotary with {axes} axes needs dim divisible by {2 * axes}, got {dim}")
        self.dim, self.axes = dim, axes
        per_axis = dim // axes
        inv_freq = theta ** (-torch.arange(0, per_axis, 2, dtype=torch.float32) / per_axis)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor | int) -> torch.Tensor:
        positions = _as_positions(positions, self.inv_freq.device)
        if self.axes == 1:
            check_tensor(positions, "positions", ndim=1)
            return positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        check_tensor(positions, "positions", ndim=2)
        if positions.shape[-1] != 2:
            raise ValueError(f"positions: 2-D rotary expects (n, 2), got shape {tuple(positions.shape)}")
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (n, 2, d/4)
        return angles.flatten(-2)

    @staticmethod
    def grid(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Row-major ``(height * width, 2)`` positions of an image window."""
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        return torch.cartesian_prod(rows, cols)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs ``(x_i, x_{i+d/2})`` of ``x (..., n, d)`` by ``angles (n, d/2)``.

    Only the first ``2 * angles.shape[-1]`` features turn; the rest pass through (partial rotary).
    """
    rot = angles.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated
