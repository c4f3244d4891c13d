"""Configs of the Q-Transformer (Chebotar et al. 2023) and its observation encoders."""

from __future__ import annotations

from dataclasses import dataclass

from quintet.core.validation import check_int, check_number


@dataclass(frozen=True, kw_only=True)
class MaxViTConfig:
    """MaxViT image encoder (Tu et al. 2022): conv stem, then stages of MBConv + block + grid attention.

    Stage ``s`` has width ``dim * 2**s`` and halves the resolution; images need a side divisible by
    ``2 * 2**len(depth) * window_size`` (stem stride 2, one downsample per stage, whole windows).
    """

    channels: int = 3
    dim: int = 32
    depth: tuple[int, ...] = (1,)
    """MaxViT blocks per stage"""
    dim_conv_stem: int | None = None
    heads: int = 4
    dim_head: int = 16
    """must be divisible by 4 (2-D axial rotary)"""
    window_size: int = 4
    mbconv_expansion_rate: float = 4.0
    mbconv_shrinkage_rate: float = 0.25
    use_layernorm: bool = True
    """RMS-normalise MBConv channels instead of batch-norm (no batch statistics: offline-RL friendly)"""
    num_mem_kv: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("channels", "dim", "heads", "dim_head", "window_size"):
            check_int(getattr(self, name), name)
        if not self.depth or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.depth):
            raise ValueError(f"depth: expected a non-empty tuple of integers >= 1, got {self.depth!r}")
        if self.dim_conv_stem is not None:
            check_int(self.dim_conv_stem, "dim_conv_stem")
        if self.dim_head % 4:
            raise ValueError(f"dim_head: 2-D axial rotary needs a multiple of 4, got {self.dim_head}")
        if self.num_mem_kv < 0:
            raise ValueError(f"num_mem_kv: expected >= 0, got {self.num_mem_kv}")
        check_number(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)

    @property
    def embed_dim(self) -> int:
        return self.dim * 2 ** (len(self.depth) - 1)

    @property
    def downsample(self) -> int:
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
        check_number(self.cond_drop_prob, "cond_drop_prob", low=0.0, high=1.0, high_open=True)
        check_number(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)

    @property
    def is_image(self) -> bool:
        return isinstance(self.encoder, MaxViTConfig)
