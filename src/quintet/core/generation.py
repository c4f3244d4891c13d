"""Autoregressive token generation for any causal LM of the library.

The model takes ``model(ids) -> logits (b, n, v)``, decodes incrementally with
``model(ids, cache=model.new_cache())``, and has ``config.num_tokens`` / ``config.max_seq_len``.
With ``use_cache=True`` the prompt is read in one parallel pass that fills the model's caches, then
each step feeds one token; without, every step recomputes the whole sequence (the benchmark's
reference). Both give the same tokens for the same seed.
"""

from __future__ import annotations

import torch
from torch import nn

from quintet.core.sampling import sample
from quintet.core.validation import check_ids, check_tensor


def check_token_ids(ids: object, name: str) -> None:
    """A 2-D tensor of integer ids; a float or bool tensor is a ValueError naming ``name``."""
    check_tensor(ids, name, ndim=2)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer token ids, got dtype {ids.dtype}")


def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` after ``prompt (b, n)`` from ``model``; returns ``(b, max_new_tokens)``.

    ``model(ids) -> logits`` and ``model(ids, cache=model.new_cache())`` decode incrementally.
    """
    config = model.config
    check_token_ids(prompt, "prompt")
    if prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt: expected at least one token per row, got shape {tuple(prompt.shape)}")
    check_ids(prompt, "prompt", config.num_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    if prompt.shape[1] + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompt: {prompt.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} exceed "
            f"max_seq_len={config.max_seq_len}"
        )
    if not getattr(config, "causal", True):
        raise ValueError("model: a non-causal model cannot generate")
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids, new_tokens = prompt, []
            cache = model.new_cache() if use_cache else None
            logits = model(prompt, cache=cache)[:, -1] if use_cache else model(prompt)[:, -1]
            for step in range(max_new_tokens):
                token = sample(logits, **options)[:, None]
                new_tokens.append(token)
                if step + 1 == max_new_tokens:
                    break
                if use_cache:
                    logits = model(token, cache=cache)[:, -1]
                else:
                    ids = torch.cat((ids, token), dim=1)
                    logits = model(ids)[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(new_tokens, dim=1)
