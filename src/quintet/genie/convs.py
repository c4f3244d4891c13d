"""Convolutional pieces of the frame tokenizer and the latent action model, and frame conversions.

Shape glossary: ``b`` batch, ``t`` frames, ``c`` channels, ``h``/``w`` height/width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from quintet.core.validation import check_tensor


def frames_to_unit(frames: object, name: str, *, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Check ``frames (b, t, c, h, w)`` (uint8 0..255 or float 0..1) and return them as float in [0, 1]."""
    check_tensor(frames, name, ndim=5)
    if frames.dtype != torch.uint8 and not frames.is_floating_point():
        raise TypeError(f"{name}: expected uint8 (0..255) or float (0..1) frames, got dtype {frames.dtype}")
    if frames.shape[2] != channels or tuple(frames.shape[3:]) != tuple(size):
        raise ValueError(
            f"{name}: expected (b, t, {channels}, {size[0]}, {size[1]}) frames, got shape {tuple(frames.shape)}"
        )
    if frames.shape[0] < 1 or frames.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one clip of one frame, got shape {tuple(frames.shape)}")
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames


def psnr(prediction: torch.Tensor, target: torch.Tensor, *, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1]: ``10 log10(1 / MSE)`` (over ``dims``, or all)."""
    error = (prediction.clamp(0, 1) - target).pow(2)
    mse = error.mean() if dims is None else error.mean(dim=dims)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """``x + conv(act(norm(conv(act(norm(x))))))`` at a fixed width."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _conv_flops(c_in: int, c_out: int, kernel: int, pixels: int) -> int:
    """2 * c_in * c_out * k * k multiply-adds per pixel (output pixels; input pixels for a transposed conv)."""
    return 2 * c_in * c_out * kernel * kernel * pixels


class DownStack(nn.Module):
    """``(n, c_in, h, w) -> (n, c_out, h / 2**L, w / 2**L)``: a stride-2 conv per width, residual blocks at
    the lowest resolution (where they are cheap), a 1 x 1 conv out."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], res_blocks: int, out_channels: int):
        super().__init__()
        self.shape = (in_channels, widths, res_blocks, out_channels)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1)]
        for previous, width in zip(widths, widths[1:]):
            layers += [_norm(previous), nn.SiLU(), nn.Conv2d(previous, width, 4, stride=2, padding=1)]
        layers.extend(ResBlock(widths[-1]) for _ in range(res_blocks))
        layers += [_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def flops(self, height: int, width: int) -> int:
        """Conv FLOPs of one ``(c_in, height, width)`` input (forward)."""
        in_channels, widths, res_blocks, out_channels = self.shape
        total = 0
        for previous, level_width in zip((in_channels, *widths), widths):
            height, width = height // 2, width // 2
            total += _conv_flops(previous, level_width, 4, height * width)
        total += res_blocks * 2 * _conv_flops(widths[-1], widths[-1], 3, height * width)
        return total + _conv_flops(widths[-1], out_channels, 1, height * width)


class UpStack(nn.Module):
    """The mirror of :class:`DownStack`: ``(n, c_in, h, w) -> (n, c_out, h * 2**L, w * 2**L)``; the last
    transposed conv writes the output channels directly (no full-resolution hidden layer)."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], res_blocks: int, out_channels: int):
        super().__init__()
        self.shape = (in_channels, widths, res_blocks, out_channels)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[-1], 3, padding=1)]
        layers.extend(ResBlock(widths[-1]) for _ in range(res_blocks))
        for width, following in zip(widths[::-1], (*widths[-2::-1], out_channels)):
            layers += [_norm(width), nn.SiLU(), nn.ConvTranspose2d(width, following, 4, stride=2, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def flops(self, height: int, width: int) -> int:
        """Conv FLOPs of one ``(c_in, height, width)`` input (forward)."""
        in_channels, widths, res_blocks, out_channels = self.shape
        total = _conv_flops(in_channels, widths[-1], 3, height * width)
        total += res_blocks * 2 * _conv_flops(widths[-1], widths[-1], 3, height * width)
        for level_width, following in zip(widths[::-1], (*widths[-2::-1], out_channels)):
            total += _conv_flops(level_width, following, 4, height * width)  # transposed: per input pixel
            height, width = height * 2, width * 2
        return total


class CausalTemporalConv(nn.Module):
    """A residual convolution over time only, ``(b, t, c, h, w) -> (b, t, c, h, w)``: frame ``t``'s
    output reads frames ``t - k + 1 .. t`` (the clip's first frame repeated before its start), never later
    ones. The residual starts at zero, so a fresh layer is the identity."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv3d(channels, channels, (kernel, 1, 1))
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rearrange(x, "b t c h w -> b c t h w")
        y = F.pad(y, (0, 0, 0, 0, self.kernel - 1, 0), mode="replicate")  # causal: pad the past only
        return x + rearrange(self.conv(y), "b c t h w -> b t c h w")
