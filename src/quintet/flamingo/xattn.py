"""Gated cross-attention from text to visual tokens, and the masks ``<image>`` positions define.

Flamingo (Alayrac et al. 2022, section 2.2, figure 4) inserts, before layers of a frozen LM:

    y = y + tanh(alpha_xattn) * Attention(q=y, kv=visual tokens)      # masked cross-attention
    y = y + tanh(alpha_dense) * FFW(y)                                # gated dense layer

with both gates initialised to 0, so the untrained model is exactly the language model.

Which visual tokens a text token sees follows from where the ``<image>`` tokens stand: token ``i``
has ``t_i`` = the number of ``<image>`` tokens at or before it. With ``only_attend_immediate_media``
it sees image ``t_i`` only (the paper's default); otherwise images ``1 .. t_i``. Text before the
first image (``t_i = 0``) sees nothing in both modes, never a later image, and gets exactly zero
from the block: the attention row is empty (``core.Attention`` returns zeros for it) and the dense
layer is skipped for it too, so text without an image in view reads exactly as in the base LM.

Shape glossary: ``b`` batch, ``n`` text tokens, ``m`` media per sample, ``l`` visual tokens
(latents) per media, ``d`` text dim, ``e`` visual dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import nn

from quintet.core import Attention, FeedForward, LayerCache, make_norm
from quintet.core.validation import check_tensor


def media_time(media_locations: torch.Tensor, media_before: torch.Tensor | None = None) -> torch.Tensor:
    """``t (b, n)``: the number of media at or before each token (``media_before (b,)`` already seen)."""
    check_tensor(media_locations, "media_locations", ndim=2, dtype="bool")
    time = media_locations.cumsum(dim=1)  # t_i = #{<image> tokens at positions <= i}
    return time if media_before is None else time + media_before[:, None]


def media_attention_mask(
    media_locations: torch.Tensor,
    num_media: int,
    num_latents: int,
    *,
    only_immediate: bool,
    media_before: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-to-visual-token mask ``(b, n, m * l)`` (True = may attend) and ``sees_media (b, n)``.

    ``media_locations (b, n)`` is True where an ``<image>`` token stands; visual tokens are laid out
    media-major (``m`` blocks of ``l``). ``media_before (b,)`` counts media met before these tokens
    (incremental decoding).
    """
    time = media_time(media_locations, media_before)
    index = torch.arange(1, num_media + 1, device=time.device)  # media j is the j-th <image>
    if only_immediate:
        visible = time[..., None] == index  # the latest image before the token, only
    else:
        visible = time[..., None] >= index  # every image before the token, never a later one
    return repeat(visible, "b n m -> b n (m l)", l=num_latents), time > 0


def check_media(
    ids: torch.Tensor,
    media: torch.Tensor | None,
    media_mask: torch.Tensor | None,
    *,
    media_token_id: int,
    cache,
    name: str = "images",
    ndim: tuple[int, ...] = (5, 6),
) -> tuple[torch.Tensor, int]:
    """Validate ``media`` (the argument ``name``: images, or their encoder features) and ``media_mask``
    against the ``<image>`` tokens of ``ids``.

    Returns ``media_locations (b, n)`` and the number of media slots ``m``. Each row must hold one
    ``<image>`` per real media (``media_mask`` marks them, padding last). With a ``cache`` (which
    has ``length``, ``num_media``) the media come with the first call, and later calls add no
    ``<image>`` token.
    """
    locations = ids == media_token_id
    first_call = cache is None or cache.length == 0
    if media is None:
        if media_mask is not None:
            raise ValueError("media_mask: given without images")
        num_media = 0 if first_call else cache.num_media
    else:
        if not first_call:
            raise ValueError(f"{name}: a prompt's images come with the first call of a cache, not while decoding")
        check_tensor(media, name, ndim=ndim, dtype="float")
        if media.shape[0] != ids.shape[0]:
            raise ValueError(f"{name}: expected batch {ids.shape[0]} (as ids), got shape {tuple(media.shape)}")
        num_media = media.shape[1]
    if torch.compiler.is_compiling():
        return locations, num_media
    found = locations.sum(dim=1)
    if not first_call:
        if bool(found.any()):
            raise ValueError("ids: an <image> token while decoding has no image; images come with the prompt")
        return locations, num_media
    if media_mask is not None:
        check_tensor(media_mask, "media_mask", ndim=2, dtype="bool")
        if tuple(media_mask.shape) != (ids.shape[0], num_media):
            expected = (ids.shape[0], num_media)
            raise ValueError(f"media_mask: expected shape (b, m) = {expected}, got {tuple(media_mask.shape)}")
        given = media_mask.sum(dim=1)
        if not torch.equal(media_mask, torch.arange(num_media, device=ids.device) < given[:, None]):
            raise ValueError("media_mask: real media must come first in each row, padding at the end")
    else:
        given = torch.full_like(found, num_media)
    if not torch.equal(found, given):
        row = int((found != given).nonzero()[0, 0])
        raise ValueError(
            f"{name}: row {row} of ids holds {int(found[row])} <image> token(s) (id {media_token_id}) "
            f"but {int(given[row])} image(s) were given"
        )
    return locations, num_media


@dataclass
class MediaContext:
    """What every gated cross-attention block of one forward call reads."""

    media: torch.Tensor | None
    """``(b, m * l, e)`` visual tokens; None while decoding (their keys/values are cached)"""
    attn_mask: torch.Tensor
    """``(b, n, m * l)``"""
    sees_media: torch.Tensor
    """``(b, n)``"""


def media_context(
    ids: torch.Tensor,
    media: torch.Tensor | None,
    media_mask: torch.Tensor | None,
    *,
    cache,
    media_token_id: int,
    num_latents: int,
    only_immediate: bool,
    encode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    name: str = "images",
    ndim: tuple[int, ...] = (5, 6),
) -> MediaContext | None:
    """Check the inputs, encode the media (``encode(media, media_mask) -> (b, m, l, e)``), build the
    masks and advance the cache's media count; None when there is no media (text only).

    ``cache``: None, or a decoding state with ``length``, ``num_media`` and ``media_seen (b,)``.
    """
    locations, num_media = check_media(
        ids, media, media_mask, media_token_id=media_token_id, cache=cache, name=name, ndim=ndim
    )
    if cache is not None and cache.length == 0:
        cache.num_media = num_media
        cache.media_seen = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    if num_media == 0:
        return None
    tokens = rearrange(encode(media, media_mask), "b m l e -> b (m l) e") if media is not None else None
    before = cache.media_seen if cache is not None else None
    attn_mask, sees_media = media_attention_mask(
        locations, num_media, num_latents, only_immediate=only_immediate, media_before=before
    )
    if cache is not None:
        cache.media_seen = cache.media_seen + locations.sum(dim=1)
    return MediaContext(media=tokens, attn_mask=attn_mask, sees_media=sees_media)


class GatedCrossAttentionBlock(nn.Module):
    """``x (b, n, d)`` + tanh-gated masked cross-attention to ``media (b, j, e)`` + tanh-gated FFW.

    The gates are ``tanh(gate_scale * alpha)`` with ``alpha`` initialised to 0. ``gate_scale`` = 1 is
    the paper's; Adam moves ``alpha`` by about the learning rate per step whatever its gradient, so a
    larger scale opens the gates in fewer steps: the demo's few hundred to a thousand steps use 10, the
    30-step ``tiny`` preset 20; 20 over the demo's run made the first block's gate the largest gradient by
    far and spiked the loss (measured).
    ``qk_norm``: RMS-normalised queries and keys (see ``FlamingoConfig.qk_norm``).

    ``forward(x, media, *, attn_mask, sees_media, cache)``: ``attn_mask (b, n, j)`` and
    ``sees_media (b, n)`` from :func:`media_attention_mask`. With ``cache`` (a ``LayerCache``) the
    media keys/values are computed on the first call and reused after (``media`` may then be None).
    """

    def __init__(
        self,
        dim: int,
        *,
        dim_media: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: float = 4.0,
        norm: str = "rms",
        ff_activation: str = "gelu",
        gate_scale: float = 1.0,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.gate_scale = gate_scale
        self.attn_norm = make_norm(norm, dim)
        self.attn = Attention(dim, dim_context=dim_media, heads=heads, dim_head=dim_head, qk_norm=qk_norm)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = make_norm(norm, dim)
        self.ff = FeedForward(dim, ff_mult, activation=ff_activation)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor | None,
        *,
        attn_mask: torch.Tensor,
        sees_media: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        return self.attend(x, MediaContext(media=media, attn_mask=attn_mask, sees_media=sees_media), cache)

    def attend(self, x: torch.Tensor, context: MediaContext, cache: LayerCache | None = None) -> torch.Tensor:
        media, attn_mask, sees_media = context.media, context.attn_mask, context.sees_media
        attended = self.attn(self.attn_norm(x), media, attn_mask=attn_mask, cache=cache)
        attn_gate, ff_gate = (torch.tanh(self.gate_scale * gate) for gate in (self.attn_gate, self.ff_gate))
        x = x + attn_gate * attended  # y = y + tanh(alpha_xattn) * Attention(q=y, kv=X)
        ff_gate = ff_gate * sees_media[..., None].to(x.dtype)  # (b, n, 1): no dense update without an image in view
        return x + ff_gate * self.ff(self.ff_norm(x))  # y = y + tanh(alpha_dense) * FFW(y)
