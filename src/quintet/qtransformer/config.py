"""Configs of the Q-Transformer (Chebotar et al. 2023) and its observation encoders."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from quintet.core.validation import check_int, check_number

MBConvNorm = Literal["instance", "channel_rms", "batch"]


@dataclass(frozen=True, kw_only=True)
class MaxViTConfig:
    """MaxViT image encoder (Tu et al. 2022): conv stem, then stages of MBConv + block + grid attention.

    Stage ``s`` has width ``dim * 2**s`` and halves the resolution; images need a side divisible by
    ``downsample * window_size`` (stem stride 2, one downsample per stage, whole windows). With
    ``patch_size`` the stem cuts the image into ``patch_size``-pixel patches instead and the first
    stage keeps their resolution (a side divisible by ``patch_size * 2**(len(depth) - 1) * window_size``).
    """

    channels: int = 3
    dim: int = 32
    depth: tuple[int, ...] = (1,)
    """MaxViT blocks per stage"""
    dim_conv_stem: int | None = None
    patch_size: int | None = None
    """None: a stride-2 conv stem and a downsampling first stage. An int: a patch-embedding stem (a conv
    of kernel and stride ``patch_size``) and a first stage at patch resolution: for grid worlds drawn
    as ``patch_size``-pixel cells (BabyAI), one token per cell whose features see exactly that cell"""
    heads: int = 4
    dim_head: int = 16
    """must be divisible by 4 (2-D axial rotary)"""
    window_size: int = 4
    mbconv_expansion_rate: float = 4.0
    mbconv_shrinkage_rate: float = 0.25
    mbconv_norm: MBConvNorm = "instance"
    """normalisation inside MBConv. ``instance``: each channel over the image, per sample (no batch
    statistics: offline-RL friendly, and a feature that fires in one place still stands out there);
    ``channel_rms``: each position over its channels, which gives every position the same feature
    norm, so the salience an instruction's FiLM adds to the named object is normalised away
    (measured: "which side is the red/blue blob" from a 2-word instruction was still at chance after
    1200 steps, learned in < 100 with ``instance``); ``batch``: batch statistics"""
    num_mem_kv: int = 4
    film_output: bool = False
    """a text-conditioned encoder also modulates its output feature map (FiLM), not only each block's
    input: the TokenLearner's spatial weights then read the instruction directly"""
    dropout: float = 0.0
    absolute_positions: bool = True
    """add fixed 2-D sinusoidal positions to the output feature map: attention inside MaxViT sees only
    relative (rotary) positions, and the TokenLearner pools over the map, so without them the pooled
    tokens cannot tell where in the view a feature was (a navigating policy needs "left of me")"""

    def __post_init__(self) -> None:
        for name in ("channels", "dim", "heads", "dim_head", "window_size"):
            check_int(getattr(self, name), name)
        if not self.depth or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.depth):
            raise ValueError(f"depth: expected a non-empty tuple of integers >= 1, got {self.depth!r}")
        if self.dim_conv_stem is not None:
            check_int(self.dim_conv_stem, "dim_conv_stem")
        if self.patch_size is not None:
            check_int(self.patch_size, "patch_size")
        if self.dim_head % 4:
            raise ValueError(f"dim_head: 2-D axial rotary needs a multiple of 4, got {self.dim_head}")
        if self.num_mem_kv < 0:
            raise ValueError(f"num_mem_kv: expected >= 0, got {self.num_mem_kv}")
        if self.absolute_positions and self.embed_dim % 4:
            raise ValueError(
                f"absolute_positions: 2-D sinusoids need an output width divisible by 4, got {self.embed_dim}"
            )
        if self.mbconv_norm not in ("instance", "channel_rms", "batch"):
            raise ValueError(
                f"mbconv_norm: expected 'instance', 'channel_rms' or 'batch', got {self.mbconv_norm!r}"
            )
        check_number(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)

    @property
    def embed_dim(self) -> int:
        return self.dim * 2 ** (len(self.depth) - 1)

    @property
    def downsample(self) -> int:
        """pixels per side of one output position"""
        if self.patch_size is not None:
            return self.patch_size * 2 ** (len(self.depth) - 1)
        return 2 ** (len(self.depth) + 1)


@dataclass(frozen=True, kw_only=True)
class StateEncoderConfig:
    """MLP encoder of a proprioceptive state vector into a ``1 x num_tokens`` feature map."""

    state_dim: int
    dim: int = 64
    depth: int = 2
    """hidden layers"""
    num_tokens: int = 4
    """width of the feature map handed to the TokenLearner"""

    def __post_init__(self) -> None:
        for name in ("state_dim", "dim", "depth", "num_tokens"):
            check_int(getattr(self, name), name)

    @property
    def embed_dim(self) -> int:
        return self.dim


BABYAI_WORDS = (
    "go to the a pick up open put next you then after and behind in front of on your left right "
    "red green blue purple yellow grey ball box key door object"
).split()
"""every word of the BabyAI grammar's missions"""
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True, kw_only=True)
class InstructionEncoderConfig:
    """A word-level transformer encoder of instructions, mean-pooled into one ``dim`` vector."""

    vocab: tuple[str, ...] = tuple(BABYAI_WORDS)
    """the words it knows (lower case); any other word maps to one shared unknown-word id"""
    max_words: int = 16
    """longer instructions are cut to their first ``max_words`` words"""
    dim: int = 32
    depth: int = 1
    heads: int = 2
    dim_head: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.vocab, tuple) or not self.vocab or not all(
            isinstance(w, str) and _WORD.fullmatch(w) for w in self.vocab
        ):
            raise ValueError("vocab: expected a non-empty tuple of lower-case words")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab: words must be distinct")
        for name in ("max_words", "dim", "heads", "dim_head"):
            check_int(getattr(self, name), name)
        check_int(self.depth, "depth", minimum=0)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2  # padding and unknown words first


@dataclass(frozen=True, kw_only=True)
class QTransformerConfig:
    """Q-Transformer: encoder -> TokenLearner -> frame-causal transformer -> per-dimension Q head.

    The transformer width ``dim`` must equal the encoder's ``embed_dim`` (frame tokens go straight in).
    """

    num_actions: int
    """action dimensions (tokens of the autoregressive Q head; 1 uses a single-step head)"""
    action_bins: int
    """discrete bins per action dimension"""
    encoder: MaxViTConfig | StateEncoderConfig
    dim: int = 64
    depth: int = 2
    heads: int = 4
    dim_head: int = 16
    frames: int = 1
    """observation frames the model is built for (frame positions up to this many)"""
    num_learned_tokens: int = 4
    """TokenLearner output tokens per frame"""
    token_learner_ff_mult: int = 2
    q_head_depth: int = 2
    """layers of the autoregressive Q-head decoder (several action dimensions)"""
    q_head_heads: int = 4
    q_head_dim_head: int = 16
    dueling: bool = False
    weight_tie_action_bin_embed: bool = True
    condition_on_text: bool = False
    text_embed_dim: int | None = None
    cond_drop_prob: float = 0.2
    """probability of replacing the text embedding by the learned null one in training (for guidance)"""
    instruction_encoder: InstructionEncoderConfig | None = None
    """encode instructions inside the model (word ids in, trained with the policy); its ``dim`` is
    the ``text_embed_dim``. None: the model takes ready text embeddings (a frozen sentence encoder)"""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "num_actions",
            "action_bins",
            "dim",
            "depth",
            "heads",
            "dim_head",
            "frames",
            "num_learned_tokens",
            "token_learner_ff_mult",
            "q_head_depth",
            "q_head_heads",
            "q_head_dim_head",
        ):
            check_int(getattr(self, name), name)
        if self.action_bins < 2:
            raise ValueError(f"action_bins: expected >= 2, got {self.action_bins}")
        if not isinstance(self.encoder, (MaxViTConfig, StateEncoderConfig)):
            raise TypeError(f"encoder: expected MaxViTConfig or StateEncoderConfig, got {type(self.encoder).__name__}")
        if self.encoder.embed_dim != self.dim:
            raise ValueError(f"dim: must equal the encoder's embed_dim {self.encoder.embed_dim}, got {self.dim}")
        if self.dim % 2:
            raise ValueError(f"dim: sinusoidal frame positions need an even dim, got {self.dim}")
        if self.condition_on_text:
            if self.text_embed_dim is None:
                raise ValueError("text_embed_dim: required when condition_on_text=True")
            check_int(self.text_embed_dim, "text_embed_dim")
        elif self.text_embed_dim is not None:
            raise ValueError("text_embed_dim: set only with condition_on_text=True")
        if self.instruction_encoder is not None:
            if not isinstance(self.instruction_encoder, InstructionEncoderConfig):
                raise TypeError(
                    f"instruction_encoder: expected an InstructionEncoderConfig, got "
                    f"{type(self.instruction_encoder).__name__}"
                )
            if not self.condition_on_text or self.text_embed_dim != self.instruction_encoder.dim:
                raise ValueError(
                    f"instruction_encoder: needs condition_on_text=True and text_embed_dim equal to its dim "
                    f"{self.instruction_encoder.dim}, got {self.condition_on_text} / {self.text_embed_dim}"
                )
        check_number(self.cond_drop_prob, "cond_drop_prob", low=0.0, high=1.0, high_open=True)
        check_number(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)

    @property
    def is_image(self) -> bool:
        return isinstance(self.encoder, MaxViTConfig)
