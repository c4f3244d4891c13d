"""Configs of the Genie world model: frame tokenizer, latent action model, dynamics transformer."""

from __future__ import annotations

from dataclasses import dataclass

from quintet.core.validation import check_int, check_number

OBJECTIVES = ("autoregressive", "maskgit")
SPACE_POSITIONS = ("rotary", "learned")


def _check_channels(channels: object, name: str) -> None:
    if not isinstance(channels, tuple) or not channels:
        raise ValueError(f"{name}: expected a non-empty tuple of channel widths, got {channels!r}")
    for index, width in enumerate(channels):
        check_int(width, f"{name}[{index}]")


def _check_image_size(image_size: object, levels: int) -> None:
    if not isinstance(image_size, tuple) or len(image_size) != 2:
        raise ValueError(f"image_size: expected a (height, width) tuple, got {image_size!r}")
    for side in image_size:
        check_int(side, "image_size")
        if side % 2**levels:
            raise ValueError(
                f"image_size: {levels} downsampling levels need sides divisible by {2**levels}, got {image_size}"
            )


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """A convolutional VQ autoencoder that turns each frame into a grid of discrete tokens.

    Every entry of ``channels`` is one stride-2 level, so frames of ``image_size`` become token grids
    of ``image_size / 2**len(channels)``.
    """

    image_size: tuple[int, int] = (64, 64)
    """(height, width) of the frames in pixels"""
    image_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128)
    """conv widths of the downsampling levels (the decoder mirrors them)"""
    res_blocks: int = 1
    """residual blocks per level"""
    codebook_size: int = 512
    codebook_dim: int = 32
    commitment_weight: float = 0.25
    ema_decay: float | None = 0.95
    """codebook EMA decay (None: the codebook learns by gradient)"""
    dead_code_threshold: int = 0
    """a code unused for this many consecutive updates is re-seeded from the batch (0: never)"""
    temporal_convs: bool = False
    """causal temporal convolutions before and after the quantizer (tokens see earlier frames)"""
    temporal_kernel: int = 3
    temporal_recon_weight: float = 0.2
    """weight of the latent reconstruction loss that teaches the post-quantizer conv to undo the pre one"""

    def __post_init__(self) -> None:
        _check_channels(self.channels, "channels")
        _check_image_size(self.image_size, len(self.channels))
        for name in ("image_channels", "codebook_size", "codebook_dim", "temporal_kernel"):
            check_int(getattr(self, name), name)
        check_int(self.res_blocks, "res_blocks", minimum=0)
        check_number(self.commitment_weight, "commitment_weight", low=0.0)
        check_number(self.temporal_recon_weight, "temporal_recon_weight", low=0.0)
        check_int(self.dead_code_threshold, "dead_code_threshold", minimum=0)
        if self.ema_decay is not None:
            check_number(self.ema_decay, "ema_decay", low=0.0, high=1.0, low_open=True, high_open=True)
        if not isinstance(self.temporal_convs, bool):
            raise ValueError(f"temporal_convs: expected a bool, got {self.temporal_convs!r}")

    @property
    def token_grid(self) -> tuple[int, int]:
        factor = 2 ** len(self.channels)
        return self.image_size[0] // factor, self.image_size[1] // factor


@dataclass(frozen=True, kw_only=True)
class LatentActionConfig:
    """Genie's latent action model: a tiny codebook of actions inferred from pairs of frames.

    The encoder sees frames ``t`` and ``t + 1`` and emits one of ``num_latent_actions`` codes; the
    decoder must rebuild frame ``t + 1`` from frame ``t`` and that code alone, so the code carries
    what changed, which in a game is mostly what the player did.
    """

    image_size: tuple[int, int] = (64, 64)
    image_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 64)
    """conv widths of the stride-2 levels of the encoder and of the decoder's frame path"""
    num_latent_actions: int = 8
    action_dim: int = 16
    """width of a latent action code"""
    commitment_weight: float = 0.25
    changed_pixel_weight: float = 10.0
    """extra loss weight of the pixels that change between the two frames: copying frame t already gets
    the static rest right, so without it the decoder can ignore the code and the codebook collapses"""

    def __post_init__(self) -> None:
        _check_channels(self.channels, "channels")
        _check_image_size(self.image_size, len(self.channels))
        check_number(self.changed_pixel_weight, "changed_pixel_weight", low=0.0)
        for name in ("image_channels", "num_latent_actions", "action_dim"):
            check_int(getattr(self, name), name)
        if self.num_latent_actions < 2:
            raise ValueError(f"num_latent_actions: expected >= 2, got {self.num_latent_actions}")
        check_number(self.commitment_weight, "commitment_weight", low=0.0)


@dataclass(frozen=True, kw_only=True)
class GenieConfig:
    """The dynamics transformer: next-frame tokens from past frames' tokens and the actions taken.

    ``num_actions=None`` is a plain video model (no actions). ``max_keys > 1`` takes a set of up to
    that many keys pressed at once per step instead of one action id.
    """

    num_codes: int
    """vocabulary of frame tokens (the tokenizer's codebook size)"""
    token_grid: tuple[int, int]
    """(rows, columns) of tokens per frame"""
    max_frames: int = 16
    """longest clip, and the context window when imagining"""
    dim: int = 256
    depth: int = 8
    heads: int = 8
    dim_head: int = 32
    ff_mult: float = 4.0
    dropout: float = 0.0
    objective: str = "maskgit"
    """'maskgit' (Genie: whole frames in a few parallel refinement steps, block-causal attention) or
    'autoregressive' (token by token with a key/value cache across frames)"""
    num_actions: int | None = None
    """action ids (or keys) in [0, num_actions); None: no actions"""
    max_keys: int = 1
    """1: one action id per step; > 1: a sorted set of up to this many keys, padded with -1"""
    num_meta_tokens: int = 0
    """learned register tokens in front of every clip (Hymba's meta tokens)"""
    action_dropout: float = 0.0
    """probability of hiding a step's action in training (classifier-free guidance, action head)"""
    action_loss_weight: float = 0.0
    """weight of the action-prediction head's loss (which action led from frame t to t + 1)"""
    previous_frame_input: bool = True
    """each slot also embeds the previous frame's token at the grid position the slot predicts: a direct
    path for what stays put (most of a game frame), so attention can spend itself on what moves"""
    changed_token_weight: float = 1.0
    """loss weight of a token whose code differs from the same place in the frame before (the moving
    parts: in a game most tokens are static background, which would otherwise dominate the loss)"""
    maskgit_steps: int = 8
    """default refinement steps per frame when decoding in parallel"""
    space_positions: str = "rotary"
    """'rotary': attention also rotates with the token's (row, column), so it sees relative offsets in
    space as well as in time (3-axis rotary); 'learned': time is rotary, space only learned embeddings"""
    rotary_theta: float = 10000.0
    """rotary base of the time axis"""
    space_theta: float = 100.0
    """rotary base of the row and column axes (grids are small: a lower base resolves short distances)"""

    def __post_init__(self) -> None:
        for name in ("num_codes", "max_frames", "dim", "heads", "maskgit_steps"):
            check_int(getattr(self, name), name)
        check_int(self.depth, "depth")
        check_int(self.dim_head, "dim_head", minimum=2)
        check_int(self.num_meta_tokens, "num_meta_tokens", minimum=0)
        check_int(self.max_keys, "max_keys")
        if not isinstance(self.previous_frame_input, bool):
            raise ValueError(f"previous_frame_input: expected a bool, got {self.previous_frame_input!r}")
        if not isinstance(self.token_grid, tuple) or len(self.token_grid) != 2:
            raise ValueError(f"token_grid: expected a (rows, columns) tuple, got {self.token_grid!r}")
        for side in self.token_grid:
            check_int(side, "token_grid")
        if self.max_frames < 2:
            raise ValueError(f"max_frames: a world model needs clips of >= 2 frames, got {self.max_frames}")
        if self.dim_head % 2:
            raise ValueError(f"dim_head: rotary time positions need an even dim_head, got {self.dim_head}")
        if self.space_positions not in SPACE_POSITIONS:
            raise ValueError(f"space_positions: expected one of {SPACE_POSITIONS}, got {self.space_positions!r}")
        if self.space_positions == "rotary" and self.dim_head < 6:
            raise ValueError(f"dim_head: 3-axis rotary needs dim_head >= 6, got {self.dim_head}")
        check_number(self.space_theta, "space_theta", low=0.0, low_open=True)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        check_number(self.ff_mult, "ff_mult", low=0.0, low_open=True)
        check_number(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)
        check_number(self.action_dropout, "action_dropout", low=0.0, high=1.0, high_open=True)
        check_number(self.action_loss_weight, "action_loss_weight", low=0.0)
        check_number(self.changed_token_weight, "changed_token_weight", low=0.0, low_open=True)
        check_number(self.rotary_theta, "rotary_theta", low=0.0, low_open=True)
        if self.num_actions is None:
            if self.max_keys != 1 or self.action_dropout or self.action_loss_weight:
                raise ValueError(
                    "num_actions: a model without actions takes no max_keys, action_dropout or action_loss_weight"
                )
        else:
            check_int(self.num_actions, "num_actions")
            if self.max_keys > self.num_actions:
                raise ValueError(f"max_keys: at most num_actions={self.num_actions} keys, got {self.max_keys}")
        if self.action_loss_weight and not self.action_dropout:
            # the head reads frame t + 1, whose tokens carry a_t: it may learn only where a_t was hidden
            raise ValueError(
                "action_loss_weight: the action head learns on steps whose action is hidden; set action_dropout > 0"
            )

    @property
    def tokens_per_frame(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    @property
    def block_size(self) -> int:
        """Sequence slots per frame: one head slot (the action that led here) and the frame's tokens."""
        return self.tokens_per_frame + 1

    @property
    def has_actions(self) -> bool:
        return self.num_actions is not None
