"""TokenLearner (Ryoo et al. 2021): a few learned spatial attention maps pool a feature map into tokens.

Shape glossary: ``b`` images, ``d`` features, ``h``/``w`` feature-map height/width, ``p = h * w``
positions, ``n`` output tokens.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import nn

from quintet.core import RMSNorm
from quintet.core.validation import check_tensor


class TokenLearner(nn.Module):
    """``forward(feature_map (b, d, h, w)) -> tokens (b, n, d)``.

    An MLP scores every position for each of the ``n`` tokens; a sigmoid turns the scores into
    spatial weights, and each token is the weighted mean of the features (TokenLearner v1.1).
    """

    def __init__(self, dim: int, *, num_tokens: int, ff_mult: int = 2):
        super().__init__()
        self.dim, self.num_tokens = dim, num_tokens
        self.norm = RMSNorm(dim)
        self.to_maps = nn.Sequential(nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Linear(dim * ff_mult, num_tokens))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        check_tensor(feature_map, "feature_map", ndim=4, dtype="float")
        if feature_map.shape[1] != self.dim:
            raise ValueError(f"feature_map: expected (b, {self.dim}, h, w), got {tuple(feature_map.shape)}")
        features = rearrange(feature_map, "b d h w -> b (h w) d")
        weights = self.to_maps(self.norm(features)).sigmoid()
        return einsum(weights, features, "b p n, b p d -> b n d") / features.shape[1]
