"""The optimizer and learning-rate schedule every run uses: AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from quintet.training.task import TrainSettings


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, settings: TrainSettings, *, fused: bool) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters; ``fused`` picks the fused CUDA kernel (else foreach)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            # nanoGPT's rule: matrices and embeddings decay, biases and norm gains do not
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("task.model: has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, **kernel)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, warmup_steps=settings.warmup_steps, total_steps=settings.steps, min_lr_ratio=settings.min_lr_ratio
        ),
    )
