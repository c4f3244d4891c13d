"""The decode loop's view of a Flamingo-like model with a prompt's images bound (own LM and HF adapter)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

NEG_INF = float("-inf")


class MediaPrompt(nn.Module):
    """A Flamingo-like model with a prompt's images bound: the ``model(ids, cache=...)`` that the one
    decode loop (``core.generation.generate``) drives.

    The images go in with the first cached call (or every uncached call), and the ``<image>`` logit
    is ``-inf``: a generated ``<image>`` would have no image.
    """

    def __init__(self, model: nn.Module, media: dict, *, media_token_id: int, num_tokens: int, max_seq_len: int):
        super().__init__()
        self.model = model
        self.media = {key: value for key, value in media.items() if value is not None}
        self.media_token_id = media_token_id
        self.config = SimpleNamespace(num_tokens=num_tokens, max_seq_len=max_seq_len)
        self.train(model.training)

    def new_cache(self):
        return self.model.new_cache()

    def forward(self, ids: torch.Tensor, *, cache=None) -> torch.Tensor:
        first = cache is None or cache.length == 0
        logits = self.model(ids, cache=cache, **(self.media if first else {}))
        logits[..., self.media_token_id] = NEG_INF
        return logits
