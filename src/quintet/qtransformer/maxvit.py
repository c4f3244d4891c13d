"""MaxViT image encoder (Tu et al. 2022) as used by RT-1 / Q-Transformer.

Each block: MBConv (inverted bottleneck + squeeze-excitation), then attention inside non-overlapping
``w x w`` windows ("block"), then attention across a dilated ``w x w`` grid ("grid"), each followed by
an MLP. Attention is :class:`quintet.core.Attention` with 2-D axial rotary positions, memory
key/values and per-head value gates. An optional text condition modulates every block's input (FiLM).

Shape glossary: ``b`` images, ``c`` channels, ``h``/``w`` height/width, ``x``/``y`` windows along
height/width, ``w1``/``w2`` positions inside a window, ``d`` features, ``e`` text-condition dim.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from quintet.core import Attention, FeedForward, RMSNorm, RotaryEmbedding, SinusoidalPositions
from quintet.core.validation import check_tensor
from quintet.qtransformer.config import MaxViTConfig


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel axis of a ``(b, c, h, w)`` feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.norm(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


class FiLM(nn.Module):
    """Feature-wise affine modulation ``x * (1 + scale(e)) + shift(e)``; starts as the identity."""

    def __init__(self, dim_cond: int, channels: int):
        super().__init__()
        self.to_scale_shift = nn.Linear(dim_cond, channels * 2)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = rearrange(self.to_scale_shift(cond), "b (t c) -> t b c 1 1", t=2)
        return x * (1 + scale) + shift


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, shrinkage_rate: float):
        super().__init__()
        hidden = max(1, int(channels * shrinkage_rate))
        self.gate = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, channels, bias=False), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * rearrange(self.gate(x.mean(dim=(2, 3))), "b c -> b c 1 1")


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand -> 3x3 depthwise (stride 2 to downsample) -> SE -> 1x1 project."""

    def __init__(self, dim_in: int, dim_out: int, *, downsample: bool, config: MaxViTConfig):
        super().__init__()
        hidden = int(config.mbconv_expansion_rate * dim_out)
        norm = {
            "instance": lambda channels: nn.GroupNorm(channels, channels),
            "channel_rms": ChannelRMSNorm,
            "batch": nn.BatchNorm2d,
        }[config.mbconv_norm]
        self.net = nn.Sequential(
            nn.Conv2d(dim_in, hidden, 1),
            norm(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2 if downsample else 1, padding=1, groups=hidden),
            norm(hidden),
            nn.GELU(),
            SqueezeExcitation(hidden, config.mbconv_shrinkage_rate),
            nn.Conv2d(hidden, dim_out, 1),
            norm(dim_out),
        )
        self.residual = dim_in == dim_out and not downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x if self.residual else self.net(x)


class WindowAttention(nn.Module):
    """Pre-norm attention + MLP over windows of ``w x w`` positions, block or grid partitioned."""

    def __init__(self, dim: int, *, grid: bool, config: MaxViTConfig):
        super().__init__()
        self.grid, self.window = grid, config.window_size
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(
            dim,
            heads=config.heads,
            dim_head=config.dim_head,
            num_mem_kv=config.num_mem_kv,
            value_gates=True,
            dropout=config.dropout,
        )
        self.ff_norm = RMSNorm(dim)
        self.ff = FeedForward(dim, 4.0, activation="gelu", dropout=config.dropout)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # block: contiguous w x w patches; grid: every (h/w)-th position, a sparse global mixing
        split = "b d (w1 x) (w2 y) -> (b x y) (w1 w2) d" if self.grid else "b d (x w1) (y w2) -> (b x y) (w1 w2) d"
        merge = "(b x y) (w1 w2) d -> b d (w1 x) (w2 y)" if self.grid else "(b x y) (w1 w2) d -> b d (x w1) (y w2)"
        sizes = dict(w1=self.window, w2=self.window, x=h // self.window, y=w // self.window)
        tokens = rearrange(x, split, w1=self.window, w2=self.window)
        tokens = tokens + self.attn(self.attn_norm(tokens), rotary=rotary)
        tokens = tokens + self.ff(self.ff_norm(tokens))
        return rearrange(tokens, merge, **sizes)


class MaxViTBlock(nn.Module):
    def __init__(self, dim_in: int, dim: int, *, downsample: bool, config: MaxViTConfig, dim_cond: int | None):
        super().__init__()
        self.film = FiLM(dim_cond, dim_in) if dim_cond else None
        self.mbconv = MBConv(dim_in, dim, downsample=downsample, config=config)
        self.block_attn = WindowAttention(dim, grid=False, config=config)
        self.grid_attn = WindowAttention(dim, grid=True, config=config)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.film is not None:
            x = self.film(x, cond)
        x = self.mbconv(x)
        return self.grid_attn(self.block_attn(x, rotary), rotary)


class MaxViT(nn.Module):
    """``forward(images (b, c, h, w), cond (b, e) | None) -> feature map (b, embed_dim, h', w')``."""

    def __init__(self, config: MaxViTConfig, *, dim_cond: int | None = None):
        super().__init__()
        self.config, self.dim_cond = config, dim_cond
        stem = config.dim_conv_stem or config.dim
        if config.patch_size is None:
            self.conv_stem = nn.Sequential(
                nn.Conv2d(config.channels, stem, 3, stride=2, padding=1), nn.Conv2d(stem, stem, 3, padding=1)
            )
        else:  # patch embedding: one position per patch, seeing that patch only (ViT's stem)
            self.conv_stem = nn.Conv2d(config.channels, stem, config.patch_size, stride=config.patch_size)
        dims = [stem] + [config.dim * 2**s for s in range(len(config.depth))]
        self.blocks = nn.ModuleList()
        for stage, stage_depth in enumerate(config.depth):
            for index in range(stage_depth):
                dim_in = dims[stage] if index == 0 else dims[stage + 1]
                downsample = index == 0 and not (stage == 0 and config.patch_size is not None)
                self.blocks.append(
                    MaxViTBlock(dim_in, dims[stage + 1], downsample=downsample, config=config, dim_cond=dim_cond)
                )
        self.embed_dim = config.embed_dim
        # the instruction also modulates the output map: what the TokenLearner pools is what it names
        self.film_out = FiLM(dim_cond, config.embed_dim) if dim_cond and config.film_output else None
        self.rotary = RotaryEmbedding(config.dim_head, axes=2)
        self.positions = SinusoidalPositions(config.embed_dim // 2) if config.absolute_positions else None
        self.register_buffer("window_positions", RotaryEmbedding.grid(config.window_size, config.window_size), False)

    def forward(self, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor(images, "images", ndim=4, dtype="float")
        multiple = self.config.downsample * self.config.window_size
        if images.shape[1] != self.config.channels or any(side % multiple for side in images.shape[-2:]):
            raise ValueError(
                f"images: expected (b, {self.config.channels}, h, w) with h and w multiples of {multiple}, "
                f"got {tuple(images.shape)}"
            )
        if (cond is None) != (self.dim_cond is None):
            raise ValueError("cond: needed exactly when the encoder is built with dim_cond")
        rotary = self.rotary(self.window_positions)
        x = self.conv_stem(images)
        for block in self.blocks:
            x = block(x, rotary, cond)
        if self.film_out is not None:
            x = self.film_out(x, cond)
        if self.positions is not None:  # rows on the first half of the channels, columns on the second
            h, w = x.shape[-2:]
            rows = repeat(self.positions(h), "h c -> c h w", w=w)
            cols = repeat(self.positions(w), "w c -> c h w", h=h)
            x = x + torch.cat((rows, cols)).to(x.dtype)
        return x
