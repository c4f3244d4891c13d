"""The embedded few-shot task for the Hugging Face adapter (``hf-gpt2``): captions in the LM's own tokens.

Episodes are those of :mod:`quintet.flamingo.data`; each label word is tokenized by the base model's
tokenizer (``" dax"``, often several tokens), ``<image>`` / ``<|endofchunk|>`` become the adapter's
two added tokens, and the images are resized to the vision model's input size. A few-shot answer is
the candidate word whose tokens get the highest total log-probability after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from quintet.core.sampling import probabilities
from quintet.flamingo.data import BOS, END_OF_CHUNK, FIRST_WORD, IMAGE, LABEL_WORDS, FewShotEpisodes
from quintet.flamingo.hf import HFFlamingo
from quintet.flamingo.tasks import EVAL_SEED, FlamingoRecipe, _device, _seeded, image_set, lazy
from quintet.registry import TaskRequest
from quintet.training.task import SampleFolder, Task
from quintet.training.trainer import move_to_device


@dataclass(frozen=True)
class HFEpisodeBatch:
    """Ids ``(b, n)`` in the adapter's vocabulary, images ``(b, e, 3, s, s)``, the targets that count ``(b, n - 1)``."""

    ids: torch.Tensor
    images: torch.Tensor
    target_mask: torch.Tensor


class CaptionTokenizer:
    """Our episode ids -> the adapter's ids: label words through the base LM's tokenizer."""

    def __init__(self, model: HFFlamingo, tokenizer):
        self.model = model
        self.words = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in LABEL_WORDS]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None else []
        self.pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def row(self, ids: torch.Tensor) -> list[int]:
        out: list[int] = []
        for token in ids.tolist():
            if token == BOS:
                out += self.bos
            elif token == IMAGE:
                out.append(self.model.media_token_id)
            elif token == END_OF_CHUNK:
                out.append(self.model.end_of_chunk_token_id)
            else:
                out += self.words[token - FIRST_WORD]
        return out

    def batch(self, ids: torch.Tensor, images: torch.Tensor) -> HFEpisodeBatch:
        rows = [self.row(r) for r in ids]
        length = max(len(r) for r in rows)
        padded = torch.full((len(rows), length), self.pad, dtype=torch.long)
        valid = torch.zeros(len(rows), length, dtype=torch.bool)
        for index, row in enumerate(rows):  # right padding: a causal model never reads it
            padded[index, : len(row)] = torch.tensor(row)
            valid[index, : len(row)] = True
        targets = padded[:, 1:]
        target_mask = valid[:, 1:] & (targets != self.model.media_token_id)
        return HFEpisodeBatch(ids=padded, images=_resize(images, self.model.image_size), target_mask=target_mask)


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or images.shape[-1] == size:
        return images
    b = images.shape[0]
    flat = F.interpolate(rearrange(images, "b e c h w -> (b e) c h w"), size=(size, size), mode="bilinear")
    return rearrange(flat, "(b e) c h w -> b e c h w", b=b)


def hf_loss(module, batch: HFEpisodeBatch):
    logits = module(batch.ids[:, :-1], batch.images)
    per_token = F.cross_entropy(rearrange(logits.float(), "b n v -> b v n"), batch.ids[:, 1:], reduction="none")
    counted = batch.target_mask.to(per_token.dtype)
    return (per_token * counted).sum() / counted.sum(), {}


@torch.no_grad()
def hf_fewshot_accuracy(model: HFFlamingo, episodes: FewShotEpisodes, captions: CaptionTokenizer, recipe) -> dict:
    """``fewshot_accuracy_k``: the candidate word with the highest total log-probability after the prompt."""
    device = _device(model)
    model.eval()
    results = {}
    for shots in recipe.shots:
        prompts = episodes.prompts(
            "val", batch_size=recipe.eval_episodes, shots=shots, generator=_seeded(EVAL_SEED, shots)
        )
        correct = 0
        for row in range(recipe.eval_episodes):
            prompt = captions.row(prompts.batch.ids[row])
            images = _resize(prompts.batch.images[row : row + 1], model.image_size).to(device)
            scores = []
            for word in prompts.candidates[row].tolist():
                tokens = captions.words[word - FIRST_WORD]
                ids = torch.tensor([prompt + tokens], device=device)
                log_probs = probabilities(model(ids[:, :-1], images)[0, len(prompt) - 1 :], log=True)
                scores.append(float(log_probs.gather(1, ids[0, len(prompt) :, None]).sum()))
            correct += int(
                prompts.candidates[row, max(range(len(scores)), key=scores.__getitem__)] == prompts.answers[row]
            )
        results[f"fewshot_accuracy_{shots}"] = correct / recipe.eval_episodes
    return results


def hf_task(model: HFFlamingo, request: TaskRequest, recipe: FlamingoRecipe) -> Task:
    settings = request.settings

    def make_captions() -> CaptionTokenizer:
        from transformers import AutoTokenizer

        return CaptionTokenizer(model, AutoTokenizer.from_pretrained(model.config.language_model))

    captions = lazy(make_captions)
    episodes = lazy(lambda: FewShotEpisodes(image_set(request.data, recipe), ways=recipe.ways))
    outputs = SampleFolder("flamingo")

    def train_batch(index: int) -> HFEpisodeBatch:
        batch = episodes().sample(
            "train", batch_size=settings.batch_size, examples=recipe.examples, generator=_seeded(settings.seed, index)
        )
        return captions().batch(batch.ids, batch.images)

    def evaluate(trained: HFFlamingo) -> dict[str, float]:
        val = episodes().sample(
            "val", batch_size=recipe.val_episodes, examples=recipe.examples, generator=_seeded(EVAL_SEED, -1)
        )
        loss, _ = hf_loss(trained, move_to_device(captions().batch(val.ids, val.images), _device(trained)))
        return {"val_loss": float(loss), "fewshot_chance": 1 / recipe.ways} | hf_fewshot_accuracy(
            trained, episodes(), captions(), recipe
        )

    return Task(
        model=model,
        loss=hf_loss,
        train_batch=train_batch,
        settings=settings,
        evaluate=evaluate,
        start=outputs.start,
        batch_tokens=lambda batch: batch.ids.shape[0] * (batch.ids.shape[1] - 1),
    )


def hf_example_batch(model: HFFlamingo, *, batch_size: int, generator: torch.Generator) -> HFEpisodeBatch:
    """Three captioned random images: ``<image> w w <|endofchunk|>`` with random base-vocabulary words."""
    words = torch.randint(0, model.base_vocab, (batch_size, 3, 2), generator=generator)
    media = torch.full((batch_size, 3, 1), model.media_token_id)
    end = torch.full((batch_size, 3, 1), model.end_of_chunk_token_id)
    ids = rearrange(torch.cat((media, words, end), dim=-1), "b e t -> b (e t)")
    size = model.image_size or 32
    images = torch.rand(batch_size, 3, 3, size, size, generator=generator)
    mask = ids[:, 1:] != model.media_token_id
    return HFEpisodeBatch(ids=ids, images=images, target_mask=mask)


def hf_generate(model: HFFlamingo, batch: HFEpisodeBatch, *, use_cache: bool) -> torch.Tensor:
    """Greedy continuation of two captioned examples and the query's ``<image>``."""
    return model.generate(batch.ids[:, :9], 4, images=batch.images[:, :3], temperature=0.0, use_cache=use_cache)
