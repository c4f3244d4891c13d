"""The training objectives of the dynamics model: a batch of clips, its random choices, the loss.

Shape glossary: ``b`` batch, ``t`` frames, ``r``/``c`` token rows/columns, ``S`` tokens per frame,
``A`` actions, ``K`` max keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from quintet.genie.config import GenieConfig
from quintet.genie.dynamics import NO_KEY


@dataclass
class ClipBatch:
    """One training micro-batch of token clips, with the random choices of its step drawn in advance
    (so that a batch is a deterministic function of its index: exact resume)."""

    tokens: torch.Tensor
    """``(b, t, r, c)`` frame tokens"""
    actions: torch.Tensor | None = None
    """``(b, t - 1)`` or ``(b, t - 1, K)``: ``actions[:, i]`` was taken after frame ``i``"""
    lengths: torch.Tensor | None = None
    """``(b,)`` real frames per clip (the rest is padding)"""
    token_mask: torch.Tensor | None = None
    """``(b, t - 1, r, c)`` maskgit only: True = token hidden from the masked copy (and predicted)"""
    hide_actions: torch.Tensor | None = None
    """``(b, t - 1)``: True = the model sees "no action" for this step"""


def training_choices(
    config: GenieConfig, batch: int, frames: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Draw one step's ``(token_mask, hide_actions)`` for clips of ``frames`` frames.

    MaskGIT masks ``ceil(S * cos(pi/2 * u))`` tokens of each predicted frame, ``u ~ U(0, 1)`` (the
    cosine schedule parallel decoding follows); each action is hidden with ``config.action_dropout``.
    """
    token_mask = hide_actions = None
    S = config.tokens_per_frame
    if config.objective == "maskgit":
        u = torch.rand(batch, frames - 1, generator=generator)
        count = torch.ceil(S * torch.cos(math.pi / 2 * u)).clamp(1, S)  # MaskGIT's cosine masking ratio
        ranks = torch.rand(batch, frames - 1, S, generator=generator).argsort(dim=-1).argsort(dim=-1)
        token_mask = rearrange(ranks < count[..., None], "b t (r c) -> b t r c", r=config.token_grid[0])
    if config.has_actions and config.action_dropout:
        hide_actions = torch.rand(batch, frames - 1, generator=generator) < config.action_dropout
    return token_mask, hide_actions


def dynamics_loss(module: nn.Module, config: GenieConfig, batch: ClipBatch) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the predicted tokens (maskgit: the masked ones) of frames ``1 .. t-1`` of real
    clips, plus ``action_loss_weight`` x the action head's loss on steps whose action was hidden."""
    out = module(
        batch.tokens,
        batch.actions,
        lengths=batch.lengths,
        token_mask=batch.token_mask,
        hide_actions=batch.hide_actions,
    )
    b, t = batch.tokens.shape[:2]
    targets = batch.tokens[:, 1:]
    weight = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
    if batch.lengths is not None:
        real_frame = torch.arange(1, t, device=targets.device)[None, :] < batch.lengths[:, None]  # (b, t - 1)
        weight = weight & real_frame[:, :, None, None]
    if batch.token_mask is not None:  # maskgit: only hidden tokens are predicted (none given: all hidden)
        weight = weight & batch.token_mask
    weight = weight.float()
    denominator = weight.sum().clamp_min(1.0)
    ce = F.cross_entropy(out.logits.flatten(0, -2).float(), targets.flatten(), reduction="none").view_as(weight)
    correct = (out.logits.argmax(dim=-1) == targets).float()
    metrics = {
        "token_loss": ((ce * weight).sum() / denominator).detach(),  # plain mean: comparable across weights
        "token_accuracy": ((correct * weight).sum() / denominator).detach(),
    }
    if config.changed_token_weight != 1.0:
        changed = targets != batch.tokens[:, :-1]  # moved since the frame before
        weight = weight * torch.where(changed, config.changed_token_weight, 1.0)
    token_loss = (ce * weight).sum() / weight.sum().clamp_min(1e-6)
    loss = token_loss
    if out.action_logits is not None and batch.actions is not None and batch.hide_actions is not None:
        steps = batch.hide_actions
        if batch.lengths is not None:
            steps = steps & (torch.arange(1, t, device=steps.device)[None, :] < batch.lengths[:, None])
        steps = steps.float()
        actions = batch.actions[:, : t - 1]
        if config.max_keys == 1:
            per_step = F.cross_entropy(out.action_logits.flatten(0, 1).float(), actions.flatten(), reduction="none")
            hit = (out.action_logits.argmax(dim=-1) == actions).float().flatten()
        else:
            # a set of keys: one independent "pressed?" decision per key
            pressed = key_sets_to_multi_hot(actions, config.num_actions)
            logits = out.action_logits.float()
            per_step = F.binary_cross_entropy_with_logits(logits, pressed, reduction="none").mean(-1).flatten()
            hit = ((logits > 0) == pressed.bool()).all(-1).float().flatten()
        count = steps.sum().clamp_min(1.0)
        action_loss = (per_step * steps.flatten()).sum() / count
        metrics["action_loss"] = action_loss.detach()
        metrics["action_accuracy"] = ((hit * steps.flatten()).sum() / count).detach()
        loss = loss + config.action_loss_weight * action_loss
    return loss, metrics


def key_sets_to_multi_hot(actions: torch.Tensor, num_actions: int) -> torch.Tensor:
    """``(..., K)`` key sets padded with -1 -> ``(..., num_actions)`` float 0/1 "pressed" flags."""
    pressed = actions != NO_KEY
    flags = torch.zeros(*actions.shape[:-1], num_actions + 1, device=actions.device)
    flags.scatter_(-1, torch.where(pressed, actions, num_actions), 1.0)  # padding lands in a spare column
    return flags[..., :num_actions]
