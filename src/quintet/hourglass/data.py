"""Byte-level language-model data for the hourglass and its flat baseline: batches, bits per byte, samples.

A batch is ``(b, n + 1)`` byte ids: the model reads ``[:, :-1]`` and predicts ``[:, 1:]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from quintet.core.validation import check_tensor
from quintet.data import ByteCorpus, decode, enwik8_corpus, stdlib_corpus, text_corpus


def load_corpus(data: str | None, *, enwik8: bool = False) -> ByteCorpus:
    """The embedded stdlib corpus (``data`` None or "stdlib"), a text file / folder, or enwik8."""
    if enwik8:
        if data is None:
            raise ValueError("data: the enwik8 preset needs the path of a downloaded enwik8 file (--data PATH)")
        return enwik8_corpus(data)
    if data is None or data == "stdlib":
        return stdlib_corpus()
    return text_corpus(data)


def lm_loss(module: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-byte cross entropy of ``batch (b, n + 1)``; also reported in bits per byte."""
    check_tensor(batch, "batch", ndim=2, dtype="int")
    if batch.shape[1] < 2:
        raise ValueError(f"batch: expected (b, n + 1) with n >= 1, got shape {tuple(batch.shape)}")
    logits = module(batch[:, :-1])
    loss = F.cross_entropy(rearrange(logits, "b n v -> (b n) v").float(), rearrange(batch[:, 1:], "b n -> (b n)"))
    return loss, {"bpb": loss.detach() / math.log(2)}


def _batch_seed(seed: int, index: int) -> int:
    return (seed * 0x9E3779B1 + index) % (2**63)


def train_batches(corpus: ByteCorpus, *, batch_size: int, seq_len: int, seed: int) -> Callable[[int], torch.Tensor]:
    """``train_batch(index)``: random training windows, a deterministic function of (seed, index)."""

    def train_batch(index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_batch_seed(seed, index))
        return corpus.random_windows("train", batch_size=batch_size, length=seq_len + 1, generator=generator)

    return train_batch


@torch.no_grad()
def bits_per_byte(
    model: nn.Module, corpus: ByteCorpus, *, seq_len: int, max_windows: int = 64, batch_size: int = 16
) -> dict[str, float]:
    """Mean next-byte loss over evenly spread validation windows: ``val_loss`` (nats) and ``val_bpb``."""
    windows = corpus.eval_windows("val", length=seq_len + 1, max_windows=max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for chunk in windows.split(batch_size):
            chunk = chunk.to(device)
            loss, _ = lm_loss(model, chunk)
            total += loss.item() * chunk.numel()
            count += chunk.numel()
    finally:
        model.train(was_training)
    val_loss = total / count
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2)}


def sample_text(
    model: nn.Module, corpus: ByteCorpus, *, prompt_len: int = 64, new_tokens: int = 256, seed: int = 0
) -> dict[str, Any]:
    """Continue the first ``prompt_len`` bytes of the validation split (temperature 0.8, top-k 40)."""
    prompt_len = min(prompt_len, model.config.max_seq_len // 4)
    new_tokens = min(new_tokens, model.config.max_seq_len - prompt_len)
    prompt = corpus.eval_windows("val", length=prompt_len, max_windows=1)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    continuation = model.generate(prompt.to(device), new_tokens, temperature=0.8, top_k=40, generator=generator)
    return {"prompt": decode(prompt[0]), "text": decode(prompt[0]) + decode(continuation[0].cpu())}
