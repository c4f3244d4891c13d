"""The transformer stack every system composes: pre-norm blocks of attention, cross-attention, MLP.

Shape glossary: ``b`` batch, ``n`` tokens, ``d`` model dim, ``j`` context tokens, ``c`` conditioning dim.
"""

from __future__ import annotations

import torch
from torch import nn

from quintet.core.attention import Attention, KVCache, LayerCache
from quintet.core.feedforward import FeedForward
from quintet.core.norms import ConditionedNorm, make_norm
from quintet.core.positions import RotaryEmbedding
from quintet.core.validation import check_tensor


class _Norm(nn.Module):
    """A plain norm, or a FiLM-conditioned one when the stack has ``dim_cond``."""

    def __init__(self, kind: str, dim: int, dim_cond: int | None):
        super().__init__()
        self.inner = ConditionedNorm(kind, dim, dim_cond) if dim_cond else make_norm(kind, dim)
        self.conditioned = bool(dim_cond)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.inner(x, cond) if self.conditioned else self.inner(x)


class TransformerBlock(nn.Module):
    fsdp_unit = True
    """FSDP shards each block on its own (see ``training.parallel``)"""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        causal: bool,
        dim_context: int | None,
        ff_mult: float,
        ff_activation: str,
        norm: str,
        dim_cond: int | None,
        num_mem_kv: int,
        value_gates: bool,
        qk_norm: bool,
        dropout: float,
    ):
        super().__init__()
        attn_kwargs = dict(heads=heads, dim_head=dim_head, qk_norm=qk_norm, dropout=dropout)
        self.attn_norm = _Norm(norm, dim, dim_cond)
        self.attn = Attention(dim, causal=causal, num_mem_kv=num_mem_kv, value_gates=value_gates, **attn_kwargs)
        self.cross_norm = _Norm(norm, dim, dim_cond) if dim_context else None
        self.cross_attn = Attention(dim, dim_context=dim_context, **attn_kwargs) if dim_context else None
        self.ff_norm = _Norm(norm, dim, dim_cond)
        self.ff = FeedForward(dim, ff_mult, activation=ff_activation, dropout=dropout)
        # identity when off: decoding calls a block per token, so every skipped call counts
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, *, context, key_padding_mask, attn_mask, context_mask, rotary, cond, cache):
        h = self.attn(
            self.attn_norm(x, cond), key_padding_mask=key_padding_mask, attn_mask=attn_mask, rotary=rotary, cache=cache
        )
        x = x + self.dropout(h)
        has_context = context is not None or (cache is not None and cache.context_kv is not None)
        if self.cross_attn is not None and has_context:
            h = self.cross_attn(self.cross_norm(x, cond), context, key_padding_mask=context_mask, cache=cache)
            x = x + self.dropout(h)
        return x + self.dropout(self.ff(self.ff_norm(x, cond)))


class Transformer(nn.Module):
    """A stack of pre-norm blocks.

    ``forward(x, *, context, key_padding_mask, attn_mask, context_mask, positions, cond, cache)``
    returns ``x (b, n, d)``, or ``(x, cache)`` when a :class:`KVCache` is given. With a cache the
    call decodes the next ``n`` tokens of a stream: rotary positions continue from ``cache.length``
    and the outputs equal those of a full forward over the whole stream.

    - ``context (b, j, dim_context)`` and ``context_mask (b, j)`` feed the cross-attention layers.
    - ``cond (b, c)`` or ``(b, n, c)`` modulates every norm (FiLM) when ``dim_cond`` is set.
    - ``positions``: rotary positions of the new tokens, ``(n,)`` or ``(n, 2)`` for 2-D axial rotary.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        causal: bool = False,
        dim_context: int | None = None,
        ff_mult: float = 4.0,
        ff_activation: str = "swiglu",
        norm: str = "rms",
        final_norm: bool = True,
        dim_cond: int | None = None,
        rotary: bool = False,
        rotary_axes: int = 1,
        rotary_theta: float = 10000.0,
        num_mem_kv: int = 0,
        value_gates: bool = False,
        qk_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth: expected >= 0, got {depth}")
        self.dim, self.depth, self.causal, self.dim_cond = dim, depth, causal, dim_cond
        self.rotary = RotaryEmbedding(dim_head, axes=rotary_axes, theta=rotary_theta) if rotary else None
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                heads=heads,
                dim_head=dim_head,
                causal=causal,
                dim_context=dim_context,
                ff_mult=ff_mult,
                ff_activation=ff_activation,
                norm=norm,
                dim_cond=dim_cond,
                num_mem_kv=num_mem_kv,
                value_gates=value_gates,
                qk_norm=qk_norm,
                dropout=dropout,
            )
            for _ in range(depth)
        )
        self.norm = _Norm(norm, dim, dim_cond) if final_norm else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        check_tensor(x, "x", ndim=3, dtype="float")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected feature dim {self.dim}, got shape {tuple(x.shape)}")
        if (cond is None) != (self.dim_cond is None):
            raise ValueError(
                "cond: this stack was built with dim_cond and needs cond"
                if self.dim_cond
                else "cond: this stack has no conditioning (build it with dim_cond)"
            )
        if cond is not None:
            check_tensor(cond, "cond", ndim=(2, 3), dtype="float")
            if cond.shape[0] != x.shape[0] or cond.shape[-1] != self.dim_cond:
                raise ValueError(f"cond: expected (b={x.shape[0]}, [n,] {self.dim_cond}), got {tuple(cond.shape)}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")

        rotary = None
        if self.rotary is not None:
            if positions is None:
                if self.rotary.axes != 1:
                    raise ValueError("positions: 2-D rotary needs explicit (n, 2) positions")
                offset = cache.length if cache is not None else 0
                positions = torch.arange(offset, offset + x.shape[1], device=x.device)
            rotary = self.rotary(positions)
            if rotary.shape[0] != x.shape[1]:
                raise ValueError(f"positions: expected {x.shape[1]} positions, got {rotary.shape[0]}")

        for index, block in enumerate(self.blocks):
            layer_cache: LayerCache | None = cache.layer(index) if cache is not None else None
            x = block(
                x,
                context=context,
                key_padding_mask=key_padding_mask,
                attn_mask=attn_mask,
                context_mask=context_mask,
                rotary=rotary,
                cond=cond,
                cache=layer_cache,
            )
        if self.norm is not None:
            x = self.norm(x, cond)
        return (x, cache) if cache is not None else x
