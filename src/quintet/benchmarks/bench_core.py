"""Core benchmark: ``Attention`` (SDPA) vs a plain einsum-softmax attention, and KV-cache decoding.

Targets (issue 2): at seq 4096 at least 1.3x faster and 4x lower peak memory than the reference for
forward + backward; decoding 1,024 tokens with the cache at least 10x faster than recomputing the
prefix every step. Float32 on CPU; both sides of every ratio run in this process, one after another.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from quintet.bench import peak_memory, time_fn
from quintet.core import Attention, KVCache, Transformer

DIM, HEADS, DIM_HEAD, BATCH = 256, 8, 32, 2


class EinsumAttention(nn.Module):
    """The textbook causal attention: materialise the (i, j) score matrix, mask, softmax."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.to_qkv, self.to_out, self.heads = attention.to_qkv, attention.to_out, attention.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.to_qkv(x), "b n (t h e) -> t b h n e", t=3, h=self.heads)
        scores = torch.einsum("bhie,bhje->bhij", q, k) * q.shape[-1] ** -0.5
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = torch.einsum("bhij,bhje->bhie", attn, v)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))


def _train_step(module: nn.Module, x: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    return step


def attention_vs_reference(seq_lens) -> dict:
    torch.manual_seed(0)
    rows = []
    for n in seq_lens:
        ours = Attention(DIM, heads=HEADS, dim_head=DIM_HEAD, causal=True)
        reference = EinsumAttention(ours)
        x = torch.randn(BATCH, n, DIM, requires_grad=True)
        with torch.no_grad():
            diff = (ours(x) - reference(x)).abs().max().item()
        run_time = 2.0 if n <= 2048 else 1.0
        t_ours = time_fn(_train_step(ours, x), min_run_time=run_time)
        t_ref = time_fn(_train_step(reference, x), min_run_time=run_time)
        m_ours = peak_memory(_train_step(ours, x))
        m_ref = peak_memory(_train_step(reference, x))
        rows.append(
            {
                "seq_len": n,
                "max_abs_diff": diff,
                "ours_s": t_ours,
                "reference_s": t_ref,
                "speedup": t_ref / t_ours,
                "ours_peak_mb": m_ours / 2**20 if m_ours is not None else None,
                "reference_peak_mb": m_ref / 2**20 if m_ref is not None else None,
                "memory_ratio": (m_ref / max(m_ours, 1)) if m_ours is not None else None,
            }
        )
        print(f"  attention seq {n}: {t_ref / t_ours:.2f}x faster, memory {rows[-1]['memory_ratio']}", flush=True)
    return {"rows": rows}


@torch.no_grad()
def decoding(num_tokens: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(DIM, 2, heads=HEADS, dim_head=DIM_HEAD, causal=True, rotary=True).eval()
    stream = torch.randn(1, num_tokens, DIM)

    def cached():
        cache = KVCache()
        for t in range(num_tokens):
            model(stream[:, t : t + 1], cache=cache)

    def recompute():
        for t in range(num_tokens):
            model(stream[:, : t + 1])[:, -1]

    t_cached = time_fn(cached, min_run_time=0.5)
    t_recompute = time_fn(recompute, min_run_time=0.5)
    return {
        "tokens": num_tokens,
        "cached_s": t_cached,
        "recompute_s": t_recompute,
        "cached_tokens_per_s": num_tokens / t_cached,
        "speedup": t_recompute / t_cached,
    }


def run(quick: bool = False) -> dict:
    seq_lens = (256, 512) if quick else (512, 2048, 4096)
    attention = attention_vs_reference(seq_lens)
    decode = decoding(128 if quick else 1024)
    longest = attention["rows"][-1]
    return {
        "config": {"dim": DIM, "heads": HEADS, "dim_head": DIM_HEAD, "batch": BATCH, "dtype": "float32"},
        "attention": attention,
        "decoding": decode,
        "ratios": {
            f"attention_speedup_seq{longest['seq_len']}": longest["speedup"],
            f"attention_memory_ratio_seq{longest['seq_len']}": longest["memory_ratio"],
            f"decode_{decode['tokens']}_cached_speedup": decode["speedup"],
        },
        "targets": {"attention_speedup_seq4096": 1.3, "attention_memory_ratio_seq4096": 4.0, "decode_speedup": 10.0},
    }
