"""Genie's numbers under stable names, and the figures of its demo.

- ``recon_psnr``: PSNR of the tokenizer's reconstructions of held-out frames.
- ``val_loss`` / ``val_token_accuracy``: the dynamics objective on held-out clips (teacher forced;
  maskgit with masks drawn from a fixed seed, so two evaluations see the same masks).
- ``rollout_psnr_k``: PSNR of ``k`` open-loop imagined frames against the real ones, the model given
  ``context`` real frames and then the real actions (greedy decoding), averaged over the ``k`` frames.
- ``delta_psnr``: the Genie paper's controllability, ``rollout_psnr_k`` minus the same with uniformly
  random actions; above 0 means the actions steer the imagined world the way they steered the real one.
- ``latent_action_nmi``: normalized mutual information of latent actions and true ones.

Shape glossary: ``b`` clips, ``t`` frames, ``c``/``h``/``w`` image channels/height/width, ``r``/``s``
token rows/columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quintet.genie.convs import psnr
from quintet.genie.dynamics import Genie
from quintet.genie.generation import imagine
from quintet.genie.latent_actions import normalized_mutual_information
from quintet.genie.objectives import ClipBatch, dynamics_loss, training_choices


@torch.no_grad()
def tokenizer_metrics(tokenizer, frames: torch.Tensor, *, batch_size: int = 64) -> dict[str, float]:
    """``recon_psnr`` (dB) and code use over held-out ``frames (b, t, c, h, w)`` uint8."""
    device = next(tokenizer.parameters()).device
    errors, used = [], torch.zeros(tokenizer.config.codebook_size, dtype=torch.bool)
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size].to(device)
        tokens = tokenizer.encode(chunk)
        used[tokens.flatten().cpu()] = True
        errors.append((tokenizer.decode(tokens) - chunk.float() / 255).pow(2).flatten(1).mean(1).cpu())
    mse = torch.cat(errors).mean()
    return {
        "recon_psnr": float(10 * torch.log10(1 / mse.clamp_min(1e-10))),
        "codebook_usage": float(used.float().mean()),
    }


@torch.no_grad()
def latent_action_metrics(model, frames: torch.Tensor, actions: torch.Tensor) -> dict[str, float]:
    """``latent_action_nmi`` of the codes of ``frames (b, t, c, h, w)`` against the true ``actions (b, t-1)``,
    and the decoder's next-frame ``lam_psnr``."""
    device = next(model.parameters()).device
    out = model(frames.to(device))
    nmi = normalized_mutual_information(actions.numpy(), out.actions.cpu().numpy())
    used = len(np.unique(out.actions.cpu().numpy()))
    return {"latent_action_nmi": nmi, "lam_psnr": float(out.metrics["lam_psnr"]), "latent_actions_used": float(used)}


def eval_batch(model: Genie, tokens: torch.Tensor, actions: torch.Tensor | None, *, seed: int = 0) -> ClipBatch:
    """A held-out batch with its random choices (masks) drawn from ``seed``: the same at every evaluation."""
    generator = torch.Generator().manual_seed(seed)
    token_mask, _ = training_choices(model.config, tokens.shape[0], tokens.shape[1], generator=generator)
    return ClipBatch(tokens=tokens, actions=actions, token_mask=token_mask)


@torch.no_grad()
def dynamics_metrics(model: Genie, batch: ClipBatch, *, batch_size: int = 32) -> dict[str, float]:
    """``val_loss`` and ``val_token_accuracy`` of the dynamics objective on ``batch`` (no action hidden)."""
    device = next(model.parameters()).device
    losses, accuracies, weights = [], [], []
    for start in range(0, batch.tokens.shape[0], batch_size):
        part = slice(start, start + batch_size)
        chunk = ClipBatch(
            tokens=batch.tokens[part].to(device),
            actions=None if batch.actions is None else batch.actions[part].to(device),
            token_mask=None if batch.token_mask is None else batch.token_mask[part].to(device),
        )
        _, metrics = dynamics_loss(model, model.config, chunk)
        count = chunk.token_mask.sum() if chunk.token_mask is not None else chunk.tokens[:, 1:].numel()
        losses.append(float(metrics["token_loss"]) * float(count))
        accuracies.append(float(metrics["token_accuracy"]) * float(count))
        weights.append(float(count))
    total = sum(weights)
    return {"val_loss": sum(losses) / total, "val_token_accuracy": sum(accuracies) / total}


@dataclass
class Rollouts:
    """Open-loop rollouts of held-out clips: real frames and what the model imagined."""

    real: torch.Tensor
    """``(b, context + k, c, h, w)`` float in [0, 1]"""
    imagined: torch.Tensor
    """``(b, k, c, h, w)`` under the real actions"""
    imagined_random: torch.Tensor | None
    """``(b, k, c, h, w)`` under uniformly random actions (None without actions)"""
    metrics: dict[str, float]


@torch.no_grad()
def rollout_metrics(
    model: Genie,
    tokenizer,
    frames: torch.Tensor,
    tokens: torch.Tensor,
    actions: torch.Tensor | None,
    *,
    context: int,
    choices: torch.Tensor | None = None,
    seed: int = 0,
    **sampling,
) -> Rollouts:
    """``rollout_psnr_k``, ``delta_psnr`` and the copy-last-frame baseline on clips ``frames (b, t, c, h, w)``
    uint8 with their ``tokens (b, t, r, s)`` and ``actions (b, t - 1)``; ``k = t - context``. Random actions
    are drawn uniformly from ``choices`` (the actions the data holds; default: every action id)."""
    device = next(model.parameters()).device
    k = tokens.shape[1] - context
    options = {"temperature": 0.0, **sampling}
    real = frames.float().div(255)
    tokens = tokens.to(device)

    def imagined_frames(chosen: torch.Tensor | None) -> torch.Tensor:
        new = imagine(model, tokens[:, :context], chosen, k, **options)
        history = torch.cat((tokens[:, :context], new), dim=1)  # temporal convs read the context too
        return tokenizer.decode(history, last=k).cpu()

    def mean_psnr(prediction: torch.Tensor) -> float:
        return float(psnr(prediction, real[:, context:], dims=(2, 3, 4)).mean())

    imagined = imagined_frames(None if actions is None else actions.to(device))
    metrics = {
        "rollout_psnr_k": mean_psnr(imagined),
        "copy_psnr_k": mean_psnr(real[:, context - 1 : context].expand_as(real[:, context:])),
    }
    imagined_random = None
    if actions is not None:
        generator = torch.Generator().manual_seed(seed)
        pool = torch.arange(model.config.num_actions) if choices is None else choices.cpu()
        random_actions = pool[torch.randint(0, len(pool), actions.shape, generator=generator)]
        random_actions[:, : context - 1] = actions[:, : context - 1]  # the same past; random from now on
        imagined_random = imagined_frames(random_actions.to(device))
        metrics["rollout_psnr_random"] = mean_psnr(imagined_random)
        metrics["delta_psnr"] = metrics["rollout_psnr_k"] - metrics["rollout_psnr_random"]
    return Rollouts(real=real, imagined=imagined, imagined_random=imagined_random, metrics=metrics)
