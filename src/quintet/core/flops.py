"""FLOPs of the core layers from their sizes: what model FLOPs utilisation (MFU) and benchmarks divide by.

Counted as ``torch.utils.flop_counter.FlopCounterMode`` counts: a ``(m, k) @ (k, n)`` matmul is
``2mkn``; attention is ``QK^T`` and ``AV`` over every query-key pair the kernel computes (``4 q k e``
per head; a causal mask does not halve it); norms, activations and the softmax are not counted.
Training (forward + backward) is 3x the forward matmuls (input and weight gradients) and 3.5x the
attention (its backward recomputes the scores).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs, split into dense matmuls and attention (their backward costs differ)."""

    matmul: float = 0.0
    attention: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.matmul + other.matmul, self.attention + other.attention)

    def __mul__(self, factor: float) -> Flops:
        return Flops(self.matmul * factor, self.attention * factor)

    __rmul__ = __mul__

    @property
    def forward(self) -> float:
        return self.matmul + self.attention

    @property
    def training(self) -> float:
        """Forward + backward."""
        return 3.0 * self.matmul + 3.5 * self.attention


def linear(tokens: float, dim_in: int, dim_out: int) -> Flops:
    return Flops(matmul=2.0 * tokens * dim_in * dim_out)


def attention(queries: float, keys: float, *, heads: int, dim_head: int) -> Flops:
    """Scores and weighted values of ``queries`` attending to ``keys`` (per sequence)."""
    return Flops(attention=4.0 * queries * keys * heads * dim_head)


def feedforward(tokens: float, dim: int, mult: float, activation: str = "swiglu") -> Flops:
    """``core.FeedForward``: SwiGLU's hidden width is 2/3 of ``dim * mult``, with a gate beside it."""
    hidden = int(dim * mult * 2 / 3) if activation == "swiglu" else int(dim * mult)
    inner = hidden * 2 if activation == "swiglu" else hidden
    return linear(tokens, dim, inner) + linear(tokens, hidden, dim)


def attention_layer(
    queries: float, keys: float, *, dim: int, heads: int, dim_head: int, dim_context: int | None = None
) -> Flops:
    """``core.Attention``: projections, attention, output (cross-attention projects ``keys`` context tokens)."""
    inner = heads * dim_head
    if dim_context is None:
        projections = linear(queries, dim, 3 * inner)
    else:
        projections = linear(queries, dim, inner) + linear(keys, dim_context, 2 * inner)
    return projections + attention(queries, keys, heads=heads, dim_head=dim_head) + linear(queries, inner, dim)


def transformer_block(
    tokens: float,
    keys: float | None = None,
    *,
    dim: int,
    heads: int,
    dim_head: int,
    ff_mult: float = 4.0,
    ff_activation: str = "swiglu",
    context: float | None = None,
    dim_context: int | None = None,
) -> Flops:
    """One ``core.TransformerBlock`` over ``tokens`` queries (per sequence) attending to ``keys``
    (default: the tokens themselves), plus cross-attention to ``context`` tokens when given."""
    keys = tokens if keys is None else keys
    flops = attention_layer(tokens, keys, dim=dim, heads=heads, dim_head=dim_head)
    if context is not None:
        flops = flops + attention_layer(
            tokens, context, dim=dim, heads=heads, dim_head=dim_head, dim_context=dim_context or dim
        )
    return flops + feedforward(tokens, dim, ff_mult, ff_activation)
