"""The judge of class-conditional samples: a small CNN trained once on the real training images.

``sample_class_accuracy`` is the share of generated images this classifier assigns to the class they
were sampled for; it only means something when the classifier's own validation accuracy (reported
beside it) is high. The classifier is trained once per image set and cached under
``quintet.data.cache_dir()`` (keyed by a fingerprint of the images, the config and the recipe), so
every demo, evaluation and test after the first loads it.

Shape glossary: ``b`` batch, ``H, W`` image size, ``n`` classes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quintet.core import PretrainedModel
from quintet.core.config import CheckpointError, config_to_dict
from quintet.core.io import atomic_write_text, cache_dir
from quintet.core.validation import check_int, check_tensor
from quintet.data.images import ImageSet

CLASSIFIER_VERSION = 1
"""bump when the classifier or its training changes: cached classifiers of another version are not reused"""
_ACCURACY_FILE = "val_accuracy.json"


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    num_classes: int
    image_size: int
    width: int = 32
    """channels of the first level; each level below doubles them (at most 256)"""

    def __post_init__(self) -> None:
        check_int(self.num_classes, "num_classes", minimum=2)
        check_int(self.image_size, "image_size", minimum=8)
        check_int(self.width, "width", minimum=1)

    @property
    def levels(self) -> int:
        """Conv levels, each halving the resolution, down to about 4 x 4."""
        return max(1, int(math.log2(self.image_size / 4)))


class ImageClassifier(PretrainedModel):
    """``model(images (b, 3, H, W) in [0, 1]) -> logits (b, n)``: conv levels of (conv, norm, SiLU) x 2,
    max-pooled, then a global average and a linear layer."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        width_in = 3
        for level in range(config.levels):
            width = min(256, config.width * 2**level)
            for _ in range(2):
                layers += [nn.Conv2d(width_in, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
                width_in = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width_in, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_tensor(images, "images", ndim=4, dtype="float")
        return self.head(self.features(images * 2 - 1).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Class ids ``(b,)`` of ``images``, in chunks."""
        was_training = self.training
        self.eval()
        try:
            device = self.head.weight.device
            return torch.cat([self(chunk.to(device)).argmax(-1).cpu() for chunk in images.split(batch_size)])
        finally:
            self.train(was_training)


def images_fingerprint(images: ImageSet) -> str:
    """A short hash of an image set's identity: name, classes, sizes, every label, a spread of images."""
    digest = hashlib.sha256()
    digest.update(repr((images.name, images.classes, images.image_size)).encode())
    for split in ("train", "val"):
        pixels, labels = images.split(split)
        digest.update(np.ascontiguousarray(labels).tobytes())
        picked = np.linspace(0, len(labels) - 1, num=min(len(labels), 64)).astype(np.int64)
        digest.update(np.ascontiguousarray(pixels[picked]).tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def accuracy(model: ImageClassifier, images: ImageSet, split: str = "val", *, limit: int | None = None) -> float:
    total = images.count(split) if limit is None else min(limit, images.count(split))
    correct = 0
    for start in range(0, total, 256):
        pixels, labels = images.batch(split, np.arange(start, min(start + 256, total)))
        correct += int((model.predict(pixels) == labels).sum())
    return correct / total


def _train(model: ImageClassifier, images: ImageSet, *, steps: int, batch_size: int, seed: int) -> None:
    """AdamW with a cosine schedule; random horizontal flips and 2-pixel shifts keep it from memorising."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(steps):
        pixels, labels = images.random_batch("train", batch_size, generator)
        flip = torch.rand(len(labels), generator=generator) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        shift = [int(s) for s in torch.randint(-2, 3, (2,), generator=generator)]
        pixels = torch.roll(F.pad(pixels, (2, 2, 2, 2), mode="replicate"), shifts=shift, dims=(2, 3))[..., 2:-2, 2:-2]
        loss = F.cross_entropy(model(pixels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def trained_classifier(
    images: ImageSet, *, steps: int, batch_size: int = 64, width: int = 32, seed: int = 0
) -> tuple[ImageClassifier, float]:
    """The classifier of ``images`` and its validation accuracy: loaded from the cache, or trained once
    on the training split (``steps`` AdamW steps of ``batch_size``) and cached."""
    check_int(steps, "steps")
    check_int(batch_size, "batch_size")
    config = ClassifierConfig(num_classes=images.num_classes, image_size=images.image_size, width=width)
    recipe = [CLASSIFIER_VERSION, images_fingerprint(images), config_to_dict(config), steps, batch_size, seed]
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "rqtransformer" / "classifiers" / f"{images.name}-{key}"
    accuracy_file = folder / _ACCURACY_FILE
    if accuracy_file.is_file():  # written last: its presence means the weights beside it are complete
        try:
            return ImageClassifier.from_pretrained(folder), float(json.loads(accuracy_file.read_text())["val_accuracy"])
        except (CheckpointError, ValueError, KeyError):
            pass  # a damaged cache entry: train again and overwrite it
    # evaluations run under no_grad, and this may be the first evaluation: training needs gradients back
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(seed)
        model = ImageClassifier(config)
        _train(model, images, steps=steps, batch_size=batch_size, seed=seed)
    val_accuracy = accuracy(model, images, "val")
    model.save_pretrained(folder)
    atomic_write_text(accuracy_file, json.dumps({"val_accuracy": val_accuracy, "steps": steps}) + "\n")
    return model, val_accuracy
