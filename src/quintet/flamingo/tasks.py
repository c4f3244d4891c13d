"""The Flamingo system's training tasks, one per stage, on the embedded few-shot task.

- ``vision``: the image encoder with a linear head learns the image set's classes (Flamingo's encoder
  is pre-trained before Flamingo freezes it; here a classifier stands in for the paper's contrastive
  pre-training).
- ``lm``: the causal LM learns text episodes where concept tokens stand for the images
  (``<concept:circle> dax <|endofchunk|> ...``): it learns to read few-shot prompts from text alone.
- ``flamingo``: both frozen, the resampler and the gated cross-attention learn from image episodes,
  where only the images tell which earlier word names the query.

Losses are next-token cross-entropy over the text; ``<image>`` tokens are never targets (no model
could predict where a document places its images), as in OpenFlamingo.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from quintet.core.validation import check_int, check_number
from quintet.data.images import ImageSet, load_images, save_image_grid
from quintet.flamingo.data import (
    FIRST_WORD,
    IMAGE,
    EpisodeBatch,
    FewShotEpisodes,
    choose,
    decode,
)
from quintet.training.trainer import move_to_device

EVAL_SEED = 20_220_429
"""held-out episodes are drawn from this seed (the same for every run): val-split images only"""


@dataclass(frozen=True, kw_only=True)
class FlamingoRecipe:
    """The Flamingo presets' own settings: the few-shot task, its evaluation, the data."""

    ways: int = 4
    """classes per episode; 0 shots is chance: 1 / ways"""
    examples: int = 12
    """captioned images per training episode"""
    shots: tuple[int, ...] = (0, 1, 2, 4, 8)
    """shot counts evaluated (``fewshot_accuracy_k``)"""
    eval_episodes: int = 200
    """held-out episodes per shot count"""
    val_episodes: int = 64
    """held-out training-format episodes for ``val_loss``"""
    image_size: int = 32
    train_images: int = 10_000
    """images of the embedded shapes set's train split (its val split has a tenth)"""
    demo_prompts: int = 4
    """prompts with the model's answers in the demo report"""
    caption_pairs: int = 32
    """captioned single images per Flamingo training batch, beside the episodes (0: episodes only)"""
    caption_weight: float = 1.0
    """weight of the captions' loss (the paper weights each data set's loss)"""

    def __post_init__(self) -> None:
        for name in ("ways", "examples", "eval_episodes", "val_episodes", "image_size", "train_images", "demo_prompts"):
            check_int(getattr(self, name), name, minimum=2 if name == "ways" else 1)
        check_int(self.caption_pairs, "caption_pairs", minimum=0)
        check_number(self.caption_weight, "caption_weight", low=0.0)
        if not isinstance(self.shots, tuple) or not self.shots:
            raise ValueError(f"shots: expected a non-empty tuple of shot counts, got {self.shots!r}")
        for shots in self.shots:
            check_int(shots, "shots", minimum=0)


def image_set(data: str | None, recipe: FlamingoRecipe) -> ImageSet:
    """The embedded shapes (``data`` None) or a user's class folders, at the recipe's image size."""
    if data is None:
        return load_images(
            image_size=recipe.image_size, train_size=recipe.train_images, val_size=recipe.train_images // 10
        )
    return load_images(data, image_size=recipe.image_size)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _seeded(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index) % (2**63))


# ---------------------------------------------------------------------------------------------- losses


def episode_loss(module: nn.Module, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy of ``batch`` (``<image>`` targets left out); also on label words alone."""
    logits = module(batch.ids[:, :-1], **batch.media())
    targets = batch.ids[:, 1:]
    per_token = F.cross_entropy(rearrange(logits.float(), "b n v -> b v n"), targets, reduction="none")
    counted = (targets != IMAGE).to(per_token.dtype)
    words = (targets >= FIRST_WORD).to(per_token.dtype)
    loss = (per_token * counted).sum() / counted.sum()
    word_loss = (per_token * words).sum() / words.sum().clamp_min(1)
    return loss, {"word_loss": word_loss.detach()}


@dataclass(frozen=True)
class TrainingMixture:
    """A Flamingo training batch: interleaved few-shot episodes and captioned single images (the paper
    mixes interleaved web pages with image-text pairs; the pairs teach what an image shows in the
    language model's own words, the episodes teach reading a prompt)."""

    episodes: EpisodeBatch
    captions: EpisodeBatch | None = None


def mixture_loss(module: nn.Module, batch: TrainingMixture, *, caption_weight: float = 1.0):
    """``episode loss + caption_weight * caption loss``; the two are also reported on their own."""
    loss, metrics = episode_loss(module, batch.episodes)
    if batch.captions is None:
        return loss, metrics
    caption_loss, _ = episode_loss(module, batch.captions)
    metrics = {**metrics, "episode_loss": loss.detach(), "caption_loss": caption_loss.detach()}
    return loss + caption_weight * caption_loss, metrics


def classifier_loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    images, labels = batch
    logits = module(images)
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return F.cross_entropy(logits.float(), labels), {"accuracy": accuracy.detach()}


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def fewshot_accuracy(
    model: nn.Module, episodes: FewShotEpisodes, recipe: FlamingoRecipe, *, text_only: bool = False, chunk: int = 100
) -> dict[str, float]:
    """``{prefix}fewshot_accuracy_k``: share of held-out prompts with ``k`` examples whose query the model
    names right, choosing among the episode's ``ways`` words (``text_only``: concept tokens, LM alone)."""
    device, prefix = _device(model), "text_" if text_only else ""
    was_training = model.training
    model.eval()
    try:
        results = {}
        for shots in recipe.shots:
            generator = _seeded(EVAL_SEED, shots)
            correct, total = 0, 0
            for start in range(0, recipe.eval_episodes, chunk):
                size = min(chunk, recipe.eval_episodes - start)
                prompts = episodes.prompts(
                    "val", batch_size=size, shots=shots, generator=generator, text_only=text_only
                )
                batch = move_to_device(prompts.batch, device)
                logits = model(batch.ids, **batch.media())[:, -1]
                correct += int((choose(logits, prompts.candidates.to(device)) == prompts.answers.to(device)).sum())
                total += size
            results[f"{prefix}fewshot_accuracy_{shots}"] = correct / total
        return results
    finally:
        model.train(was_training)


@torch.no_grad()
def validation_loss(
    model: nn.Module, episodes: FewShotEpisodes, recipe: FlamingoRecipe, *, text_only: bool, chunk: int = 32
) -> dict[str, float]:
    """Mean ``val_loss`` (nats per predicted token) and ``val_word_loss`` over held-out episodes."""
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        generator = _seeded(EVAL_SEED, -1)
        losses, word_losses, count = 0.0, 0.0, 0
        for start in range(0, recipe.val_episodes, chunk):
            size = min(chunk, recipe.val_episodes - start)
            batch = episodes.sample(
                "val", batch_size=size, examples=recipe.examples, generator=generator, text_only=text_only
            )
            loss, metrics = episode_loss(model, move_to_device(batch, device))
            losses += float(loss) * size
            word_losses += float(metrics["word_loss"]) * size
            count += size
        return {"val_loss": losses / count, "val_word_loss": word_losses / count}
    finally:
        model.train(was_training)


@torch.no_grad()
def classifier_metrics(model: nn.Module, images: ImageSet, *, chunk: int = 500) -> dict[str, float]:
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        loss, correct = 0.0, 0
        for pixels, labels in images.batches("val", chunk):
            logits = model(pixels.to(device))
            loss += float(F.cross_entropy(logits.float(), labels.to(device), reduction="sum"))
            correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
        total = images.count("val")
        return {"val_loss": loss / total, "val_accuracy": correct / total}
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------- media & samples


class FeatureBank:
    """A frozen encoder's features of every image of a set, computed once, the first time they are asked for:
    a training step then runs no encoder (the encoder is frozen, so its features never change)."""

    def __init__(self, encoder: nn.Module, images: ImageSet, *, chunk: int = 500):
        self.encoder, self.images, self.chunk = encoder, images, chunk
        self._features: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _split(self, split: str) -> torch.Tensor:
        if split not in self._features:
            device = _device(self.encoder)
            was_training = self.encoder.training
            self.encoder.eval()
            parts = [self.encoder(pixels.to(device)).cpu() for pixels, _ in self.images.batches(split, self.chunk)]
            self.encoder.train(was_training)
            self._features[split] = torch.cat(parts)
        return self._features[split]

    def __call__(self, split: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"vision_features": (b, e, 1, p, d)}`` of the images at ``index (b, e)``."""
        return {"vision_features": self._split(split)[index][:, :, None]}


@torch.no_grad()
def answer_prompts(
    model: nn.Module,
    episodes: FewShotEpisodes,
    recipe: FlamingoRecipe,
    path: Path,
    *,
    shots: int,
    seed: int = 0,
) -> dict[str, Any]:
    """A few held-out prompts of ``shots`` examples with the model's greedy answers; the prompts'
    images as one grid (a row per prompt, the query last) at ``path``."""
    count = recipe.demo_prompts
    prompts = episodes.prompts("val", batch_size=count, shots=shots, generator=_seeded(EVAL_SEED + 1, seed))
    batch = move_to_device(prompts.batch, _device(model))
    answers = model.generate(batch.ids, 2, temperature=0.0, **batch.media())[:, 0].cpu()
    pixels, _ = episodes.images.batch("val", prompts.image_index.flatten())
    save_image_grid(pixels, path, nrow=shots + 1)
    lines, right = [], 0
    for row in range(count):
        captions = decode(prompts.batch.ids[row, 1:-1]).replace(" <|endofchunk|>", ",").replace("<image> ", "")
        truth, said = decode([int(prompts.answers[row])]), decode([int(answers[row])])
        right += said == truth
        mark = "right" if said == truth else f"wrong, it is {truth!r}"
        lines.append(f"row {row + 1}: {captions} query -> model says {said!r} ({mark})")
    return {"images": [str(path)], "text": "\n".join(lines), "right": right, "count": count}


def lazy(factory: Callable[[], Any]) -> Callable[[], Any]:
    """``factory`` called on first use only (make_task stays cheap: no data until a batch is asked for)."""
    return functools.cache(factory)
