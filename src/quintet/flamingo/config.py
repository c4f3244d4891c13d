"""Configs of Flamingo's parts: the vision encoder, the causal language model, and the whole.

``FlamingoConfig`` nests the other two, so one ``config.json`` describes a saved Flamingo. The
language model is a standalone model too (:class:`~quintet.flamingo.model.CausalLM`): a demo can
pre-train it on text first and hand it to Flamingo, which then freezes it (``freeze_lm``).
"""

from __future__ import annotations

from dataclasses import dataclass

from quintet.core.validation import check_int, check_number


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


VISION_KINDS = ("conv", "vit")


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """A small image encoder: a conv net, or a ViT (Dosovitskiy et al. 2021) on the core transformer.

    ``conv``: ``depth`` stages of 3x3 convolution, group norm, GELU and 2x2 max-pooling (widths
    ``dim / 2`` then ``dim``), features of the last map as tokens. ``vit``: ``patch_size`` patches
    through ``depth`` bidirectional transformer layers.
    """

    image_size: int
    """images are ``image_size x image_size`` pixels"""
    kind: str = "conv"
    dim: int = 64
    depth: int = 3
    patch_size: int = 4
    """ViT only: square patches of this side; ``image_size`` must be a multiple"""
    heads: int = 4
    """ViT only"""
    dim_head: int = 16
    """ViT only"""
    ff_mult: float = 4.0
    """ViT only"""
    channels: int = 3

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ValueError(f"kind: expected one of {VISION_KINDS}, got {self.kind!r}")
        for name in ("image_size", "patch_size", "channels", "dim", "depth", "heads", "dim_head"):
            check_int(getattr(self, name), name, minimum=1)
        check_number(self.ff_mult, "ff_mult", low=0.0, low_open=True)
        if self.kind == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"image_size: must be a multiple of patch_size={self.patch_size}, got {self.image_size}")
        if self.kind == "conv":
            if self.image_size % 2**self.depth:
                raise ValueError(f"image_size: {self.depth} pooling stages need a multiple of {2**self.depth}")
            if self.dim % 16:
                raise ValueError(f"dim: a conv encoder needs a multiple of 16 (group norm of 8 groups), got {self.dim}")

    @property
    def tokens_per_image(self) -> int:
        """Feature vectors per image: patches (ViT), or the summary token and the last map's cells (conv)."""
        if self.kind == "vit":
            return (self.image_size // self.patch_size) ** 2
        return 1 + (self.image_size // 2**self.depth) ** 2


@dataclass(frozen=True, kw_only=True)
class ImageClassifierConfig:
    """The vision encoder with a linear head: pre-trains the encoder on class labels (a demo stage)."""

    vision: VisionConfig
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.vision, VisionConfig):
            raise TypeError(f"vision: expected a VisionConfig, got {type(self.vision).__name__}")
        check_int(self.num_classes, "num_classes", minimum=2)


@dataclass(frozen=True, kw_only=True)
class LanguageModelConfig:
    """A causal transformer LM with rotary positions (the model Flamingo gives eyes to)."""

    num_tokens: int
    dim: int
    depth: int
    heads: int = 4
    dim_head: int = 32
    max_seq_len: int = 256
    """longest sequence (prompt + generated tokens) the model accepts"""
    ff_mult: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_tokens", "dim", "depth", "heads", "max_seq_len"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.dim_head, "dim_head", minimum=2)
        if self.dim_head % 2:
            raise ValueError(f"dim_head: rotary positions need an even dim_head, got {self.dim_head}")
        check_number(self.ff_mult, "ff_mult", low=0.0, low_open=True)
        check_number(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)


@dataclass(frozen=True, kw_only=True)
class FlamingoConfig:
    """Flamingo (Alayrac et al. 2022): vision encoder -> Perceiver resampler -> gated cross-attention in an LM."""

    lm: LanguageModelConfig
    vision: VisionConfig
    media_token_id: int
    """the ``<image>`` token: where an image stands in the text"""
    end_of_chunk_token_id: int
    """``<|endofchunk|>``: ends the text that belongs to one image"""
    num_latents: int = 64
    """visual tokens per image the resampler outputs"""
    resampler_depth: int = 2
    resampler_heads: int = 4
    resampler_dim_head: int = 16
    max_frames: int = 1
    """frames per media item (time embeddings); 1 for still images"""
    cross_attn_every: int = 1
    """a gated cross-attention block before LM layers 0, every, 2 * every, ..."""
    cross_attn_heads: int = 4
    cross_attn_dim_head: int = 32
    cross_attn_ff_mult: float = 4.0
    gate_scale: float = 1.0
    """the gates are tanh(gate_scale * alpha), alpha starting at 0; 1 is the paper's, larger opens them
    in fewer steps (see ``GatedCrossAttentionBlock``)"""
    qk_norm: bool = True
    """RMS-normalised queries and keys in the resampler and the cross-attention (Dehghani et al. 2023,
    Wortsman et al. 2023): without them the cross-attention logits grow while training (to ~25 in the
    demo) and the loss spikes; False is the paper's plain attention"""
    only_attend_immediate_media: bool = True
    """True: a text token sees only the latest image before it; False: every image before it"""
    freeze_lm: bool = True
    """the paper trains only the resampler and the cross-attention blocks"""
    freeze_vision: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.lm, LanguageModelConfig):
            raise TypeError(f"lm: expected a LanguageModelConfig, got {type(self.lm).__name__}")
        if not isinstance(self.vision, VisionConfig):
            raise TypeError(f"vision: expected a VisionConfig, got {type(self.vision).__name__}")
        for name in ("media_token_id", "end_of_chunk_token_id"):
            value = getattr(self, name)
            check_int(value, name, minimum=0)
            if value >= self.lm.num_tokens:
                raise ValueError(f"{name}: must lie in the LM's vocabulary [0, {self.lm.num_tokens}), got {value}")
        if self.media_token_id == self.end_of_chunk_token_id:
            raise ValueError(f"end_of_chunk_token_id: must differ from media_token_id={self.media_token_id}")
        for name in ("num_latents", "resampler_depth", "resampler_heads", "resampler_dim_head", "max_frames"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("cross_attn_every", "cross_attn_heads", "cross_attn_dim_head"):
            check_int(getattr(self, name), name, minimum=1)
        if self.cross_attn_every > self.lm.depth:
            raise ValueError(f"cross_attn_every: at most the LM depth {self.lm.depth}, got {self.cross_attn_every}")
        check_number(self.cross_attn_ff_mult, "cross_attn_ff_mult", low=0.0, low_open=True)
        check_number(self.gate_scale, "gate_scale", low=0.0, low_open=True)
        for name in ("qk_norm", "only_attend_immediate_media", "freeze_lm", "freeze_vision"):
            _check_bool(getattr(self, name), name)

    @property
    def num_tokens(self) -> int:
        return self.lm.num_tokens

    @property
    def max_seq_len(self) -> int:
        return self.lm.max_seq_len

    @property
    def cross_attn_layers(self) -> tuple[int, ...]:
        """LM layers that a gated cross-attention block precedes."""
        return tuple(range(0, self.lm.depth, self.cross_attn_every))
