"""Token sampling from logits: greedy, temperature, top-k, top-p (nucleus), min-p, gumbel-max.

All functions take logits ``(..., v)`` over a vocabulary of ``v`` and act on every leading row at
once. Random choices draw from an optional ``torch.Generator`` so that a seed reproduces samples.
Filters replace the logits of excluded tokens by ``-inf``.
"""

from __future__ import annotations

import torch

from quintet.core.validation import check_tensor

NEG_INF = float("-inf")


def _check_logits(logits: torch.Tensor) -> None:
    check_tensor(logits, "logits", dtype="float")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected (..., vocab) with vocab >= 1, got shape {tuple(logits.shape)}")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k: expected an integer >= 1, got {k!r}")
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (Holtzman et al. 2020)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {p!r}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # a token is dropped once the tokens ranked above it already hold mass p; the top token stays
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's (Nguyen et al. 2024)."""
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p: expected a value in [0, 1], got {min_p!r}")
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, NEG_INF)


def gumbel_noise(shape: torch.Size, *, device, generator: torch.Generator | None = None) -> torch.Tensor:
    uniform = torch.rand(shape, device=device, generator=generator)
    eps = torch.finfo(uniform.dtype).tiny
    exponential = (-torch.log(uniform.clamp_min(eps))).clamp_min(eps)
    return -torch.log(exponential)


def gumbel_sample(
    logits: torch.Tensor, *, temperature: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gumbel-max trick: ``argmax(logits / T + g)`` is a sample of ``softmax(logits / T)``."""
    _check_logits(logits)
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    noise = gumbel_noise(logits.shape, device=logits.device, generator=generator)
    return (logits.float() / temperature + noise).argmax(dim=-1)


def probabilities(logits: torch.Tensor, *, temperature: float = 1.0, log: bool = False) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last axis in float32 (``log=True``: its log).

    Systems read token probabilities through here (MaskGIT confidences, classifier scores, guidance),
    so every probability in the library is computed one way.
    """
    _check_logits(logits)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    scaled = logits.float() / temperature
    return scaled.log_softmax(dim=-1) if log else scaled.softmax(dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    _check_logits(logits)
    return logits.argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row of ``logits (..., v)`` -> ``(...)``; ``temperature=0`` is greedy.

    Filters apply in the order top-k, top-p, min-p, on temperature-scaled logits.
    """
    _check_logits(logits)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    if min_p is not None:
        logits = filter_min_p(logits, min_p)
    return gumbel_sample(logits, temperature=1.0, generator=generator)
