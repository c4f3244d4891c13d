"""Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning").

    images --ViT--> patch features --Perceiver resampler--> visual tokens (l per image)
    text ids --LM embedding--> y
    for each LM layer k:
        if k is a cross-attention layer: y = GatedXAttnDense(y, visual tokens, mask from <image> positions)
        y = LMLayer_k(y)                                   # frozen with freeze_lm
    logits = LMHead(y)

``<image>`` tokens mark where each image stands in the text (the j-th ``<image>`` is image j) and
``<|endofchunk|>`` ends the text of one image. Decoding keeps the LM's key/value cache and computes
the visual tokens and every cross-attention layer's keys/values once, at the prompt.

Shape glossary: ``b`` batch, ``n`` text tokens, ``m`` media per sample, ``f`` frames, ``c``/``h``/``w``
image channels/height/width, ``l`` latents per media, ``d`` LM dim, ``e`` vision dim, ``v`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from quintet.core import KVCache, PretrainedModel, RMSNorm, Transformer
from quintet.core.generation import check_token_ids, generate
from quintet.core.validation import check_ids, check_int, check_tensor
from quintet.flamingo.config import FlamingoConfig, LanguageModelConfig
from quintet.flamingo.flops import flamingo_flops, language_model_flops
from quintet.flamingo.prompt import MediaPrompt
from quintet.flamingo.vision import PerceiverResampler, vision_encoder
from quintet.flamingo.xattn import GatedCrossAttentionBlock, media_context


class CausalLM(PretrainedModel):
    """A causal transformer LM: ``model(ids (b, n)) -> logits (b, n, v)``; the base Flamingo extends.

    ``hidden(x, cache=, before_layer=)`` runs the layers; Flamingo passes ``before_layer(k, y) -> y``
    to put its cross-attention in front of layer ``k`` without copying the layers.
    """

    config_class = LanguageModelConfig

    def __init__(self, config: LanguageModelConfig):
        super().__init__(config)
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.transformer = Transformer(
            config.dim,
            config.depth,
            heads=config.heads,
            dim_head=config.dim_head,
            causal=True,
            rotary=True,
            ff_mult=config.ff_mult,
            dropout=config.dropout,
            final_norm=False,
        )
        self.norm = RMSNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)

    def new_cache(self) -> KVCache:
        return KVCache()

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token embeddings of ``ids (b, n)`` that follow ``start`` already decoded tokens."""
        check_token_ids(ids, "ids")
        n = ids.shape[1]
        if n < 1 or ids.shape[0] < 1:
            raise ValueError(f"ids: expected at least one token per row, got shape {tuple(ids.shape)}")
        if start + n > self.config.max_seq_len:
            already = f" ({start} already decoded)" if start else ""
            raise ValueError(f"ids: {start + n} tokens exceed max_seq_len={self.config.max_seq_len}{already}")
        if not torch.compiler.is_compiling():
            check_ids(ids, "ids", self.config.num_tokens)
        return self.token_emb(ids)

    def hidden(
        self,
        x: torch.Tensor,
        *,
        cache: KVCache | None = None,
        before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The layers over embeddings ``x (b, n, d)``; with ``cache`` they continue a decoded stream."""
        stack = self.transformer
        start = cache.length if cache is not None else 0
        rotary = stack.rotary(torch.arange(start, start + x.shape[1], device=x.device))
        for index, block in enumerate(stack.blocks):
            if before_layer is not None:
                x = before_layer(index, x)
            x = block(
                x,
                context=None,
                key_padding_mask=None,
                attn_mask=None,
                context_mask=None,
                rotary=rotary,
                cond=None,
                cache=cache.layer(index) if cache is not None else None,
            )
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_logits(self.norm(x))

    def forward(self, ids: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache (from new_cache()), got {type(cache).__name__}")
        x = self.embed(ids, cache.length if cache is not None else 0)
        return self.logits(self.hidden(x, cache=cache))

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """``core.generation.generate`` on this LM: the new tokens ``(b, max_new_tokens)``."""
        return generate(self, prompt, max_new_tokens, **options)

    def train_flops(self, batch_size: int, seq_len: int) -> float:
        """Matmul FLOPs of one forward + backward pass over ``(batch_size, seq_len)`` tokens."""
        return language_model_flops(self.config, batch_size, seq_len)


class FlamingoCache(KVCache):
    """Decoding state: the LM's key/value caches, each cross-attention layer's media keys/values
    (``context_kv``, computed once at the prompt) and how many media each row has met so far."""

    def __init__(self) -> None:
        super().__init__()
        self.num_media = 0
        self.media_seen: torch.Tensor | None = None
        """``(b,)`` ``<image>`` tokens decoded so far per row"""


class Flamingo(PretrainedModel):
    """``model(ids (b, n), images (b, m, [f,] c, h, w), *, media_mask (b, m), cache) -> logits (b, n, v)``.

    - ``images`` in [0, 1]; row ``r`` of ``ids`` holds one ``<image>`` token per real media of row ``r``
      (``media_mask`` marks real media, padding at the end; without it every media is real).
    - ``vision_features (b, m, [f,] p, e)`` instead of ``images``: what :meth:`encode_images` returns,
      computed once for a data set when the encoder is frozen.
    - no media: text only; the output is the base LM's exactly.
    - ``cache`` (from :meth:`new_cache`): the call decodes the next tokens of a stream; the prompt's
      images come with the first call and later calls add no ``<image>`` token.
    """

    config_class = FlamingoConfig

    def __init__(self, config: FlamingoConfig):
        super().__init__(config)
        self.lm = CausalLM(config.lm)
        self.vision = vision_encoder(config.vision)
        self.resampler = PerceiverResampler(
            config.vision.dim,
            depth=config.resampler_depth,
            num_latents=config.num_latents,
            heads=config.resampler_heads,
            dim_head=config.resampler_dim_head,
            max_frames=config.max_frames,
            qk_norm=config.qk_norm,
        )
        self.cross_attn = nn.ModuleDict(
            {
                str(layer): GatedCrossAttentionBlock(
                    config.lm.dim,
                    dim_media=config.vision.dim,
                    heads=config.cross_attn_heads,
                    dim_head=config.cross_attn_dim_head,
                    ff_mult=config.cross_attn_ff_mult,
                    gate_scale=config.gate_scale,
                    qk_norm=config.qk_norm,
                )
                for layer in config.cross_attn_layers
            }
        )
        if config.freeze_lm:
            self.lm.requires_grad_(False)
        if config.freeze_vision:
            self.vision.requires_grad_(False)

    def new_cache(self) -> FlamingoCache:
        return FlamingoCache()

    @staticmethod
    def from_hf(language_model: nn.Module, vision_model: nn.Module, **options):
        """Flamingo on a ``transformers`` causal LM and vision model: see :class:`quintet.flamingo.hf.HFFlamingo`."""
        from quintet.flamingo.hf import HFFlamingo

        return HFFlamingo.from_hf(language_model, vision_model, **options)

    def load_language_model(self, lm: CausalLM) -> None:
        """Copy a (pre-trained) base LM's weights into this model; its config must equal ``config.lm``."""
        if not isinstance(lm, CausalLM) or lm.config != self.config.lm:
            raise ValueError("lm: expected a CausalLM whose config equals this model's config.lm")
        self.lm.load_state_dict(lm.state_dict())

    def encode_media(self, images: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens ``(b, m, l, e)`` of ``images (b, m, [f,] c, h, w)``; zero for padding media."""
        return self.resampler(self.encode_images(images), media_mask)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The vision encoder's features ``(b, m, f, p, e)`` of ``images (b, m, [f,] c, h, w)``."""
        check_tensor(images, "images", ndim=(5, 6), dtype="float")
        vision = self.config.vision
        expected = (vision.channels, vision.image_size, vision.image_size)
        if tuple(images.shape[-3:]) != expected or images.shape[1] < 1:
            raise ValueError(
                f"images: expected (b, m >= 1, [frames,] {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )
        frames = images if images.ndim == 6 else rearrange(images, "b m c h w -> b m 1 c h w")
        b, m, f = frames.shape[:3]
        if f > self.config.max_frames:
            raise ValueError(f"images: {f} frames per media exceed max_frames={self.config.max_frames}")
        features = self.vision(rearrange(frames, "b m f c h w -> (b m f) c h w"))
        return rearrange(features, "(b m f) p e -> b m f p e", b=b, m=m)

    def forward(
        self,
        ids: torch.Tensor,
        images: torch.Tensor | None = None,
        *,
        vision_features: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
        cache: FlamingoCache | None = None,
    ) -> torch.Tensor:
        if cache is not None and not isinstance(cache, FlamingoCache):
            raise TypeError(f"cache: expected a FlamingoCache (from new_cache()), got {type(cache).__name__}")
        if images is not None and vision_features is not None:
            raise ValueError("vision_features: give images or their features, not both")
        x = self.lm.embed(ids, cache.length if cache is not None else 0)
        media = dict(media=images, name="images", ndim=(5, 6), encode=self.encode_media)
        if vision_features is not None:
            media = dict(media=vision_features, name="vision_features", ndim=(4, 5), encode=self.resampler)
        context = media_context(
            ids,
            media_mask=media_mask,
            cache=cache,
            media_token_id=self.config.media_token_id,
            num_latents=self.config.num_latents,
            only_immediate=self.config.only_attend_immediate_media,
            **media,
        )
        if context is None:
            return self.lm.logits(self.lm.hidden(x, cache=cache))

        def cross_attend(layer: int, y: torch.Tensor) -> torch.Tensor:
            if layer % self.config.cross_attn_every:
                return y
            layer_cache = cache.layer(("media", layer)) if cache is not None else None
            return self.cross_attn[str(layer)].attend(y, context, layer_cache)

        return self.lm.logits(self.lm.hidden(x, cache=cache, before_layer=cross_attend))

    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        images: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue ``prompt (b, n)`` (with its ``images``) by ``max_new_tokens``; returns ``(b, max_new_tokens)``.

        ``temperature=0`` is greedy. ``use_cache=False`` recomputes everything, images included, every
        step. ``<image>`` is never generated: no image could go with it.
        """
        config = self.config
        bound = MediaPrompt(
            self,
            dict(images=images, vision_features=vision_features, media_mask=media_mask),
            media_token_id=config.media_token_id,
            num_tokens=config.num_tokens,
            max_seq_len=config.max_seq_len,
        )
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
        return generate(bound, prompt, max_new_tokens, use_cache=use_cache, **options)

    def train_flops(
        self, batch_size: int, seq_len: int, num_media: int, *, frames: int = 1, include_vision: bool = True
    ) -> float:
        """Matmul FLOPs of one forward + backward pass (``(b, seq_len)`` ids, ``num_media`` images each).

        2 * in * out per token per linear layer, 4 * i * j * inner for attention's QK^T and AV (causal
        self-attention counted in full, as SDPA computes it). A backward pass costs 2x the forward for
        trained weights whose input needs a gradient, 1x for a frozen layer that passes gradients on
        (the LM above a cross-attention block, its head), 1x for a trained layer fed by data
        (the patch embedding), and nothing for a frozen encoder.
        """
        for value, name in ((batch_size, "batch_size"), (seq_len, "seq_len"), (num_media, "num_media")):
            check_int(value, name, minimum=1)
        return flamingo_flops(self.config, batch_size, seq_len, num_media, frames=frames, include_vision=include_vision)
