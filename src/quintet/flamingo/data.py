"""The embedded few-shot task: episodes of interleaved ``<image> <word> <|endofchunk|>`` captions.

Each episode draws ``ways`` classes of a labelled image set and gives each a fresh random label
word (nonsense words such as "dax" or "wug"), so the word that names an image is known only from
the examples earlier in the same prompt: the model must read them, as Flamingo does with its
few-shot prompts. A training episode is a run of captioned images whose classes repeat at random::

    <bos> <image> dax <|endofchunk|> <image> wug <|endofchunk|> <image> dax <|endofchunk|> ...

An evaluation prompt holds ``k`` captioned examples (the ``ways`` classes in turn, in random order)
and a query ``<image>``; the answer is scored among the episode's ``ways`` words, so 0 shots is
chance (``1 / ways``). Training episodes use train-split images; held-out episodes use the val split.

The vocabulary also holds one concept token per class (``<concept:circle>``): the language model's
own word for what an image shows. ``text_only=True`` episodes put them where the images stand,
``<bos> <concept:circle> dax <|endofchunk|> ...``, so a language model pre-trained on text learns to
read few-shot prompts (an induction: the word after an earlier mention of the same concept) before
it ever sees an image, as Flamingo's language model knows language before it meets pixels.
:meth:`FewShotEpisodes.captions` pairs single images with their concept word, the image-text pairs
Flamingo trains on beside interleaved documents; the few-shot prompts never name a concept, the
images must.

Everything is a deterministic function of a ``torch.Generator``: a batch is reproduced from its seed.

Shape glossary: ``b`` episodes, ``e`` examples per episode, ``k`` shots, ``w`` ways, ``n`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from quintet.core.validation import check_int, check_tensor
from quintet.data.images import ImageSet

SPECIAL_TOKENS = ("<pad>", "<bos>", "<image>", "<|endofchunk|>")
MAX_CLASSES = 32
"""concept tokens reserved in the vocabulary: image sets with up to this many classes"""
LABEL_WORDS = (
    "dax", "wug", "blick", "fep", "toma", "zup", "kiki", "bouba", "lorp", "mib", "tufa", "glim",
    "pilk", "rab", "sib", "vex", "yorp", "zorb", "jeb", "kuv", "nef", "quib", "snod", "teg",
    "wix", "hap", "dru", "fob", "gorp", "lum", "moxi", "pev",
)  # fmt: skip
PAD, BOS, IMAGE, END_OF_CHUNK = range(len(SPECIAL_TOKENS))
FIRST_CONCEPT = len(SPECIAL_TOKENS)
FIRST_WORD = FIRST_CONCEPT + MAX_CLASSES
NUM_TOKENS = FIRST_WORD + len(LABEL_WORDS)
TOKENS_PER_EXAMPLE = 3
"""``<image> <word> <|endofchunk|>``"""


def decode(ids: torch.Tensor | list[int], classes: tuple[str, ...] = ()) -> str:
    """Token ids -> text, tokens separated by spaces; ``classes`` names the concept tokens."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)

    def token(i: int) -> str:
        if 0 <= i < FIRST_CONCEPT:
            return SPECIAL_TOKENS[i]
        if FIRST_CONCEPT <= i < FIRST_WORD:
            c = i - FIRST_CONCEPT
            return f"<concept:{classes[c] if c < len(classes) else c}>"
        return LABEL_WORDS[i - FIRST_WORD] if FIRST_WORD <= i < NUM_TOKENS else f"<{i}?>"

    return " ".join(token(i) for i in values)


def episode_length(examples: int) -> int:
    """Tokens of a training episode of ``examples`` captioned images (``<bos>`` included)."""
    return 1 + TOKENS_PER_EXAMPLE * examples


MediaSource = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
"""``(split, image indices (b, e)) -> {"images": (b, e, 3, h, w)}`` or ``{"vision_features": ...}``"""


@dataclass(frozen=True)
class EpisodeBatch:
    """Token ids ``(b, n)`` and what their ``<image>`` tokens stand for: the images ``(b, e, 3, h, w)``
    in [0, 1], or their encoder features ``(b, e, 1, p, d)``; neither for text-only episodes."""

    ids: torch.Tensor
    images: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None

    def media(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's media: ``images=`` or ``vision_features=`` (or none)."""
        if self.images is not None:
            return {"images": self.images}
        return {"vision_features": self.vision_features} if self.vision_features is not None else {}


@dataclass(frozen=True)
class FewShotPrompts:
    """Evaluation prompts: ``k`` examples and a query ``<image>``; the answer is one of ``candidates``."""

    batch: EpisodeBatch
    """ids ``(b, 1 + 3k + 1)`` and ``k + 1`` media per prompt"""
    image_index: torch.Tensor
    """``(b, k + 1)`` the images' indices in their split"""
    answers: torch.Tensor
    """``(b,)`` the query's word id"""
    candidates: torch.Tensor
    """``(b, w)`` the episode's word ids"""


class FewShotEpisodes:
    """Episodes over an :class:`~quintet.data.images.ImageSet` (at least ``ways`` classes per split).

    ``media(split, index)`` turns image indices into the model's media (default: the pixels); a frozen
    encoder's features computed once for the whole set make training steps several times cheaper.
    """

    def __init__(self, images: ImageSet, *, ways: int, media: MediaSource | None = None):
        check_int(ways, "ways", minimum=2)
        if ways > images.num_classes:
            raise ValueError(f"ways: the image set has {images.num_classes} classes, got ways={ways}")
        if ways > len(LABEL_WORDS):
            raise ValueError(f"ways: at most {len(LABEL_WORDS)} label words, got ways={ways}")
        if images.num_classes > MAX_CLASSES:
            raise ValueError(f"images: at most {MAX_CLASSES} classes (concept tokens), got {images.num_classes}")
        self.images, self.ways = images, ways
        self.media = media or self.pixels
        self._by_class = {
            split: _indices_by_class(images.split(split)[1], images.num_classes) for split in ("train", "val")
        }
        for split, (_, counts) in self._by_class.items():
            if (counts == 0).any():
                missing = [images.classes[c] for c in np.flatnonzero(counts == 0)]
                raise ValueError(f"images: the {split} split has no image of class(es) {missing}")

    def pixels(self, split: str, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The images at ``index (b, e)`` of ``split``: ``{"images": (b, e, 3, h, w)}``."""
        pixels, _ = self.images.batch(split, index.flatten())
        return {"images": rearrange(pixels, "(b e) c h w -> b e c h w", b=index.shape[0])}

    def _draw_episodes(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per episode: ``ways`` distinct classes and ``ways`` distinct label-word ids, ``(b, w)`` each."""
        classes = torch.rand(batch_size, self.images.num_classes, generator=generator).argsort(dim=1)[:, : self.ways]
        words = torch.rand(batch_size, len(LABEL_WORDS), generator=generator).argsort(dim=1)[:, : self.ways]
        return classes, words + FIRST_WORD

    def _pick_images(self, split: str, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The index of a random image of each class in ``classes (b, e)``: ``(b, e)``."""
        table, counts = self._by_class[split]
        position = (torch.rand(classes.shape, generator=generator) * torch.from_numpy(counts)[classes]).long()
        return torch.from_numpy(table)[classes, position]

    def sample(
        self, split: str, *, batch_size: int, examples: int, generator: torch.Generator, text_only: bool = False
    ) -> EpisodeBatch:
        """Training-format episodes of ``examples`` captioned images; classes repeat at random.

        ``text_only``: concept tokens stand where the images would (no images are read).
        """
        check_int(batch_size, "batch_size")
        check_int(examples, "examples")
        classes, words = self._draw_episodes(batch_size, generator)
        slots = torch.randint(0, self.ways, (batch_size, examples), generator=generator)
        shown = classes.gather(1, slots)
        if text_only:
            return EpisodeBatch(ids=caption_ids(words.gather(1, slots), media=shown + FIRST_CONCEPT))
        index = self._pick_images(split, shown, generator)
        return EpisodeBatch(ids=caption_ids(words.gather(1, slots)), **self.media(split, index))

    def captions(self, split: str, *, batch_size: int, generator: torch.Generator) -> EpisodeBatch:
        """Captioned single images, ``<bos> <image> <concept:circle> <|endofchunk|>``: image-text pairs in the
        language model's own words for the classes (the paper trains on such pairs beside interleaved text)."""
        check_int(batch_size, "batch_size")
        classes = torch.randint(0, self.images.num_classes, (batch_size, 1), generator=generator)
        index = self._pick_images(split, classes, generator)
        ids = torch.cat(
            (
                torch.full((batch_size, 1), BOS),
                torch.full((batch_size, 1), IMAGE),
                classes + FIRST_CONCEPT,
                torch.full((batch_size, 1), END_OF_CHUNK),
            ),
            dim=1,
        )
        return EpisodeBatch(ids=ids, **self.media(split, index))

    def prompts(
        self, split: str, *, batch_size: int, shots: int, generator: torch.Generator, text_only: bool = False
    ) -> FewShotPrompts:
        """``shots`` examples (the classes in turn, shuffled) and a query of a random episode class.

        ``text_only``: concept tokens instead of images (what the language model alone can answer).
        """
        check_int(batch_size, "batch_size")
        check_int(shots, "shots", minimum=0)
        classes, words = self._draw_episodes(batch_size, generator)
        turns = torch.rand(batch_size, self.ways, generator=generator).argsort(dim=1)
        slots = turns[:, torch.arange(shots) % self.ways]
        slots = slots.gather(1, torch.rand(batch_size, shots, generator=generator).argsort(dim=1))
        query = torch.randint(0, self.ways, (batch_size, 1), generator=generator)
        shown = classes.gather(1, torch.cat((slots, query), dim=1))
        index = self._pick_images(split, shown, generator)
        examples = words.gather(1, slots)
        if text_only:
            concepts = shown + FIRST_CONCEPT
            ids = torch.cat((caption_ids(examples, media=concepts[:, :-1]), concepts[:, -1:]), dim=1)
            batch = EpisodeBatch(ids=ids)
        else:
            ids = torch.cat((caption_ids(examples), torch.full((batch_size, 1), IMAGE)), dim=1)
            batch = EpisodeBatch(ids=ids, **self.media(split, index))
        return FewShotPrompts(batch=batch, image_index=index, answers=words.gather(1, query)[:, 0], candidates=words)


def _indices_by_class(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, max_count)`` table of image indices per class (padded) and the count per class."""
    labels = np.asarray(labels)
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    counts = np.array([len(p) for p in per_class], dtype=np.int64)
    table = np.zeros((num_classes, max(1, counts.max())), dtype=np.int64)
    for c, indices in enumerate(per_class):
        table[c, : len(indices)] = indices
    return table, counts


def caption_ids(words: torch.Tensor, media: torch.Tensor | None = None) -> torch.Tensor:
    """``<bos>`` + ``<image> <word> <|endofchunk|>`` per word of ``words (b, e)``; ``media (b, e)``
    replaces the ``<image>`` tokens (concept tokens)."""
    b = words.shape[0]
    media = torch.full_like(words, IMAGE) if media is None else media
    examples = torch.stack((media, words, torch.full_like(words, END_OF_CHUNK)), dim=-1)
    return torch.cat((torch.full((b, 1), BOS, dtype=torch.long), rearrange(examples, "b e t -> b (e t)")), dim=1)


def choose(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The candidate word with the highest logit: ``logits (b, v)``, ``candidates (b, w)`` -> ``(b,)``."""
    check_tensor(logits, "logits", ndim=2, dtype="float")
    return candidates.gather(1, logits.gather(1, candidates).argmax(dim=1, keepdim=True))[:, 0]
