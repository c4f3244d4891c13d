"""Configs of the hourglass language model and of its flat baseline.

``depth = (pre, valley, post)``: ``pre`` and ``post`` layers run at the level's resolution; the
valley is either a number of layers at the shortened resolution or another ``(pre, valley, post)``
tuple, one level deeper. ``shorten_factor`` is one int for every level or one int per level.
"""

from __future__ import annotations

from dataclasses import dataclass

from quintet.core.validation import check_int

RESAMPLING = ("naive", "linear")
POSITIONS = ("rotary", "learned")


def check_depth(depth: object, name: str) -> int:
    """Validate a nested ``(pre, valley, post)`` tuple; return its number of shortening levels."""
    if not isinstance(depth, tuple) or len(depth) != 3:
        raise ValueError(f"{name}: expected a (pre, valley, post) tuple, got {depth!r}")
    pre, valley, post = depth
    check_int(pre, f"{name}[0] (pre layers)", minimum=0)
    check_int(post, f"{name}[2] (post layers)", minimum=0)
    if isinstance(valley, tuple):
        return 1 + check_depth(valley, f"{name}[1]")
    check_int(valley, f"{name}[1] (valley layers)", minimum=1)
    return 1


def resolve_shorten_factors(depth: object, shorten_factor: object) -> tuple[int, ...]:
    """Validate ``depth`` and ``shorten_factor`` together; one factor per level, outermost first."""
    levels = check_depth(depth, "depth")
    if not isinstance(shorten_factor, tuple):
        check_int(shorten_factor, "shorten_factor", minimum=2)
        return (shorten_factor,) * levels
    if len(shorten_factor) != levels:
        raise ValueError(
            f"shorten_factor: depth {depth!r} has {levels} level(s), "
            f"got {len(shorten_factor)} factor(s) {shorten_factor!r}"
        )
    for index, factor in enumerate(shorten_factor):
        check_int(factor, f"shorten_factor[{index}]", minimum=2)
    return shorten_factor


@dataclass(frozen=True, kw_only=True)
class HourglassConfig:
    """An hourglass transformer LM (Nawrot et al. 2021)."""

    num_tokens: int
    """vocabulary size (256 for bytes)"""
    dim: int
    """model width at every level"""
    depth: tuple
    """(pre, valley, post); the valley is an int or a nested (pre, valley, post)"""
    shorten_factor: int | tuple[int, ...]
    """shortening per level: one int for all levels, or one per level, outermost first"""
    heads: int = 8
    dim_head: int = 64
    max_seq_len: int = 2048
    """longest sequence (prompt + generated tokens) the model accepts"""
    resampling: str = "naive"
    """'naive' (average pool + repeat) or 'linear' (linear projection of each group)"""
    attn_resampling: bool = True
    """refine the shortened tokens by attention over their group, and the upsampled tokens by
    attention over the shortened sequence"""
    causal: bool = True
    positions: str = "rotary"
    """'rotary' (in every attention stack, counted at its own resolution) or 'learned' (input only)"""
    ff_mult: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int(self.num_tokens, "num_tokens", minimum=1)
        check_int(self.dim, "dim", minimum=1)
        check_int(self.heads, "heads", minimum=1)
        check_int(self.dim_head, "dim_head", minimum=2)
        check_int(self.max_seq_len, "max_seq_len", minimum=1)
        resolve_shorten_factors(self.depth, self.shorten_factor)
        if self.resampling not in RESAMPLING:
            raise ValueError(f"resampling: expected one of {RESAMPLING}, got {self.resampling!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions: expected one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rotary" and self.dim_head % 2:
            raise ValueError(f"dim_head: rotary positions need an even dim_head, got {self.dim_head}")
        if not isinstance(self.attn_resampling, bool) or not isinstance(self.causal, bool):
            raise ValueError("attn_resampling / causal: expected booleans")
        if not self.ff_mult > 0:
            raise ValueError(f"ff_mult: expected > 0, got {self.ff_mult!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")

    @property
    def shorten_factors(self) -> tuple[int, ...]:
        """One factor per level, outermost first."""
        return resolve_shorten_factors(self.depth, self.shorten_factor)


@dataclass(frozen=True, kw_only=True)
class FlatConfig:
    """The plain causal transformer LM every hourglass claim is measured against."""

    num_tokens: int
    dim: int
    depth: int
    heads: int = 8
    dim_head: int = 64
    max_seq_len: int = 2048
    positions: str = "rotary"
    ff_mult: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int(self.num_tokens, "num_tokens", minimum=1)
        check_int(self.dim, "dim", minimum=1)
        check_int(self.depth, "depth", minimum=1)
        check_int(self.heads, "heads", minimum=1)
        check_int(self.dim_head, "dim_head", minimum=2)
        check_int(self.max_seq_len, "max_seq_len", minimum=1)
        if self.positions not in POSITIONS:
            raise ValueError(f"positions: expected one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rotary" and self.dim_head % 2:
            raise ValueError(f"dim_head: rotary positions need an even dim_head, got {self.dim_head}")
        if not self.ff_mult > 0:
            raise ValueError(f"ff_mult: expected > 0, got {self.ff_mult!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")
