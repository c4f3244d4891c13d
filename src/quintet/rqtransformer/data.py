"""Images in, codes out: the training batches, evaluations and figures of the two stages.

- tokenizer stage: batches of images; ``recon_psnr`` / ``codebook_usage`` on validation images.
- prior stage: batches of ``(codes, class ids)``, the codes of training images under the frozen
  tokenizer, each image encoded once, the first time a batch draws it (:class:`CodeCache`);
  ``val_loss`` in nats per code and ``sample_class_accuracy`` (a classifier trained on the real
  images judges class-conditional samples).

Shape glossary: ``b`` batch, ``H, W`` image size, ``h, w`` code grid, ``D`` depth, ``n`` images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from quintet.core.validation import check_tensor
from quintet.data.images import ImageSet, image_folder, save_image_grid, shapes_dataset
from quintet.rqtransformer.classifier import ImageClassifier
from quintet.rqtransformer.config import FlatCodeLMConfig
from quintet.rqtransformer.flat import FlatCodeLM, code_sequence
from quintet.rqtransformer.model import RQTransformer
from quintet.rqtransformer.presets import RQRecipe
from quintet.rqtransformer.prior import code_cross_entropy
from quintet.rqtransformer.rqvae import RQVAE, psnr_from_mse

Prior = RQTransformer | FlatCodeLM


def load_image_set(data: str | None, recipe: RQRecipe) -> ImageSet:
    """The embedded shapes (``data`` None) or a user's image folder, at the recipe's image size."""
    if data is None:
        return shapes_dataset(image_size=recipe.image_size, train_size=recipe.shapes_train, val_size=recipe.shapes_val)
    return image_folder(data, image_size=recipe.image_size)


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of micro-batch ``index``: a deterministic function of (seed, index)."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index) % (2**63))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- tokenizer stage


def image_batches(images: Callable[[], ImageSet], *, batch_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """``train_batch(index) -> images (b, 3, H, W)`` drawn uniformly from the training split."""

    def train_batch(index: int) -> torch.Tensor:
        return images().random_batch("train", batch_size, batch_generator(seed, index))[0]

    return train_batch


@torch.no_grad()
def tokenizer_metrics(model: RQVAE, images: ImageSet, *, count: int, batch_size: int = 128) -> dict[str, float]:
    """On the first ``count`` validation images: ``recon_psnr`` (mean per-image PSNR in dB with all D codes),
    ``recon_psnr_depth1`` (the first code only), ``codebook_usage`` (share of the K codes used)."""
    count = min(count, images.count("val"))
    psnr, coarse, used = [], [], torch.zeros(model.config.codebook_size, dtype=torch.bool)
    for start in range(0, count, batch_size):
        pixels, _ = images.batch("val", np.arange(start, min(start + batch_size, count)))
        pixels = pixels.to(_device(model))
        codes = model.encode(pixels)
        used[codes.flatten().cpu()] = True
        for depth, scores in ((model.config.depth, psnr), (1, coarse)):
            mse = (model.decode(codes, depth=depth) - pixels).pow(2).flatten(1).mean(1)
            scores.append(psnr_from_mse(mse).cpu())
    return {
        "recon_psnr": float(torch.cat(psnr).mean()),
        "recon_psnr_depth1": float(torch.cat(coarse).mean()),
        "codebook_usage": float(used.float().mean()),
    }


@torch.no_grad()
def reconstruction_grid(model: RQVAE, images: ImageSet, path: Path, *, columns: int = 10) -> Path:
    """Real validation images (top row) above their reconstructions from the first 1, 2, .., D codes."""
    labels = images.split("val")[1]
    # one image per class first, so every class shows; then the next images in order
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(images.num_classes) if (labels == c).any()]
    order = (firsts + [i for i in range(len(labels)) if i not in set(firsts)])[:columns]
    pixels, _ = images.batch("val", np.array(order))
    pixels = pixels.to(_device(model))
    codes = model.encode(pixels)
    rows = [pixels] + [model.decode(codes, depth=d) for d in range(1, model.config.depth + 1)]
    return save_image_grid(torch.cat(rows).cpu(), path, nrow=len(order))


# --------------------------------------------------------------------------- prior stage


class CodeCache:
    """The codes ``(n, h, w, D)`` of one split under a frozen tokenizer, each image encoded once, when a
    batch first asks for it (so the prior pays only for the images it sees, and never twice)."""

    def __init__(self, tokenizer: RQVAE, images: ImageSet, split: str, *, chunk: int = 256):
        self.tokenizer, self.images, self.split, self.chunk = tokenizer, images, split, chunk
        count = images.count(split)
        f = tokenizer.config.downsampling
        shape = (images.image_size // f, images.image_size // f, tokenizer.config.depth)
        dtype = torch.int16 if tokenizer.config.codebook_size <= 2**15 else torch.int32
        self.codes = torch.zeros(count, *shape, dtype=dtype)
        self.known = torch.zeros(count, dtype=torch.bool)
        self.labels = torch.from_numpy(np.array(images.split(split)[1], dtype=np.int64))

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes (b, h, w, D) int64, labels (b,))`` of the images at ``indices``."""
        missing = indices[~self.known[indices]].unique()
        for part in missing.split(self.chunk) if missing.numel() else ():
            pixels, _ = self.images.batch(self.split, part)
            self.codes[part] = self.tokenizer.encode(pixels.to(_device(self.tokenizer))).cpu().to(self.codes.dtype)
            self.known[part] = True
        return self.codes[indices].long(), self.labels[indices]


def code_batches(codes: Callable[[], CodeCache], *, batch_size: int, seed: int):
    """``train_batch(index) -> (codes, labels)`` of training images drawn uniformly."""

    def train_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = codes()
        indices = torch.randint(0, len(cache.known), (batch_size,), generator=batch_generator(seed, index))
        return cache(indices)

    return train_batch


def prior_logits(module: torch.nn.Module, config, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits ``(b, h, w, D, K)`` of either prior through ``module`` (maybe a DDP/compiled
    wrapper: called, never reached into)."""
    labels = labels if config.num_classes else None
    if isinstance(config, FlatCodeLMConfig):  # read [start, codes in raster-depth order], predict the codes
        ids = code_sequence(config, codes, labels)
        h, w, d = config.code_shape
        return rearrange(module(ids[:, :-1]), "b (h w d) k -> b h w d k", h=h, w=w, d=d)
    return module(codes, labels)


def prior_loss(config) -> Callable:
    """The task loss of a prior: cross-entropy over every code, in nats per code."""

    def loss(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        codes, labels = batch
        check_tensor(codes, "codes", ndim=4, dtype="int")
        value = code_cross_entropy(
            prior_logits(module, config, codes, labels), codes, label_smoothing=config.label_smoothing
        )
        return value, {}

    return loss


@torch.no_grad()
def val_loss(model: Prior, codes: CodeCache, *, count: int, batch_size: int = 64) -> float:
    """Mean cross-entropy of the first ``count`` validation images' codes, nats per code (no smoothing)."""
    count = min(count, len(codes.known))
    total = 0.0
    for start in range(0, count, batch_size):
        batch_codes, labels = codes(torch.arange(start, min(start + batch_size, count)))
        device = _device(model)
        logits = prior_logits(model, model.config, batch_codes.to(device), labels.to(device))
        total += float(code_cross_entropy(logits, batch_codes.to(device))) * len(labels)
    return total / count


def sample_classes(num_classes: int, per_class: int, *, limit: int | None = None) -> torch.Tensor:
    """Class ids ``(c * per_class,)``: ``per_class`` of each of the first ``limit`` classes, class-major."""
    shown = num_classes if limit is None else min(limit, num_classes)
    return torch.arange(shown).repeat_interleave(per_class)


@torch.no_grad()
def sample_images(
    prior: Prior,
    tokenizer: RQVAE,
    class_ids: torch.Tensor | None,
    recipe: RQRecipe,
    *,
    seed: int,
    batch_size: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Images ``(b, 3, H, W)`` sampled for ``class_ids`` (or ``batch_size`` unconditional ones) with the
    recipe's sampling settings, decoded by the tokenizer."""
    device = _device(prior)
    generator = torch.Generator(device=device).manual_seed(seed)
    options = dict(temperature=recipe.temperature, top_k=recipe.top_k, top_p=recipe.top_p, generator=generator)
    if isinstance(prior, RQTransformer) and recipe.cfg_scale is not None and prior.config.guidable:
        options["cfg_scale"] = recipe.cfg_scale
    class_ids = class_ids.to(device) if class_ids is not None else None
    codes = prior.generate(class_ids, batch_size=batch_size, use_cache=use_cache, **options)
    return tokenizer.decode(codes.to(_device(tokenizer)))


@torch.no_grad()
def sample_class_accuracy(
    prior: Prior, tokenizer: RQVAE, classifier: ImageClassifier, recipe: RQRecipe, *, seed: int
) -> float:
    """Share of ``samples_per_class`` generated images per class that the classifier assigns to their class."""
    class_ids = sample_classes(prior.config.num_classes, recipe.samples_per_class)
    predicted = classifier.predict(sample_images(prior, tokenizer, class_ids, recipe, seed=seed).cpu())
    return float((predicted == class_ids).float().mean())


@torch.no_grad()
def reconstruction_class_accuracy(
    tokenizer: RQVAE, classifier: ImageClassifier, images: ImageSet, *, count: int, batch_size: int = 128
) -> float:
    """Share of the first ``count`` validation images whose reconstructions (all D codes) the classifier
    assigns to their class: the most ``sample_class_accuracy`` can reach through this tokenizer."""
    count = min(count, images.count("val"))
    correct = 0
    for start in range(0, count, batch_size):
        pixels, labels = images.batch("val", np.arange(start, min(start + batch_size, count)))
        rebuilt = tokenizer.decode(tokenizer.encode(pixels.to(_device(tokenizer))))
        correct += int((classifier.predict(rebuilt.cpu()) == labels).sum())
    return correct / count


def sample_grid(
    prior: Prior, tokenizer: RQVAE, recipe: RQRecipe, path: Path, *, seed: int
) -> tuple[Path, torch.Tensor | None]:
    """A grid of samples, a row per class (``grid_per_class`` each); unconditional priors fill rows of 8.
    Returns the path and the class ids sampled (None when unconditional)."""
    if prior.config.num_classes:
        class_ids = sample_classes(prior.config.num_classes, recipe.grid_per_class, limit=recipe.grid_classes)
        images = sample_images(prior, tokenizer, class_ids, recipe, seed=seed)
        return save_image_grid(images.cpu(), path, nrow=recipe.grid_per_class), class_ids
    images = sample_images(prior, tokenizer, None, recipe, seed=seed, batch_size=4 * recipe.grid_per_class)
    return save_image_grid(images.cpu(), path, nrow=recipe.grid_per_class), None


def sampling_seconds_per_image(prior: Prior, class_ids: torch.Tensor, *, use_cache: bool, repeats: int = 1) -> float:
    """Wall-clock seconds per image of sampling codes for ``class_ids`` (best of ``repeats``)."""
    device = _device(prior)
    best = math.inf
    for _ in range(repeats):
        generator = torch.Generator(device=device).manual_seed(0)
        start = time.perf_counter()
        prior.generate(class_ids.to(device), generator=generator, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best / len(class_ids)
