"""RQ-VAE (Lee et al. 2022, sec. 3.1): a convolutional autoencoder whose bottleneck codes each spatial
position as ``D`` residual codes.

    z = E(x)                              # (b, c, h, w): downsampled by f = 2 ** (levels)
    k_{.,d} = argmin_k ||r_d - e(k)||,   r_1 = z,  r_{d+1} = r_d - e(k_d)       # eq. 2: residual quantization
    ẑ = sum_d e(k_d)                      # eq. 3: the quantized feature map
    x̂ = G(ẑ)
    L = ||x - x̂||² + β sum_d ||z - sg[ẑ^(d)]||²                               # eq. 4 (without the GAN and
                                                                              # perceptual terms: no weights
                                                                              # to download here)

The quantizer is ``quintet.core.quantize.ResidualQuantizer`` (EMA codebooks, dead-code restarts).
Encoder and decoder follow VQGAN's layout: residual blocks of GroupNorm, SiLU and 3 x 3 convolutions,
strided-convolution downsampling, nearest-neighbour upsampling.

Shape glossary: ``b`` batch, ``H, W`` image size, ``h, w`` code grid, ``c`` latent dim, ``D`` depth.
Images are float in ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from quintet.core import PretrainedModel
from quintet.core.quantize import ResidualQuantizer
from quintet.core.validation import check_tensor
from quintet.rqtransformer.config import RQVAEConfig


def _norm(width: int) -> nn.GroupNorm:
    """Group norm with VQGAN's 32 groups, fewer for narrow layers."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if width % g == 0)
    return nn.GroupNorm(groups, width, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(width), nn.Conv2d(width, width, 3, padding=1)
        self.norm2, self.conv2 = _norm(width), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3 x 3 convolution (no checkerboard artefacts of transposed convs)."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.conv = nn.Conv2d(width_in, width_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, config: RQVAEConfig):
        super().__init__()
        widths = config.channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, widths[0], 3, padding=1)]
        for level, width in enumerate(widths):
            layers += [ResBlock(width) for _ in range(config.res_blocks)]
            if level + 1 < len(widths):  # halve the resolution, move to the next width
                layers.append(nn.Conv2d(width, widths[level + 1], 4, stride=2, padding=1))
        layers += [ResBlock(widths[-1]), _norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], config.latent_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, config: RQVAEConfig):
        super().__init__()
        widths = config.channels
        layers: list[nn.Module] = [nn.Conv2d(config.latent_dim, widths[-1], 3, padding=1), ResBlock(widths[-1])]
        for level in reversed(range(len(widths))):
            layers += [ResBlock(widths[level]) for _ in range(config.res_blocks)]
            if level > 0:
                layers.append(Upsample(widths[level], widths[level - 1]))
        layers += [_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], config.in_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class RQVAEOutput:
    """``reconstruction (b, C, H, W)`` (unclamped), ``codes (b, h, w, D)``, the quantizer's ``loss``
    (commitment) and its ``metrics`` (codebook usage, perplexity, dead codes; detached)."""

    reconstruction: torch.Tensor
    codes: torch.Tensor
    quantizer_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class RQVAE(PretrainedModel):
    """``model(images (b, C, H, W) in [0, 1]) -> RQVAEOutput``; ``encode`` -> codes, ``decode`` -> images."""

    config_class = RQVAEConfig

    def __init__(self, config: RQVAEConfig):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.quantizer = ResidualQuantizer(
            config.latent_dim,
            config.codebook_size,
            config.depth,
            shared_codebook=config.shared_codebook,
            distance=config.distance,
            ema_decay=config.ema_decay,
            commitment_weight=config.commitment_weight,
            rotation_trick=config.rotation_trick,
            dead_code_threshold=config.dead_code_threshold,
        )
        self.decoder = Decoder(config)

    def _check_images(self, images: object, name: str = "images") -> torch.Tensor:
        config = self.config
        check_tensor(images, name, ndim=4, dtype="float")
        b, c, height, width = images.shape
        if c != config.in_channels:
            raise ValueError(
                f"{name}: expected {config.in_channels} channels (b, C, H, W), got shape {tuple(images.shape)}"
            )
        f = config.downsampling
        if b < 1 or height < f or width < f or height % f or width % f:
            raise ValueError(
                f"{name}: height and width must be positive multiples of the downsampling factor {f}, "
                f"got shape {tuple(images.shape)}"
            )
        return images

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """``z = E(x)`` as ``(b, h, w, c)`` vectors for the quantizer; the encoder reads ``[-1, 1]``."""
        return rearrange(self.encoder(images * 2 - 1), "b c h w -> b h w c")

    def _reconstruct(self, quantized: torch.Tensor) -> torch.Tensor:
        """``x̂ = G(ẑ)`` from ``(b, h, w, c)``, back to ``[0, 1]`` (unclamped)."""
        return (self.decoder(rearrange(quantized, "b h w c -> b c h w")) + 1) / 2

    def forward(self, images: torch.Tensor) -> RQVAEOutput:
        self._check_images(images)
        out = self.quantizer(self._latents(images))  # eq. 2-3
        return RQVAEOutput(self._reconstruct(out.quantized), out.codes, out.loss, out.metrics)

    @staticmethod
    def loss(output: RQVAEOutput, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """eq. 4: reconstruction MSE + the quantizer's commitment loss; metrics detached, with ``recon_psnr``."""
        mse = F.mse_loss(output.reconstruction.float(), images.float())
        metrics = {"recon_mse": mse.detach(), "recon_psnr": psnr_from_mse(mse.detach()), **output.metrics}
        return mse + output.quantizer_loss, metrics

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``images (b, C, H, W)`` in ``[0, 1]`` -> codes ``(b, H/f, W/f, D)`` (int64)."""
        self._check_images(images)
        return self.quantizer.encode(self._latents(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, *, depth: int | None = None) -> torch.Tensor:
        """codes ``(b, h, w, D)`` -> images ``(b, C, h f, w f)`` in ``[0, 1]``; ``depth`` decodes from the
        first ``depth`` codes of each position only (coarse-to-fine views of the residual stack)."""
        check_tensor(codes, "codes", ndim=4, dtype="int")
        quantized = self.quantizer.decode(codes, cumulative=depth is not None)
        if depth is not None:
            if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= self.config.depth:
                raise ValueError(f"depth: expected an integer in [1, {self.config.depth}], got {depth!r}")
            quantized = quantized[..., depth - 1, :]
        return self._reconstruct(quantized).clamp(0, 1)

    def flops_per_sample(self, height: int, width: int | None = None) -> float:
        """Forward + backward FLOPs of one ``height x width`` image, from the layer shapes: a convolution
        costs 2 * in * out * k² per output pixel forward, the same again for each of its input and
        weight gradients (the first has no input gradient: images need none); the quantizer's distance
        matmuls, ``2 * c * K`` per vector and depth, run forward only (codes carry no gradient)."""
        width = height if width is None else width
        encoder, (h, w) = _conv_flops(self.encoder.layers, height, width)
        decoder, _ = _conv_flops(self.decoder.layers, h, w)
        first = self.encoder.layers[0]
        first_flops, _ = _conv_flops(nn.Sequential(first), height, width)
        quantizer = 2 * self.config.latent_dim * self.config.codebook_size * self.config.depth * h * w
        return 3 * (encoder + decoder) - first_flops + quantizer


def _conv_flops(layers: nn.Sequential, height: int, width: int) -> tuple[float, tuple[int, int]]:
    """Forward FLOPs of the convolutions of ``layers`` on a ``height x width`` input, and the output size."""
    total = 0.0
    for layer in layers:
        convs = []
        if isinstance(layer, nn.Conv2d):
            convs = [layer]
        elif isinstance(layer, ResBlock):
            convs = [layer.conv1, layer.conv2]
        elif isinstance(layer, Upsample):
            height, width = 2 * height, 2 * width
            convs = [layer.conv]
        for conv in convs:
            (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
            height, width = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
            total += 2 * conv.in_channels * conv.out_channels * kh * kw * height * width
    return total, (height, width)


def psnr_from_mse(mse: torch.Tensor | float) -> torch.Tensor | float:
    """Peak signal-to-noise ratio in dB of images in ``[0, 1]``: ``10 log10(1 / mse)``."""
    if isinstance(mse, torch.Tensor):
        return -10 * torch.log10(mse.clamp_min(1e-10))
    return -10 * math.log10(max(mse, 1e-10))
