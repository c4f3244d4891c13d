"""Hourglass transformer (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language Models").

One level of the hourglass, as in the paper's algorithm:

    x = PreLayers(x)                                   # full resolution
    x' = ShiftRight(x, k - 1)                          # causal: no shortened token sees its future
    s = Shorten(x', k)   [+ AttentionResampling(s, x')]  # shortening: n tokens -> n / k tokens
    s = Valley(s)                                      # layers, or another hourglass level
    x = x + Upsample(s, k) [+ AttentionResampling(x, s)] # upsampling: back to n tokens, plus the residual
    x = PostLayers(x)

With the shift, shortened token ``j`` summarises positions ``j*k - k + 1 .. j*k`` and feeds positions
``j*k .. j*k + k - 1``: nothing flows from a position to an earlier one. Any length works: the k - 1
filler positions in front of a causal sequence complete every group a position needs, and a
non-causal one is padded to a multiple of ``k`` and cropped back. During cached decoding a shortened
level advances once every ``k`` tokens, when the group of its next token is complete.

Shape glossary: ``b`` batch, ``n`` tokens at a level, ``d`` model dim, ``k`` shorten factor,
``m`` shortened tokens (groups), ``v`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from quintet.core import (
    Attention,
    FeedForward,
    KVCache,
    LayerCache,
    LearnedPositions,
    PretrainedModel,
    RMSNorm,
    Transformer,
)
from quintet.core import flops as flops_of
from quintet.core.generation import check_token_ids, generate
from quintet.core.validation import check_ids, check_int, check_tensor
from quintet.hourglass.config import RESAMPLING, FlatConfig, HourglassConfig, resolve_shorten_factors


class Downsample(nn.Module):
    """Shorten groups of ``k`` tokens to one: average pool (naive) or a linear map of the group (linear).

    Tokens marked invalid (shift filler, padding) are absent: they are zero vectors by construction
    (or zeroed here when the caller's mask marks real tokens), and the average counts only valid ones.
    """

    def __init__(self, dim: int, shorten_factor: int, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(dim * shorten_factor, dim) if kind == "linear" else None

    def forward(self, groups: torch.Tensor, valid: torch.Tensor, *, zero_invalid: bool) -> torch.Tensor:
        """``groups (b, m, k, d)``, ``valid (b, m, k)`` -> ``(b, m, d)``."""
        if zero_invalid:
            groups = groups * valid.unsqueeze(-1).to(groups.dtype)
        if self.proj is not None:
            return self.proj(rearrange(groups, "b m k d -> b m (k d)"))  # shortening: linear projection of the group
        count = valid.sum(dim=-1, keepdim=True).clamp_min(1).to(groups.dtype)
        return groups.sum(dim=2) / count  # shortening: average pooling


class Upsample(nn.Module):
    """Lengthen each shortened token back to ``k`` tokens: repeat (naive) or a linear map (linear)."""

    def __init__(self, dim: int, shorten_factor: int, kind: str):
        super().__init__()
        self.k = shorten_factor
        self.proj = nn.Linear(dim, dim * shorten_factor) if kind == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, m, d)`` -> ``(b, m * k, d)``."""
        if self.proj is not None:
            return rearrange(self.proj(x), "b m (k d) -> b (m k) d", k=self.k)  # upsampling: linear projection
        return repeat(x, "b m d -> b (m k) d", k=self.k)  # upsampling: repeat each token k times


class ResamplingBlock(nn.Module):
    """Attention resampling (the paper's best resampling for text): ``x + Attention(Q=x, K=V=context)``, then ``+ FF``.

    Before the valley ``x`` are the shortened tokens and ``context`` the tokens of their group;
    after it ``x`` are the full-resolution tokens and ``context`` the shortened sequence.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, ff_mult: float, dropout: float):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.context_norm = RMSNorm(dim)
        self.attn = Attention(dim, dim_context=dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff_norm = RMSNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout=dropout)

    def forward(self, x, context=None, *, key_padding_mask=None, attn_mask=None, cache=None):
        context = self.context_norm(context) if context is not None else None
        h = self.attn(self.norm(x), context, key_padding_mask=key_padding_mask, attn_mask=attn_mask, cache=cache)
        x = x + h  # attention resampling: x + Attention(Q=x, K=V=context)
        return x + self.ff(self.ff_norm(x))

    def extend_cache(self, cache: LayerCache, context: torch.Tensor) -> None:
        """Append the keys/values of new context tokens ``(b, m, d)`` to ``cache.context_kv``: here the
        context (the shortened sequence) grows while decoding, unlike a fixed cross-attention context."""
        cache.context_kv = cache.append(*self.attn.context_kv(self.context_norm(context)))


class HourglassCache:
    """Decoding state of one hourglass level (nested levels hold their own in ``valley``)."""

    def __init__(self, valley: HourglassCache | None):
        self.length = 0
        """tokens of this level decoded so far"""
        self.pre = KVCache()
        self.post = KVCache()
        self.valley: HourglassCache | KVCache = valley if valley is not None else KVCache()
        self.up_attn = LayerCache()
        self.history: torch.Tensor | None = None
        """``(b, k - 1, d)`` pre-layer outputs of the last k - 1 positions (the next group's start)"""
        self.last_up: torch.Tensor | None = None
        """``(b, k, d)`` upsampled slots of the latest shortened token"""


def _run_stack(stack: Transformer, x, mask, cache: KVCache | None) -> torch.Tensor:
    if cache is None:
        return stack(x, key_padding_mask=mask)
    return stack(x, key_padding_mask=mask, cache=cache)[0]


class HourglassTransformer(nn.Module):
    """A sequence-to-sequence hourglass: ``forward(x (b, n, d), *, mask, cache) -> (b, n, d)``.

    - ``depth = (pre, valley, post)``; ``valley`` an int (layers) or a nested tuple (another level).
    - ``shorten_factor``: an int for every level, or a tuple with one factor per level.
    - ``mask (b, n)``: True marks real tokens; masked tokens never change the others' outputs.
    - ``cache``: a :class:`HourglassCache` from :meth:`new_cache` (causal only); the call then decodes
      the next ``n`` tokens of a stream and returns what the full forward gives at those positions.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: tuple,
        shorten_factor: int | tuple[int, ...],
        heads: int = 8,
        dim_head: int = 64,
        resampling: str = "naive",
        attn_resampling: bool = True,
        causal: bool = True,
        rotary: bool = True,
        ff_mult: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_int(dim, "dim", minimum=1)
        factors = resolve_shorten_factors(depth, shorten_factor)
        if resampling not in RESAMPLING:
            raise ValueError(f"resampling: expected one of {RESAMPLING}, got {resampling!r}")

        pre_depth, valley_depth, post_depth = depth
        self.dim, self.causal, self.k = dim, causal, factors[0]
        self.heads, self.dim_head, self.ff_mult = heads, dim_head, ff_mult
        layer_kwargs = dict(heads=heads, dim_head=dim_head, ff_mult=ff_mult, dropout=dropout)
        stack_kwargs = dict(causal=causal, rotary=rotary, final_norm=False, **layer_kwargs)
        self.pre = Transformer(dim, pre_depth, **stack_kwargs)
        self.downsample = Downsample(dim, self.k, resampling)
        self.down_attn = ResamplingBlock(dim, **layer_kwargs) if attn_resampling else None
        if isinstance(valley_depth, tuple):
            self.valley: HourglassTransformer | Transformer = HourglassTransformer(
                dim,
                depth=valley_depth,
                shorten_factor=factors[1:],
                resampling=resampling,
                attn_resampling=attn_resampling,
                causal=causal,
                rotary=rotary,
                **layer_kwargs,
            )
        else:
            self.valley = Transformer(dim, valley_depth, **stack_kwargs)
        self.upsample = Upsample(dim, self.k, resampling)
        self.up_attn = ResamplingBlock(dim, **layer_kwargs) if attn_resampling else None
        self.post = Transformer(dim, post_depth, **stack_kwargs)

    def flops(self, tokens: int) -> flops_of.Flops:
        """Forward FLOPs of one sequence of ``tokens`` through this level and the levels inside it."""
        layer = dict(dim=self.dim, heads=self.heads, dim_head=self.dim_head, ff_mult=self.ff_mult)
        groups = -(-tokens // self.k)  # the shift's filler makes ceil(n / k) groups, as padding does
        total = (len(self.pre.blocks) + len(self.post.blocks)) * flops_of.transformer_block(tokens, **layer)
        if self.downsample.proj is not None:  # linear resampling, down and up
            total = total + 2 * flops_of.linear(groups, self.dim * self.k, self.dim)
        if self.down_attn is not None:  # each shortened token attends to the k tokens of its group
            down = flops_of.attention_layer(
                groups, groups * self.k, dim=self.dim, heads=self.heads, dim_head=self.dim_head, dim_context=self.dim
            )
            down = flops_of.Flops(down.matmul, down.attention / groups)
            up = flops_of.attention_layer(
                tokens, groups, dim=self.dim, heads=self.heads, dim_head=self.dim_head, dim_context=self.dim
            )
            feedforward = flops_of.feedforward(groups, self.dim, self.ff_mult) + flops_of.feedforward(
                tokens, self.dim, self.ff_mult
            )
            total = total + down + up + feedforward
        if isinstance(self.valley, HourglassTransformer):
            return total + self.valley.flops(groups)
        return total + len(self.valley.blocks) * flops_of.transformer_block(groups, **layer)

    def new_cache(self) -> HourglassCache:
        if not self.causal:
            raise ValueError("cache: only a causal hourglass decodes incrementally")
        nested = self.valley.new_cache() if isinstance(self.valley, HourglassTransformer) else None
        return HourglassCache(nested)

    def forward(
        self, x: torch.Tensor, *, mask: torch.Tensor | None = None, cache: HourglassCache | None = None
    ) -> torch.Tensor:
        check_tensor(x, "x", ndim=3, dtype="float")
        if x.shape[-1] != self.dim or x.shape[1] < 1:
            raise ValueError(f"x: expected shape (b, n >= 1, {self.dim}), got {tuple(x.shape)}")
        if mask is not None:
            check_tensor(mask, "mask", ndim=2, dtype="bool")
            if tuple(mask.shape) != tuple(x.shape[:2]):
                expected = tuple(x.shape[:2])
                raise ValueError(f"mask: expected shape {expected} (True = real token), got {tuple(mask.shape)}")
        if cache is not None:
            if not isinstance(cache, HourglassCache):
                raise TypeError(f"cache: expected a HourglassCache (from new_cache()), got {type(cache).__name__}")
            if not self.causal:
                raise ValueError("cache: only a causal hourglass decodes incrementally")
            if mask is not None:
                raise ValueError("mask: incremental decoding takes no padding mask")
        return self._forward(x, mask, cache)

    def _forward(self, x, mask, cache):
        h = _run_stack(self.pre, x, mask, cache.pre if cache is not None else None)
        if self.causal:
            return self._causal_rest(h, mask, cache)
        return self._bidirectional_rest(h, mask)

    def _valley(self, seq, valid, mask_given: bool, cache):
        """Shorten ``seq (b, m*k, d)`` group by group, run the valley, return ``(b, m, d)`` and its mask."""
        groups = rearrange(seq, "b (m k) d -> b m k d", k=self.k)
        group_valid = rearrange(valid, "b (m k) -> b m k", k=self.k)
        short = self.downsample(groups, group_valid, zero_invalid=mask_given)
        if self.down_attn is not None:
            # each shortened token attends to the (valid) tokens of its own group only
            short = self.down_attn(
                rearrange(short, "b m d -> (b m) 1 d"),
                rearrange(groups, "b m k d -> (b m) k d"),
                key_padding_mask=rearrange(group_valid, "b m k -> (b m) k"),
            )
            short = rearrange(short, "(b m) 1 d -> b m d", b=seq.shape[0])
        short_mask = group_valid.any(dim=-1) if mask_given else None
        if isinstance(self.valley, HourglassTransformer):
            return self.valley._forward(short, short_mask, cache), short_mask
        return _run_stack(self.valley, short, short_mask, cache), short_mask

    def _causal_rest(self, h, mask, cache):
        b, n, d = h.shape
        k = self.k
        start = cache.length if cache is not None else 0  # position of h[:, 0] at this level
        history = cache.history if cache is not None and cache.history is not None else h.new_zeros(b, k - 1, d)
        # shift right by k - 1: prepend the k - 1 positions before this chunk (zeros before position 0)
        shifted = torch.cat((history, h), dim=1)  # positions start - k + 1 .. start + n - 1
        history_valid = (torch.arange(start - k + 1, start, device=h.device) >= 0).expand(b, k - 1)
        new_valid = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=h.device)
        valid = torch.cat((history_valid, new_valid), dim=1)

        # group j covers positions j*k - k + 1 .. j*k and completes at position j*k
        first_group = -(-start // k)
        num_groups = (start + n - 1) // k - first_group + 1
        offset = first_group * k - start  # index in `shifted` where the first complete group begins
        span = slice(offset, offset + num_groups * k)

        # upsampled slots from position (start // k) * k on: the current group's (decoding), then the new ones
        slots = [cache.last_up] if cache is not None and start % k else []
        short_mask = None
        if num_groups:
            valley_cache = cache.valley if cache is not None else None
            valley_out, short_mask = self._valley(shifted[:, span], valid[:, span], mask is not None, valley_cache)
            slots.append(self.upsample(valley_out))
        up = torch.cat(slots, dim=1) if len(slots) > 1 else slots[0]
        x = h + up[:, start % k : start % k + n]  # upsampling: valley output plus the pre-valley residual

        if self.up_attn is not None:
            if cache is not None:
                if num_groups:
                    self.up_attn.extend_cache(cache.up_attn, valley_out)
                context, num_keys = None, cache.up_attn.length
            else:
                context, num_keys = valley_out, num_groups
            # position p may read shortened token j once it is complete: j * k <= p
            query_group = torch.arange(start, start + n, device=h.device) // k
            attn_mask = query_group[:, None] >= torch.arange(num_keys, device=h.device)[None, :]
            x = self.up_attn(
                x,
                context,
                attn_mask=attn_mask,
                key_padding_mask=short_mask,
                cache=cache.up_attn if cache is not None else None,
            )

        if cache is not None:
            cache.history = shifted[:, -(k - 1) :].clone()
            if num_groups:
                cache.last_up = up[:, -k:].clone()
            cache.length = start + n
        return _run_stack(self.post, x, mask, cache.post if cache is not None else None)

    def _bidirectional_rest(self, h, mask):
        b, n, _ = h.shape
        pad = -n % self.k  # pad to a multiple of k; padding is invalid and cropped away
        seq = F.pad(h, (0, 0, 0, pad))
        valid = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=h.device)
        valid = F.pad(valid, (0, pad), value=False)
        valley_out, short_mask = self._valley(seq, valid, mask is not None, None)
        x = h + self.upsample(valley_out)[:, :n]  # upsampling: valley output plus the pre-valley residual
        if self.up_attn is not None:
            x = self.up_attn(x, valley_out, key_padding_mask=short_mask)
        return _run_stack(self.post, x, mask, None)


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation, shared by the hourglass and its flat baseline."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class _ByteLM(PretrainedModel):
    """What both language models share: embedding, positions, output head, validation, generation."""

    def _build_io(self, config) -> None:
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.learned_positions = (
            LearnedPositions(config.max_seq_len, config.dim) if config.positions == "learned" else None
        )
        self.norm = RMSNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        check_token_ids(ids, "ids")
        n = ids.shape[1]
        if n < 1:
            raise ValueError(f"ids: expected at least one token, got shape {tuple(ids.shape)}")
        if start + n > self.config.max_seq_len:
            raise ValueError(
                f"ids: {start + n} tokens exceed max_seq_len={self.config.max_seq_len}"
                + (f" ({start} already decoded)" if start else "")
            )
        if not torch.compiler.is_compiling():
            check_ids(ids, "ids", self.config.num_tokens)
        x = self.token_emb(ids)
        if self.learned_positions is not None:
            x = x + self.learned_positions(torch.arange(start, start + n, device=ids.device))
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_logits(self.norm(x))

    def training_flops(self, tokens: int) -> float:
        """Forward + backward FLOPs of one sequence of ``tokens`` (what MFU counts)."""
        check_int(tokens, "tokens", minimum=1)
        head = flops_of.linear(tokens, self.config.dim, self.config.num_tokens)
        return (self._body_flops(tokens) + head).training

    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue ``prompt (b, n)`` by ``max_new_tokens``; returns the new tokens ``(b, max_new_tokens)``.

        ``temperature=0`` is greedy. ``use_cache=False`` recomputes the whole sequence every step.
        """
        return generate(
            self,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generator=generator,
            use_cache=use_cache,
        )


class HourglassLM(_ByteLM):
    """Tokens -> logits through an :class:`HourglassTransformer`: ``model(ids (b, n)) -> (b, n, v)``.

    Logits at position ``i`` predict token ``i + 1`` (causal). ``mask (b, n)`` marks real tokens.
    """

    config_class = HourglassConfig

    def __init__(self, config: HourglassConfig):
        super().__init__(config)
        self._build_io(config)
        self.hourglass = HourglassTransformer(
            config.dim,
            depth=config.depth,
            shorten_factor=config.shorten_factors,
            heads=config.heads,
            dim_head=config.dim_head,
            resampling=config.resampling,
            attn_resampling=config.attn_resampling,
            causal=config.causal,
            rotary=config.positions == "rotary",
            ff_mult=config.ff_mult,
            dropout=config.dropout,
        )
        self.apply(_init_weights)

    def new_cache(self) -> HourglassCache:
        return self.hourglass.new_cache()

    def _body_flops(self, tokens: int) -> flops_of.Flops:
        return self.hourglass.flops(tokens)

    def forward(
        self, ids: torch.Tensor, *, mask: torch.Tensor | None = None, cache: HourglassCache | None = None
    ) -> torch.Tensor:
        x = self._embed(ids, cache.length if isinstance(cache, HourglassCache) else 0)
        return self._logits(self.hourglass(x, mask=mask, cache=cache))


class FlatLM(_ByteLM):
    """The plain causal transformer LM on the same core: ``model(ids (b, n)) -> (b, n, v)``."""

    config_class = FlatConfig

    def __init__(self, config: FlatConfig):
        super().__init__(config)
        self._build_io(config)
        self.transformer = Transformer(
            config.dim,
            config.depth,
            heads=config.heads,
            dim_head=config.dim_head,
            causal=True,
            rotary=config.positions == "rotary",
            ff_mult=config.ff_mult,
            dropout=config.dropout,
            final_norm=False,
        )
        self.apply(_init_weights)

    def new_cache(self) -> KVCache:
        return KVCache()

    def _body_flops(self, tokens: int) -> flops_of.Flops:
        c = self.config
        layer = dict(dim=c.dim, heads=c.heads, dim_head=c.dim_head, ff_mult=c.ff_mult)
        return c.depth * flops_of.transformer_block(tokens, **layer)

    def forward(self, ids: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache (from new_cache()), got {type(cache).__name__}")
        x = self._embed(ids, cache.length if cache is not None else 0)
        return self._logits(_run_stack(self.transformer, x, None, cache))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_parameters(model_class: type[_ByteLM], config) -> int:
    with torch.device("meta"):
        return count_parameters(model_class(config))


def flat_baseline(config: HourglassConfig) -> FlatConfig:
    """The flat LM whose parameter count is closest to the hourglass of ``config`` (same width, heads)."""
    if not isinstance(config, HourglassConfig):
        raise TypeError(f"config: expected a HourglassConfig, got {type(config).__name__}")
    target = _meta_parameters(HourglassLM, config)

    def flat(depth: int) -> FlatConfig:
        return FlatConfig(
            num_tokens=config.num_tokens,
            dim=config.dim,
            depth=depth,
            heads=config.heads,
            dim_head=config.dim_head,
            max_seq_len=config.max_seq_len,
            positions=config.positions,
            ff_mult=config.ff_mult,
            dropout=config.dropout,
        )

    one, two = _meta_parameters(FlatLM, flat(1)), _meta_parameters(FlatLM, flat(2))
    per_layer = two - one
    depth = max(1, round((target - (one - per_layer)) / per_layer))  # parameters grow linearly with depth
    return flat(depth)
