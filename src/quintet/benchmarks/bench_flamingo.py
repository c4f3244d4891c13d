"""Flamingo benchmarks (issue 12), both sides of every ratio measured in this process.

- generation: 256 new tokens after a prompt with 4 images, greedy; cached (the visual tokens and each
  cross-attention layer's media keys/values computed once, the LM's key/value cache) vs uncached
  (everything, the images included, recomputed every step). Ratio ``generation_cache_speedup``,
  target >= 10.
- train step of the resampler and the gated cross-attention (LM and encoder frozen, the encoder's
  forward included) at batch 8, 4 images of 64 latents, 512 text tokens: seconds and peak memory,
  and ``train_step_vs_flop_bound``: measured seconds / (the step's FLOPs / this machine's measured
  matmul rate), target <= 1.5. The FLOPs are counted by ``FlopCounterMode`` with the math attention
  kernel (the fused CPU kernel is not counted) and checked against the model's analytic count.

Absolute times depend on the machine and on what else runs on it; ratios are side by side.
"""

from __future__ import annotations

import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from quintet.bench import count_flops, matmul_flops_per_s, peak_memory, time_fn
from quintet.flamingo import Flamingo, FlamingoConfig, LanguageModelConfig, VisionConfig

VOCAB, IMAGE, END_OF_CHUNK = 1024, 1, 2


def _model(*, dim: int, depth: int, heads: int, dim_head: int, max_seq_len: int, vision_dim: int) -> Flamingo:
    torch.manual_seed(0)
    config = FlamingoConfig(
        lm=LanguageModelConfig(
            num_tokens=VOCAB, dim=dim, depth=depth, heads=heads, dim_head=dim_head, max_seq_len=max_seq_len
        ),
        vision=VisionConfig(image_size=32, kind="conv", dim=vision_dim, depth=3),
        media_token_id=IMAGE,
        end_of_chunk_token_id=END_OF_CHUNK,
        num_latents=64,
        resampler_depth=2,
        resampler_heads=heads,
        resampler_dim_head=vision_dim // heads,
        cross_attn_every=1,
        cross_attn_heads=heads,
        cross_attn_dim_head=dim_head,
    )
    model = Flamingo(config)
    with torch.no_grad():  # opened gates, as after training: the cross-attention changes the output
        for block in model.cross_attn.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def _interleaved(batch: int, images: int, text_per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``<image>`` followed by ``text_per_image`` random text tokens, ``images`` times."""
    text = torch.randint(3, VOCAB, (batch, images, text_per_image), generator=generator)
    media = torch.full((batch, images, 1), IMAGE)
    return torch.cat((media, text), dim=2).flatten(1)


def generation(new_tokens: int, *, quick: bool) -> dict:
    size = (
        dict(dim=256, depth=4, heads=4, dim_head=64, vision_dim=64)
        if quick
        else dict(dim=512, depth=6, heads=8, dim_head=64, vision_dim=128)
    )
    generator = torch.Generator().manual_seed(0)
    prompt = _interleaved(1, 4, 15, generator)  # 4 images, 64 prompt tokens
    model = _model(max_seq_len=prompt.shape[1] + new_tokens, **size).eval()
    images = torch.rand(1, 4, 3, 32, 32, generator=generator)
    tokens, seconds = {}, {}
    for name, use_cache in (("cached", True), ("uncached", False), ("cached_again", True)):
        start = time.perf_counter()
        tokens[name] = model.generate(prompt, new_tokens, images=images, temperature=0.0, use_cache=use_cache)
        seconds[name] = time.perf_counter() - start
    cached = min(seconds["cached"], seconds["cached_again"])  # the first cached run also warms up
    result = {
        "model": size,
        "prompt_tokens": prompt.shape[1],
        "images": 4,
        "new_tokens": new_tokens,
        "cached_s": cached,
        "uncached_s": seconds["uncached"],
        "cached_tokens_per_s": new_tokens / cached,
        "uncached_tokens_per_s": new_tokens / seconds["uncached"],
        "cached_equals_uncached": torch.equal(tokens["cached"], tokens["uncached"]),
        "cache_speedup": seconds["uncached"] / cached,
    }
    print(f"  generation: {result}", flush=True)
    return result


def train_step(*, quick: bool) -> dict:
    batch, images, seq_len = (2, 4, 128) if quick else (8, 4, 512)
    size = (
        dict(dim=256, depth=4, heads=4, dim_head=64, vision_dim=64)
        if quick
        else dict(dim=512, depth=6, heads=8, dim_head=64, vision_dim=128)
    )
    model = _model(max_seq_len=seq_len + 1, **size).train()  # LM and encoder frozen (the config's default)
    generator = torch.Generator().manual_seed(1)
    ids = _interleaved(batch, images, seq_len // images - 1, generator)
    ids = torch.cat((ids, ids[:, :1]), dim=1)  # seq_len + 1 tokens: inputs and next-token targets
    pixels = torch.rand(batch, images, 3, 32, 32, generator=generator)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)

    def forward_backward():
        logits = model(ids[:, :-1], pixels)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    with sdpa_kernel(SDPBackend.MATH):  # FlopCounterMode counts no fused CPU attention kernel
        counted = count_flops(forward_backward)
    analytic = model.train_flops(batch, seq_len, images)
    peak = peak_memory(step)
    seconds = time_fn(step, min_run_time=2.0 if quick else 5.0)
    rate = matmul_flops_per_s()
    bound = counted / rate
    result = {
        "model": size,
        "batch": batch,
        "images_per_sample": images,
        "latents": model.config.num_latents,
        "text_tokens": seq_len,
        "trained_parameters": sum(p.numel() for p in trained),
        "frozen_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "step_s": seconds,
        "peak_memory_mb": peak / 2**20 if peak is not None else None,
        "flops_counted": counted,
        "flops_analytic": analytic,
        "analytic_over_counted": analytic / counted,
        "matmul_flops_per_s": rate,
        "flop_bound_s": bound,
        "vs_flop_bound": seconds / bound,
    }
    print(f"  train step: {result}", flush=True)
    return result


def run(quick: bool = False) -> dict:
    gen = generation(64 if quick else 256, quick=quick)
    train = train_step(quick=quick)
    return {
        "generation": gen,
        "train_step": train,
        "ratios": {
            "generation_cache_speedup": gen["cache_speedup"],
            "train_step_vs_flop_bound": train["vs_flop_bound"],
        },
    }
