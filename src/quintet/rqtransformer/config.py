"""Configs of the RQ-Transformer system: the RQ-VAE tokenizer, the RQ-Transformer prior, and the flat
code LM baseline (Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization").

Shape glossary: an image ``(3, H, W)`` is coded as ``(h, w, D)`` codes, ``h = H / f`` and ``w = W / f``
for the downsampling factor ``f``, ``D`` residual codes per position, each in ``[0, K)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from quintet.core.validation import check_int, check_number

DEPTH_INPUTS = ("cumulative", "individual")
CLASS_CONDITIONING = ("token", "film")
DISTANCES = ("euclidean", "cosine")


def check_code_shape(code_shape: object, name: str = "code_shape") -> tuple[int, int, int]:
    if not isinstance(code_shape, tuple) or len(code_shape) != 3:
        raise ValueError(f"{name}: expected (h, w, depth), got {code_shape!r}")
    for axis, value in zip(("h", "w", "depth"), code_shape):
        check_int(value, f"{name} ({axis})", minimum=1)
    return code_shape


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RQVAEConfig:
    """A convolutional autoencoder with a residual quantizer in its bottleneck (the paper's RQ-VAE).

    The encoder halves the resolution ``len(channels) - 1`` times (downsampling factor
    ``2 ** (len(channels) - 1)``); ``channels[i]`` is the width at the ``i``-th resolution.
    """

    image_size: int
    """side of the square training images; any size divisible by the downsampling factor encodes"""
    channels: tuple[int, ...] = (64, 128, 128)
    """conv width per resolution, full resolution first"""
    res_blocks: int = 1
    """residual blocks per resolution"""
    in_channels: int = 3
    latent_dim: int = 64
    """dimension of the quantized vectors"""
    codebook_size: int = 256
    depth: int = 4
    """residual codes per spatial position (D)"""
    shared_codebook: bool = True
    """one codebook for every depth (the paper's choice) or one per depth"""
    distance: str = "euclidean"
    ema_decay: float | None = 0.99
    """EMA codebook updates with this decay; None learns the codebook by gradient"""
    commitment_weight: float = 0.25
    rotation_trick: bool = False
    """rotation trick gradients (Fifty et al. 2024) instead of the straight-through estimator"""
    dead_code_threshold: int = 2
    """re-seed codes unused for this many updates (0: never)"""

    def __post_init__(self) -> None:
        check_int(self.image_size, "image_size", minimum=1)
        if not isinstance(self.channels, tuple) or len(self.channels) < 2:
            raise ValueError(f"channels: expected a tuple of >= 2 widths (>= 1 downsampling), got {self.channels!r}")
        for index, width in enumerate(self.channels):
            check_int(width, f"channels[{index}]", minimum=1)
        check_int(self.res_blocks, "res_blocks", minimum=0)
        check_int(self.in_channels, "in_channels", minimum=1)
        check_int(self.latent_dim, "latent_dim", minimum=1)
        check_int(self.codebook_size, "codebook_size", minimum=2)
        check_int(self.depth, "depth", minimum=1)
        _check_bool(self.shared_codebook, "shared_codebook")
        _check_bool(self.rotation_trick, "rotation_trick")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance: expected one of {DISTANCES}, got {self.distance!r}")
        if self.ema_decay is not None:
            check_number(self.ema_decay, "ema_decay", low=0.0, high=1.0, low_open=True, high_open=True)
        check_number(self.commitment_weight, "commitment_weight", low=0.0)
        check_int(self.dead_code_threshold, "dead_code_threshold", minimum=0)
        if self.image_size % self.downsampling:
            raise ValueError(
                f"image_size: {self.image_size} is not divisible by the downsampling factor {self.downsampling}"
            )

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def code_shape(self) -> tuple[int, int, int]:
        """``(h, w, D)`` codes of one training image."""
        side = self.image_size // self.downsampling
        return (side, side, self.depth)


@dataclass(frozen=True, kw_only=True)
class _PriorConfig:
    """What every prior over ``(h, w, D)`` codes shares."""

    codebook_size: int
    """K, the RQ-VAE's codebook size"""
    code_shape: tuple[int, int, int]
    """(h, w, D) codes per image"""
    num_classes: int = 0
    """class-conditional with this many classes (0: unconditional)"""
    class_dropout: float = 0.1
    """in training, replace the class by the null class with this probability (classifier-free guidance)"""
    dim: int = 256
    heads: int = 4
    dim_head: int = 64
    ff_mult: float = 4.0
    dropout: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_int(self.codebook_size, "codebook_size", minimum=2)
        check_code_shape(self.code_shape)
        check_int(self.num_classes, "num_classes", minimum=0)
        check_number(self.class_dropout, "class_dropout", low=0.0, high=1.0, high_open=True)
        check_int(self.dim, "dim", minimum=1)
        check_int(self.heads, "heads", minimum=1)
        check_int(self.dim_head, "dim_head", minimum=1)
        check_number(self.ff_mult, "ff_mult", low=0.0, low_open=True)
        check_number(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)
        check_number(self.label_smoothing, "label_smoothing", low=0.0, high=1.0, high_open=True)

    @property
    def num_positions(self) -> int:
        """T = h * w spatial positions."""
        return self.code_shape[0] * self.code_shape[1]

    @property
    def depth(self) -> int:
        return self.code_shape[2]

    @property
    def num_codes(self) -> int:
        """T * D codes per image."""
        return self.num_positions * self.depth

    @property
    def guidable(self) -> bool:
        """Trained with class dropout, so it has an unconditional branch for classifier-free guidance."""
        return self.num_classes > 0 and self.class_dropout > 0


@dataclass(frozen=True, kw_only=True)
class RQTransformerConfig(_PriorConfig):
    """The RQ-Transformer: a spatial transformer over the ``h * w`` positions and a depth transformer
    over the ``D`` codes of each position."""

    spatial_layers: int = 8
    depth_layers: int = 2
    depth_input: str = "cumulative"
    """depth step d > 0 reads the sum of the code embeddings of depths < d ('cumulative', the paper's
    eq. and official code) or the embedding of the code at depth d - 1 alone ('individual')"""
    class_conditioning: str = "token"
    """'token': the class embedding is the spatial start token (the paper); 'film': every norm of
    both transformers is modulated by the class embedding and the start token is learned"""
    shared_code_embedding: bool = True
    """one embedding table for every depth (matches a shared codebook) or one table per depth"""
    spatial_rotary: bool = False
    """besides the learned absolute positions, 2-D axial rotary positions in the spatial attention: scores
    then see the (row, column) offset between the positions whose codes two tokens carry, so a pattern
    learned at one place of the image is recognised at every other"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.spatial_layers, "spatial_layers", minimum=1)
        _check_bool(self.spatial_rotary, "spatial_rotary")
        if self.spatial_rotary and self.dim_head % 4:
            raise ValueError(f"dim_head: 2-D rotary positions need a dim_head divisible by 4, got {self.dim_head}")
        check_int(self.depth_layers, "depth_layers", minimum=1)
        if self.depth_input not in DEPTH_INPUTS:
            raise ValueError(f"depth_input: expected one of {DEPTH_INPUTS}, got {self.depth_input!r}")
        if self.class_conditioning not in CLASS_CONDITIONING:
            raise ValueError(
                f"class_conditioning: expected one of {CLASS_CONDITIONING}, got {self.class_conditioning!r}"
            )
        _check_bool(self.shared_code_embedding, "shared_code_embedding")


@dataclass(frozen=True, kw_only=True)
class FlatCodeLMConfig(_PriorConfig):
    """One causal transformer over all ``h * w * D`` codes in raster-depth order: the baseline."""

    layers: int = 8
    rotary: bool = False
    """besides the learned absolute positions, 2-D axial rotary positions in attention: the (row, column)
    of the code each token carries (the D codes of a position share it), as the RQ-Transformer's
    ``spatial_rotary``"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.layers, "layers", minimum=1)
        _check_bool(self.rotary, "rotary")
        if self.rotary and self.dim_head % 4:
            raise ValueError(f"dim_head: 2-D rotary positions need a dim_head divisible by 4, got {self.dim_head}")

    @property
    def num_tokens(self) -> int:
        """Input vocabulary: the K codes, one token per class, and the start (null class) token."""
        return self.codebook_size + self.num_classes + 1

    @property
    def max_seq_len(self) -> int:
        """The start token and every code (what ``core.generation.generate`` bounds prompt + new tokens by)."""
        return 1 + self.num_codes
