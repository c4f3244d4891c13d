"""Multi-head attention on ``F.scaled_dot_product_attention`` and the key/value cache.

Shape glossary: ``b`` batch, ``h`` heads, ``i`` query tokens, ``j`` key tokens, ``m`` memory
key/values, ``d`` model dim, ``e`` head dim.

Masks are boolean with True = may attend. A query row left with no key to attend to returns zeros
(not the NaN a softmax over nothing gives) and finite gradients.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from quintet.core.norms import RMSNorm
from quintet.core.positions import apply_rotary
from quintet.core.validation import check_tensor

_MIN_CAPACITY = 64


class LayerCache:
    """Keys/values of one attention layer during incremental decoding.

    Self-attention keys live in a preallocated buffer that doubles when full, so a generation of
    ``n`` tokens costs O(n) copying, not the O(n^2) of concatenating every step. Cross-attention
    keys/values of a fixed context are computed once and kept in ``context_kv``.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.context_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``(b, h, n, e)`` keys/values; return all keys/values so far, ``(b, h, length, e)``."""
        end = self.length + keys.shape[2]
        if self.keys is not None and (
            self.keys.shape[0] != keys.shape[0] or self.keys.dtype != keys.dtype or self.keys.device != keys.device
        ):
            raise ValueError(
                f"cache: holds batch {self.keys.shape[0]} ({self.keys.dtype}, {self.keys.device}), "
                f"got keys of batch {keys.shape[0]} ({keys.dtype}, {keys.device})"
            )
        if end > self.capacity:
            capacity = max(end, 2 * self.capacity, _MIN_CAPACITY)
            grown_k = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
            grown_v = values.new_empty(*values.shape[:2], capacity, values.shape[3])
            if self.length:
                grown_k[:, :, : self.length] = self.keys[:, :, : self.length]
                grown_v[:, :, : self.length] = self.values[:, :, : self.length]
            self.keys, self.values = grown_k, grown_v
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"length: can crop to 0..{self.length}, got {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)
        if self.context_kv is not None:
            self.context_kv = tuple(t.index_select(0, index) for t in self.context_kv)


class KVCache:
    """Per-layer caches of one token stream, created lazily by the layers that use them.

    ``length`` is the number of tokens decoded so far; ``crop(n)`` rolls back to the first ``n``
    (speculative decoding, retries); ``reorder(index)`` selects / permutes batch rows (beam search).
    """

    def __init__(self) -> None:
        self.layers: dict[Hashable, LayerCache] = {}

    def layer(self, key: Hashable) -> LayerCache:
        if key not in self.layers:
            self.layers[key] = LayerCache()
        return self.layers[key]

    @property
    def length(self) -> int:
        lengths = {c.length for c in self.layers.values() if c.keys is not None}
        if len(lengths) > 1:
            raise RuntimeError(f"cache: layers disagree on the decoded length: {sorted(lengths)}")
        return lengths.pop() if lengths else 0

    def crop(self, length: int) -> None:
        current = self.length
        if not 0 <= length <= current:
            raise ValueError(f"length: can crop to 0..{current}, got {length}")
        for cache in self.layers.values():
            cache.crop(min(length, cache.length))

    def reorder(self, index: torch.Tensor) -> None:
        check_tensor(index, "index", ndim=1, dtype="int")
        for cache in self.layers.values():
            cache.reorder(index)


def _as_4d_mask(mask: torch.Tensor, name: str, b: int, h: int, i: int, j: int) -> torch.Tensor:
    """Bring an ``(i, j)``, ``(b, i, j)`` or ``(b, h, i, j)`` mask to a broadcastable 4-D view."""
    check_tensor(mask, name, ndim=(2, 3, 4), dtype="bool")
    expected = {2: (i, j), 3: (b, i, j), 4: (b, h, i, j)}[mask.ndim]
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} (True = may attend), got {tuple(mask.shape)}")
    if mask.ndim == 2:
        return mask[None, None]
    return mask[:, None] if mask.ndim == 3 else mask


class Attention(nn.Module):
    """Self- or cross-attention (``dim_context`` set) with optional memory kv, value gates, qk-norm.

    ``forward(x, context=None, *, key_padding_mask, attn_mask, rotary, cache)``:

    - ``x (b, i, d)``; ``context (b, j, d_ctx)`` for cross-attention.
    - ``key_padding_mask (b, j)``: True marks real keys. With a cache, ``j`` counts cached + new keys.
    - ``attn_mask (i, j) | (b, i, j) | (b, h, i, j)``: True = may attend; combined with ``causal``.
    - ``rotary``: angles ``(i, e/2)`` from :class:`RotaryEmbedding` for the new positions (1-D or 2-D
      axial), applied to queries and keys of self-attention.
    - ``cache``: a :class:`LayerCache`; self-attention appends to it, cross-attention computes the
      context keys/values once and reuses them.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        dim_context: int | None = None,
        causal: bool = False,
        num_mem_kv: int = 0,
        value_gates: bool = False,
        qk_norm: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        if causal and dim_context is not None:
            raise ValueError("causal: cross-attention (dim_context set) cannot be causal")
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.is_cross = dim_context is not None
        self.dim_context = dim_context if dim_context is not None else dim
        self.causal = causal
        self.dropout = dropout
        inner = heads * dim_head
        if self.is_cross:
            self.to_q = nn.Linear(dim, inner, bias=bias)
            self.to_kv = nn.Linear(self.dim_context, inner * 2, bias=bias)
        else:
            self.to_qkv = nn.Linear(dim, inner * 3, bias=bias)
        self.q_norm = RMSNorm(dim_head) if qk_norm else None
        self.k_norm = RMSNorm(dim_head) if qk_norm else None
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head) * 0.02) if num_mem_kv else None
        # Per-head sigmoid gates on the attended values, computed from the query token.
        self.to_value_gates = nn.Linear(dim, heads) if value_gates else None
        self.to_out = nn.Linear(inner, dim, bias=bias)

    def _project(self, x, context, cache):
        split = "b n (h e) -> b h n e"
        if not self.is_cross:
            q, k, v = rearrange(self.to_qkv(x), "b n (t h e) -> t b h n e", t=3, h=self.heads)
            if self.k_norm is not None:
                k = self.k_norm(k)
            return q, k, v
        q = rearrange(self.to_q(x), split, h=self.heads)
        if cache is not None and cache.context_kv is not None:
            return q, *cache.context_kv
        if context is None:
            raise ValueError("context: cross-attention needs a context (or a cache holding its keys)")
        k, v = self.context_kv(context)
        if cache is not None:
            # read again at every decoding step: one copy now makes each later read contiguous
            k, v = k.contiguous(), v.contiguous()
            cache.context_kv = (k, v)
        return q, k, v

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(b, h, j, e)`` of a cross-attention context ``(b, j, d_ctx)``.

        A cache holds these for a fixed context; a caller whose context grows while decoding appends
        the new part's with ``cache.context_kv = cache.append(*attention.context_kv(new_part))``.
        """
        if not self.is_cross:
            raise ValueError("context: this is a self-attention layer (build it with dim_context)")
        k, v = rearrange(self.to_kv(context), "b n (t h e) -> t b h n e", t=2, h=self.heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        rotary: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        check_tensor(x, "x", ndim=3, dtype="float")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected feature dim {self.dim}, got shape {tuple(x.shape)}")
        if context is not None:
            if not self.is_cross:
                raise ValueError("context: this is a self-attention layer (build it with dim_context)")
            check_tensor(context, "context", ndim=3, dtype="float")
            if context.shape[-1] != self.dim_context or context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"context: expected shape (b={x.shape[0]}, j, {self.dim_context}), got {tuple(context.shape)}"
                )

        q, k, v = self._project(x, context, cache)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if rotary is not None:
            if self.is_cross:
                raise ValueError("rotary: positions apply to self-attention only")
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        if cache is not None and not self.is_cross:
            k, v = cache.append(k, v)

        b, i, j = q.shape[0], q.shape[2], k.shape[2]
        mask = None
        use_is_causal = False
        if self.causal and i > 1:  # a single newest query may see every key: no causal mask needed
            if i == j and key_padding_mask is None and attn_mask is None and self.mem_kv is None:
                use_is_causal = True  # lets SDPA pick its fused causal kernel
            else:
                # with a cache, query r sits at absolute position j - i + r
                mask = torch.ones(i, j, dtype=torch.bool, device=q.device).tril(j - i)[None, None]
        if attn_mask is not None:
            extra = _as_4d_mask(attn_mask, "attn_mask", b, self.heads, i, j)
            mask = extra if mask is None else mask & extra
        if key_padding_mask is not None:
            check_tensor(key_padding_mask, "key_padding_mask", ndim=2, dtype="bool")
            if tuple(key_padding_mask.shape) != (b, j):
                raise ValueError(
                    f"key_padding_mask: expected shape (b={b}, j={j}) over all keys, got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            padding = key_padding_mask[:, None, None, :]
            mask = padding if mask is None else mask & padding

        if self.mem_kv is not None:
            mem_k, mem_v = (repeat(t, "h m e -> b h m e", b=b).to(q.dtype) for t in self.mem_kv)
            k, v = torch.cat((mem_k, k), dim=2), torch.cat((mem_v, v), dim=2)
            if mask is not None:
                mem_visible = torch.ones(*mask.shape[:3], self.mem_kv.shape[2], dtype=torch.bool, device=q.device)
                mask = torch.cat((mem_visible, mask), dim=-1)

        row_has_key = None
        if mask is not None and self.mem_kv is None:
            row_has_key = mask.any(dim=-1, keepdim=True)
            # an all-False row would softmax to NaN; let it see everything, then zero its output
            mask = mask | ~row_has_key

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=use_is_causal
        )
        if row_has_key is not None:
            out = out * row_has_key
        if self.to_value_gates is not None:
            out = out * rearrange(self.to_value_gates(x), "b n h -> b h n 1").sigmoid()
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))
