"""What both priors over residual codes share: class labels (null class, class dropout, checks), the
code cross-entropy, the weight initialisation and the analytic FLOPs of a core transformer stack.

Shape glossary: ``b`` batch, ``h, w`` code grid, ``D`` codes per position, ``K`` codebook size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from quintet.core import ConditionedNorm
from quintet.core.validation import check_ids, check_int, check_number, check_tensor


def init_weights(model: nn.Module) -> None:
    """GPT-2 style initialisation (N(0, 0.02) linears and embeddings); FiLM projections stay zero, so a
    fresh conditioned norm is the plain norm."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    for module in model.modules():
        if isinstance(module, ConditionedNorm):
            nn.init.zeros_(module.to_scale_shift.weight)
            nn.init.zeros_(module.to_scale_shift.bias)


def check_codes(codes: object, config, name: str = "codes") -> torch.Tensor:
    """Integer codes ``(b, h, w, D)`` of the config's code grid, each in ``[0, K)``."""
    check_tensor(codes, name, ndim=4, dtype="int")
    if tuple(codes.shape[1:]) != tuple(config.code_shape) or codes.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (b, *code_shape={config.code_shape}), got {tuple(codes.shape)}")
    if not torch.compiler.is_compiling():
        check_ids(codes, name, config.codebook_size)
    return codes


def class_labels(
    class_ids: torch.Tensor | None, config, batch: int, device: torch.device, *, name: str = "class_ids"
) -> torch.Tensor | None:
    """Labels ``(b,)`` for the class embedding: ``class_ids``, or the null class (index ``num_classes``)
    when None; None for an unconditional model."""
    if config.num_classes == 0:
        if class_ids is not None:
            raise ValueError(f"{name}: this model is unconditional (num_classes=0); pass no class ids")
        return None
    if class_ids is None:
        return torch.full((batch,), config.num_classes, dtype=torch.long, device=device)
    check_tensor(class_ids, name, ndim=1, dtype="int")
    if class_ids.shape[0] != batch:
        raise ValueError(f"{name}: expected one class id per sample ({batch}), got shape {tuple(class_ids.shape)}")
    if not torch.compiler.is_compiling():
        check_ids(class_ids, name, config.num_classes)
    return class_ids.to(device=device, dtype=torch.long)


def drop_classes(labels: torch.Tensor | None, config, training: bool) -> torch.Tensor | None:
    """Classifier-free guidance training: each label becomes the null class with prob ``class_dropout``."""
    if labels is None or not training or config.class_dropout == 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < config.class_dropout
    return labels.masked_fill(drop, config.num_classes)


def sampling_labels(
    config, class_ids: torch.Tensor | None, batch_size: int | None, cfg_scale: float | None, device: torch.device
) -> tuple[torch.Tensor | None, int]:
    """Check the sampling arguments shared by both priors; labels ``(b,)`` (or None) and ``b``."""
    if (class_ids is None) == (batch_size is None):
        raise ValueError("class_ids: pass either class_ids (one sample per id) or batch_size, not both or neither")
    if batch_size is not None:
        check_int(batch_size, "batch_size", minimum=1)
        batch = batch_size
    else:
        check_tensor(class_ids, "class_ids", ndim=1, dtype="int")
        batch = class_ids.shape[0]
        if batch < 1:
            raise ValueError("class_ids: expected at least one class id")
    if cfg_scale is not None:
        check_number(cfg_scale, "cfg_scale", low=0.0)
        if config.num_classes == 0:
            raise ValueError("cfg_scale: classifier-free guidance needs a class-conditional model (num_classes=0)")
        if config.class_dropout == 0:
            raise ValueError(
                "cfg_scale: this model was trained without class dropout (class_dropout=0), so it has no "
                "unconditional branch to guide against"
            )
        if class_ids is None:
            raise ValueError("cfg_scale: guidance steers towards given classes; pass class_ids")
    return class_labels(class_ids, config, batch, device), batch


def guide(logits: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on logits of stacked [conditional; unconditional] rows:
    ``l_c + (s - 1) (l_c - l_u)``, written so that ``s = 1`` returns the conditional logits exactly."""
    if cfg_scale is None:
        return logits
    conditional, unconditional = logits.chunk(2)
    return conditional + (cfg_scale - 1.0) * (conditional - unconditional)


def code_cross_entropy(logits: torch.Tensor, codes: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over every code, in nats; no code id is ignored (code 0 is a code, not padding)."""
    return F.cross_entropy(
        rearrange(logits, "... k -> (...) k").float(),
        rearrange(codes, "... -> (...)"),
        label_smoothing=label_smoothing,
    )


def stack_flops(config, *, layers: int, tokens: int, context: int, dim_cond: int | None = None) -> float:
    """Forward matmul FLOPs of a core ``Transformer`` stack over ``tokens`` tokens in sequences of
    ``context`` tokens: 2 * in * out per token per linear; QK^T and AV 4 * n * n_ctx * inner (counted
    in full, causal or not, as the SDPA kernel and FlopCounterMode do); FiLM projections per sequence."""
    dim, inner = config.dim, config.heads * config.dim_head
    hidden = int(dim * config.ff_mult * 2 / 3)  # SwiGLU width (core.FeedForward)
    per_token = 2 * dim * 3 * inner + 2 * inner * dim + 2 * dim * 2 * hidden + 2 * hidden * dim
    attention = 4 * tokens * context * inner
    film = 0 if dim_cond is None else (2 * layers + 1) * 2 * dim_cond * 2 * dim * (tokens // context)
    return layers * (tokens * per_token + attention) + film
