"""Analytic FLOPs of Flamingo's parts: what a training step's matmuls and convolutions cost.

Counted from shapes and configs only (no tensor is read): 2 * in * out per token per linear layer,
4 * i * j * inner for attention's QK^T and AV (causal self-attention in full, as the kernel computes
it), 2 * out_pixels * 9 * c_in * c_out per 3x3 convolution. A backward pass costs 2x the forward for
trained weights whose input needs a gradient, 1x for a frozen layer that passes gradients on, 1x for
a trained layer fed by data, and nothing for a frozen encoder. Tests hold these within 10% of
``torch.utils.flop_counter``'s count.
"""

from __future__ import annotations

from quintet.flamingo.config import FlamingoConfig, ImageClassifierConfig, LanguageModelConfig, VisionConfig


def _ff_flops(tokens: int, dim: int, mult: float, activation: str) -> int:
    """Forward matmul FLOPs of ``core.FeedForward`` (SwiGLU: 2/3 of the hidden width, two input halves)."""
    if activation == "swiglu":
        hidden = int(dim * mult * 2 / 3)
        return 2 * tokens * dim * 2 * hidden + 2 * tokens * hidden * dim
    hidden = int(dim * mult)
    return 4 * tokens * dim * hidden


def _attention_flops(tokens: int, keys: int, dim: int, dim_keys: int, heads: int, dim_head: int) -> tuple[int, int]:
    """Forward matmul FLOPs of ``core.Attention``: (the q / k / v / output projections, QK^T and AV)."""
    inner = heads * dim_head
    projections = 2 * tokens * dim * inner * 2 + 2 * keys * dim_keys * inner * 2
    return projections, 4 * tokens * keys * inner


def vision_encoder_flops(vision: VisionConfig) -> tuple[int, int]:
    """Forward matmul / convolution FLOPs per image: (the layer that reads the pixels, the rest)."""
    if vision.kind == "conv":
        widths = [vision.channels, vision.dim // 2] + [vision.dim] * (vision.depth - 1)
        # stage i convolves a map of side image_size / 2^i (3 x 3 kernels), then pools it
        convs = [2 * (vision.image_size // 2**i) ** 2 * 9 * widths[i] * widths[i + 1] for i in range(vision.depth)]
        return convs[0], sum(convs[1:])
    p = vision.tokens_per_image
    patch = 2 * p * vision.channels * vision.patch_size**2 * vision.dim
    projections, scores = _attention_flops(p, p, vision.dim, vision.dim, vision.heads, vision.dim_head)
    layer = projections + scores + _ff_flops(p, vision.dim, vision.ff_mult, "swiglu")
    return patch, vision.depth * layer


def flamingo_flops(
    config: FlamingoConfig,
    batch_size: int,
    seq_len: int,
    num_media: int,
    *,
    frames: int = 1,
    backward: bool = True,
    include_vision: bool = True,
) -> float:
    """Matmul FLOPs of a Flamingo forward (+ backward) pass; see :meth:`Flamingo.train_flops`.
    ``include_vision=False``: the encoder's features come precomputed."""
    lm, vision = config.lm, config.vision
    b, n, images = batch_size, seq_len, batch_size * num_media * frames
    # multiples of the forward FLOPs: a trained layer (forward, input and weight gradients), a frozen
    # layer that passes gradients on (forward, input gradient), a layer fed by data (forward, weight gradient)
    trained, passes_on, data_fed = (3, 2, 2) if backward else (1, 1, 1)

    # vision encoder, per image: its first layer reads pixels, so it never needs an input gradient
    first, rest = vision_encoder_flops(vision)
    if config.freeze_vision:
        vision_flops = images * (first + rest)
    else:
        vision_flops = images * (data_fed * first + trained * rest)

    # resampler, per media item: latents attend to [features of its frames; latents]
    latents, keys = config.num_latents, frames * vision.tokens_per_image + config.num_latents
    projections, scores = _attention_flops(
        latents, keys, vision.dim, vision.dim, config.resampler_heads, config.resampler_dim_head
    )
    resampler_layer = projections + scores + _ff_flops(latents, vision.dim, 4.0, "gelu")
    resampler_flops = trained * b * num_media * config.resampler_depth * resampler_layer

    # gated cross-attention blocks: n text tokens attend to m * l visual tokens
    projections, scores = _attention_flops(
        n, num_media * config.num_latents, lm.dim, vision.dim, config.cross_attn_heads, config.cross_attn_dim_head
    )
    xattn = projections + scores + _ff_flops(n, lm.dim, config.cross_attn_ff_mult, "gelu")
    xattn_flops = trained * b * len(config.cross_attn_layers) * xattn

    # language model layers and head: every layer follows the cross-attention block before layer 0,
    # so a frozen LM still passes gradients back through all of them
    lm_flops = language_model_flops(lm, b, n, frozen=config.freeze_lm, backward=backward)
    return float(vision_flops * include_vision + resampler_flops + xattn_flops + lm_flops)


def language_model_flops(
    lm: LanguageModelConfig, batch_size: int, seq_len: int, *, frozen: bool = False, backward: bool = True
) -> float:
    """Matmul FLOPs of the causal LM on ``(batch_size, seq_len)`` tokens; ``frozen``: no weight gradients
    (its input still needs one: in Flamingo a cross-attention block feeds the first layer)."""
    trained, passes_on = (3, 2) if backward else (1, 1)
    projections, scores = _attention_flops(seq_len, seq_len, lm.dim, lm.dim, lm.heads, lm.dim_head)
    weights = projections + _ff_flops(seq_len, lm.dim, lm.ff_mult, "swiglu")
    head = 2 * seq_len * lm.dim * lm.num_tokens
    weight_factor = passes_on if frozen else trained
    return float(batch_size * (lm.depth * (weight_factor * weights + trained * scores) + weight_factor * head))


def classifier_flops(config: ImageClassifierConfig, batch_size: int, *, backward: bool = True) -> float:
    """Matmul / convolution FLOPs of the image classifier on ``batch_size`` images."""
    first, rest = vision_encoder_flops(config.vision)
    head = 2 * config.vision.dim * config.num_classes
    trained, data_fed = (3, 2) if backward else (1, 1)
    return float(batch_size * (data_fed * first + trained * (rest + head)))
