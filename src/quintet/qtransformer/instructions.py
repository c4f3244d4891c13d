"""Instruction encoders: language instructions -> the text embedding the Q-Transformer is conditioned on.

Two ways, as in the paper (which used a frozen Universal Sentence Encoder):

- :class:`InstructionEncoder`: a small transformer from :mod:`quintet.core` over the words of the
  instruction, trained with the policy (its config, vocabulary included, lives in the model's
  config, so a saved model tokenizes the same way when it is loaded). Words are the unit: BabyAI's
  grammar has a few dozen of them, so a word embedding learns in a few hundred steps what a byte
  model would first have to assemble.
- :class:`HFSentenceEncoder`: a Hugging Face encoder the user supplies (``hf`` extra; a local path
  or a hub id already in the cache: nothing downloads at run time), frozen, mean-pooled over
  tokens. Its embeddings are computed once per distinct instruction.

Shape glossary: ``b`` instructions, ``L`` words (padded), ``e`` embedding dim.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from quintet.core import RMSNorm, Transformer
from quintet.core.validation import check_ids
from quintet.qtransformer.config import InstructionEncoderConfig

PAD, UNKNOWN = 0, 1
"""word ids 0 and 1: padding and a word outside the vocabulary; the vocabulary's words follow"""
_WORD = re.compile(r"[a-z]+")


class InstructionEncoder(nn.Module):
    """``forward(ids (b, L)) -> embeddings (b, dim)``; :meth:`tokenize` turns strings into ``ids``."""

    def __init__(self, config: InstructionEncoderConfig):
        super().__init__()
        self.config = config
        self._ids = {word: index + 2 for index, word in enumerate(config.vocab)}
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.transformer = Transformer(
            config.dim, config.depth, heads=config.heads, dim_head=config.dim_head, rotary=True
        )
        self.norm = RMSNorm(config.dim)

    def tokenize(self, instructions: Sequence[str]) -> torch.Tensor:
        """Instructions -> word ids ``(b, max_words)`` (lower-cased words; unknown words get id 1)."""
        if isinstance(instructions, str) or not all(isinstance(text, str) for text in instructions):
            raise TypeError("instructions: expected a sequence of strings")
        ids = torch.full((len(instructions), self.config.max_words), PAD, dtype=torch.long)
        for row, text in enumerate(instructions):
            words = _WORD.findall(text.lower())[: self.config.max_words]
            ids[row, : len(words)] = torch.tensor([self._ids.get(word, UNKNOWN) for word in words], dtype=torch.long)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids, "text_ids", self.config.vocab_size)
        if ids.ndim != 2:
            raise ValueError(f"text_ids: expected word ids (b, L), got shape {tuple(ids.shape)}")
        present = ids != PAD
        hidden = self.transformer(self.embed(ids), key_padding_mask=present)
        weights = present.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # mean over the words
        return self.norm(pooled)


class HFSentenceEncoder:
    """A frozen Hugging Face encoder: instructions -> mean-pooled last hidden states ``(b, e)``.

    ``model``: a local folder or a hub id already in the local cache (``local_files_only``: no
    download), loaded on first use. ``dim``: the hidden size the caller expects (checked on load).
    Embeddings are cached per instruction string.
    """

    def __init__(
        self, model: str, *, dim: int | None = None, device: str | torch.device = "cpu", max_length: int = 32
    ):
        if not isinstance(model, str) or not model:
            raise ValueError(f"model: expected a Hugging Face model folder or id, got {model!r}")
        self.name, self.expected_dim = model, dim
        self.device, self.max_length = torch.device(device), max_length
        self._tokenizer = self._model = None
        self._cache: dict[str, torch.Tensor] = {}

    def _load(self) -> None:
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as error:  # pragma: no cover - the hf extra is part of the dev install
            raise ImportError("text_encoder: a Hugging Face encoder needs the 'hf' extra") from error
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name, local_files_only=True)
            model = AutoModel.from_pretrained(self.name, local_files_only=True).to(self.device).eval()
        except OSError as error:
            raise ValueError(f"text_encoder: cannot load {self.name!r} from local files ({error})") from error
        hidden = int(model.config.hidden_size)
        if self.expected_dim is not None and hidden != self.expected_dim:
            raise ValueError(
                f"text_encoder: {self.name!r} has hidden size {hidden}, the model's text_embed_dim is "
                f"{self.expected_dim}"
            )
        model.requires_grad_(False)
        self._tokenizer, self._model = tokenizer, model

    @property
    def dim(self) -> int:
        if self._model is None:
            self._load()
        return int(self._model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, instructions: Sequence[str]) -> torch.Tensor:
        if isinstance(instructions, str) or not all(isinstance(text, str) for text in instructions):
            raise TypeError("instructions: expected a sequence of strings")
        missing = sorted({text for text in instructions if text not in self._cache})
        if missing:
            if self._model is None:
                self._load()
            tokens = self._tokenizer(
                missing, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self._model(**tokens).last_hidden_state
            mask = tokens["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # mean over real tokens
            self._cache.update(zip(missing, pooled.float().cpu()))
        if not instructions:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[text] for text in instructions])
