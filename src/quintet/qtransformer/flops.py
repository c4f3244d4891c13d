"""FLOPs of a Q-Transformer training step from its config and batch shapes (the Trainer's MFU readout).

Counted as :mod:`quintet.core.flops` counts (``FlopCounterMode``'s rules): matmuls and convolutions
(``2 x`` multiply-adds, a depthwise conv per channel), attention over every query-key pair; norms
and activations are free. A training step is the online network's forward + backward on ``obs``
plus the target network's forward on ``next_obs`` (on ``obs`` and ``next_obs`` for several action
dimensions, :meth:`~quintet.qtransformer.learner.QLearner.targets`). The observation stem's input
needs no gradient, so its backward is the weight gradient only (2x its forward, not 3x).
"""

from __future__ import annotations

from quintet.core import flops
from quintet.core.flops import Flops
from quintet.qtransformer.config import (
    InstructionEncoderConfig,
    MaxViTConfig,
    QTransformerConfig,
    StateEncoderConfig,
)


def conv(pixels: float, dim_in: int, dim_out: int, kernel: int, *, groups: int = 1) -> Flops:
    """A ``kernel x kernel`` convolution producing ``pixels`` output positions."""
    return Flops(matmul=2.0 * pixels * dim_out * (dim_in // groups) * kernel * kernel)


def maxvit(
    config: MaxViTConfig, images: float, height: int, width: int, *, dim_cond: int | None
) -> tuple[Flops, Flops]:
    """``(stem, rest)`` forward FLOPs of :class:`~quintet.qtransformer.maxvit.MaxViT` on ``images`` frames."""
    stem_dim = config.dim_conv_stem or config.dim
    if config.patch_size is None:  # the first conv is the stem (its input needs no gradient)
        pixels = images * (height // 2) * (width // 2)
        stem = conv(pixels, config.channels, stem_dim, 3)
        total = conv(pixels, stem_dim, stem_dim, 3)
    else:
        pixels = images * (height // config.patch_size) * (width // config.patch_size)
        stem = conv(pixels, config.channels, stem_dim, config.patch_size)
        total = Flops()
    dims = [stem_dim] + [config.dim * 2**s for s in range(len(config.depth))]
    window = config.window_size**2
    for stage, depth in enumerate(config.depth):
        for index in range(depth):
            dim_in, dim = (dims[stage] if index == 0 else dims[stage + 1]), dims[stage + 1]
            downsample = index == 0 and not (stage == 0 and config.patch_size is not None)
            out_pixels = pixels / 4 if downsample else pixels
            if dim_cond:
                total = total + flops.linear(images, dim_cond, 2 * dim_in)  # FiLM
            hidden = int(config.mbconv_expansion_rate * dim)
            squeeze = max(1, int(hidden * config.mbconv_shrinkage_rate))
            total = total + conv(pixels, dim_in, hidden, 1) + conv(out_pixels, hidden, hidden, 3, groups=hidden)
            total = total + flops.linear(images, hidden, squeeze) + flops.linear(images, squeeze, hidden)
            total = total + conv(out_pixels, hidden, dim, 1)
            for _ in ("block", "grid"):
                windows = out_pixels / window
                attention = flops.attention_layer(
                    window, window + config.num_mem_kv, dim=dim, heads=config.heads, dim_head=config.dim_head
                )
                total = total + windows * attention + flops.linear(out_pixels, dim, config.heads)  # + value gates
                total = total + flops.feedforward(out_pixels, dim, 4.0, "gelu")
            pixels = out_pixels
    return stem, total


def state_encoder(config: StateEncoderConfig, states: float, *, dim_cond: int | None) -> tuple[Flops, Flops]:
    """``(stem, rest)`` forward FLOPs of the state MLP on ``states`` frames."""
    stem = flops.linear(states, config.state_dim, config.dim)
    rest = Flops()
    for _ in range(config.depth):
        if dim_cond:
            rest = rest + flops.linear(states, dim_cond, 2 * config.dim)
        rest = (
            rest + flops.linear(states, config.dim, 2 * config.dim) + flops.linear(states, 2 * config.dim, config.dim)
        )
    return stem, rest + flops.linear(states, config.dim, config.dim * config.num_tokens)


def transformer(
    sequences: float,
    tokens: int,
    depth: int,
    *,
    dim: int,
    heads: int,
    dim_head: int,
    dim_cond: int | None = None,
    context: int | None = None,
) -> Flops:
    """A ``core.Transformer`` (SwiGLU, x4) over ``sequences`` of ``tokens``; conditioned norms (two or
    three a block, and the final one) project once per sequence."""
    block = flops.transformer_block(tokens, dim=dim, heads=heads, dim_head=dim_head, context=context)
    norms = depth * (2 + (context is not None)) + 1
    cond = flops.linear(sequences, dim_cond, 2 * dim) * norms if dim_cond else Flops()
    return block * (depth * sequences) + cond


def instruction_encoder(config: InstructionEncoderConfig, sequences: float, words: int) -> Flops:
    return transformer(sequences, words, config.depth, dim=config.dim, heads=config.heads, dim_head=config.dim_head)


def forward_flops(
    config: QTransformerConfig, obs_shape: tuple[int, ...], *, text_words: int | None
) -> tuple[Flops, Flops]:
    """``(stem, rest)`` forward FLOPs of the model on observations ``obs_shape`` (teacher-forced on
    actions for several dimensions); ``text_words``: the width of ``text_ids`` when it encodes them."""
    b = obs_shape[0]
    dim_cond = config.text_embed_dim if config.condition_on_text else None
    if config.is_image:
        frames, height, width = obs_shape[2], obs_shape[3], obs_shape[4]
        stem, rest = maxvit(config.encoder, b * frames, height, width, dim_cond=dim_cond)
        positions = (height // config.encoder.downsample) * (width // config.encoder.downsample)
    else:
        frames = obs_shape[1]
        stem, rest = state_encoder(config.encoder, b * frames, dim_cond=dim_cond)
        positions = config.encoder.num_tokens
    d, n = config.dim, config.num_learned_tokens
    hidden = d * config.token_learner_ff_mult
    rows = b * frames * positions
    rest = rest + flops.linear(rows, d, hidden) + flops.linear(rows, hidden, n) + Flops(matmul=2.0 * rows * n * d)
    tokens = frames * n
    rest = rest + transformer(
        b, tokens, config.depth, dim=d, heads=config.heads, dim_head=config.dim_head, dim_cond=dim_cond
    )
    if config.instruction_encoder is not None and text_words is not None:
        rest = rest + instruction_encoder(config.instruction_encoder, b, text_words)
    if config.num_actions == 1:
        if config.dueling:
            rest = (
                rest
                + flops.linear(b, d, 2 * d)
                + flops.linear(b, 2 * d, 1)
                + flops.linear(b, 2 * d, config.action_bins)
            )
        else:
            rest = rest + flops.linear(b, d, config.action_bins)
    else:
        k = config.num_actions
        rest = rest + transformer(
            b, k, config.q_head_depth, dim=d, heads=config.q_head_heads, dim_head=config.q_head_dim_head, context=tokens
        )
        rest = (
            rest
            + flops.linear(b * k, d, config.action_bins)
            + (flops.linear(b * k, d, 1) if config.dueling else Flops())
        )
    return stem, rest


def training_step_flops(config: QTransformerConfig, batch: dict) -> float:
    """Forward + backward FLOPs of one :class:`~quintet.qtransformer.learner.QLearner` step on ``batch``
    (shapes only): the online network trained on ``obs``, the target network's forward beside it."""
    obs_shape = tuple(batch["obs"].shape)
    words = batch["text_ids"].shape[1] if "text_ids" in batch else None
    stem, rest = forward_flops(config, obs_shape, text_words=words)
    online = 2.0 * stem.forward + rest.training
    target_shape = obs_shape if config.num_actions == 1 else (2 * obs_shape[0], *obs_shape[1:])
    target_stem, target_rest = forward_flops(config, target_shape, text_words=words)
    return online + target_stem.forward + target_rest.forward
