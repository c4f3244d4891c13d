"""The frame tokenizer: a convolutional VQ autoencoder that turns frames into grids of discrete tokens.

    z_t = E(x_t)                         # eq. 1: encoder, per frame, to a (h', w') grid of vectors
    z_t = z_t + C_pre(z_{t-k+1..t})      # optional causal temporal conv (tokens see the recent past)
    q_t = VQ(z_t)                        # eq. 2: nearest code, rotation-trick gradients (Fifty et al. 2024)
    y_t = q_t + C_post(q_{t-k+1..t})     # optional causal temporal conv
    x̂_t = D(y_t)                         # eq. 3: decoder, per frame

    loss = ||x̂ - x||² + commitment + w_temporal * ||y - sg[z]||²   # the last term only with temporal convs

The temporal latent loss (the Genie 2 seed's ``temporal_autoencoder_recon_loss``) teaches the post
conv to undo the pre conv. Frames are uint8 (0..255) or float (0..1) ``(b, t, c, h, w)``; tokens
``(b, t, h', w')`` with ``h' = h / 2**levels``.

Shape glossary: ``b`` batch, ``t`` frames, ``c`` image channels, ``h``/``w`` pixels, ``r``/``s`` token
rows/columns, ``e`` codebook dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from quintet.core import PretrainedModel
from quintet.core.quantize import VectorQuantizer
from quintet.core.validation import check_ids, check_int, check_tensor
from quintet.genie.config import TokenizerConfig
from quintet.genie.convs import CausalTemporalConv, DownStack, UpStack, frames_to_unit, psnr


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor
    """``(b, t, c, h, w)`` in [0, 1] (not clamped: the loss sees the raw output)"""
    tokens: torch.Tensor
    """``(b, t, r, s)`` int64 codes"""
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    """``recon_psnr``, ``recon_mse``, the quantizer's ``codebook_usage`` / ``perplexity`` / ``dead_codes``, ..."""


class FrameTokenizer(PretrainedModel):
    """``encode(frames) -> tokens``, ``decode(tokens) -> frames``, ``forward(frames) -> TokenizerOutput``."""

    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        c = config
        self.encoder = DownStack(c.image_channels, c.channels, c.res_blocks, c.codebook_dim)
        self.quantizer = VectorQuantizer(
            c.codebook_dim,
            c.codebook_size,
            ema_decay=c.ema_decay,
            commitment_weight=c.commitment_weight,
            rotation_trick=True,
            dead_code_threshold=c.dead_code_threshold,
        )
        self.decoder = UpStack(c.codebook_dim, c.channels, c.res_blocks, c.image_channels)
        self.pre_temporal = CausalTemporalConv(c.codebook_dim, c.temporal_kernel) if c.temporal_convs else None
        self.post_temporal = CausalTemporalConv(c.codebook_dim, c.temporal_kernel) if c.temporal_convs else None

    def _unit(self, frames: object) -> torch.Tensor:
        return frames_to_unit(frames, "frames", channels=self.config.image_channels, size=self.config.image_size)

    def _latents(self, unit: torch.Tensor) -> torch.Tensor:
        """Frames in [0, 1] ``(b, t, c, h, w)`` -> pre-quantizer latents ``(b, t, e, r, s)``."""
        b = unit.shape[0]
        z = self.encoder(rearrange(unit * 2 - 1, "b t c h w -> (b t) c h w"))  # eq. 1
        z = rearrange(z, "(b t) e r s -> b t e r s", b=b)
        return self.pre_temporal(z) if self.pre_temporal is not None else z

    def _render(self, q: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Quantized latents ``(b, t, e, r, s)`` -> frames in [0, 1] (the last ``last`` frames only)."""
        y = self.post_temporal(q) if self.post_temporal is not None else q
        if last is not None:
            y = y[:, -last:]
        b = y.shape[0]
        x = self.decoder(rearrange(y, "b t e r s -> (b t) e r s"))  # eq. 3
        return rearrange((x + 1) / 2, "(b t) c h w -> b t c h w", b=b)

    def forward(self, frames: torch.Tensor) -> TokenizerOutput:
        unit = self._unit(frames)
        z = self._latents(unit)
        out = self.quantizer(rearrange(z, "b t e r s -> b t r s e"))  # eq. 2
        q = rearrange(out.quantized, "b t r s e -> b t e r s")
        y = self.post_temporal(q) if self.post_temporal is not None else q
        b = y.shape[0]
        x = rearrange(self.decoder(rearrange(y, "b t e r s -> (b t) e r s")), "(b t) c h w -> b t c h w", b=b)
        reconstruction = (x + 1) / 2
        mse = F.mse_loss(x, unit * 2 - 1)
        loss = mse + out.loss
        metrics = {
            "recon_mse": mse.detach(),
            "recon_psnr": psnr(reconstruction.detach(), unit),
            **{name: value for name, value in out.metrics.items()},
        }
        if self.post_temporal is not None:
            temporal = F.mse_loss(y, z.detach())  # the post conv learns to undo the pre conv
            loss = loss + self.config.temporal_recon_weight * temporal
            metrics["temporal_recon"] = temporal.detach()
        return TokenizerOutput(reconstruction=reconstruction, tokens=out.codes, loss=loss, metrics=metrics)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames (b, t, c, h, w)`` -> tokens ``(b, t, r, s)`` (int64); with temporal convs a frame's
        tokens depend on the frames before it in the clip."""
        z = self._latents(self._unit(frames))
        return self.quantizer.encode(rearrange(z, "b t e r s -> b t r s e"))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, *, last: int | None = None) -> torch.Tensor:
        """``tokens (b, t, r, s)`` -> frames ``(b, t, c, h, w)`` float in [0, 1]; ``last``: decode only the
        last ``last`` frames (temporal convs still read the earlier tokens)."""
        check_tensor(tokens, "tokens", ndim=4, dtype="int")
        if tuple(tokens.shape[2:]) != self.config.token_grid:
            raise ValueError(
                f"tokens: expected (b, t, {self.config.token_grid[0]}, {self.config.token_grid[1]}) token grids, "
                f"got shape {tuple(tokens.shape)}"
            )
        check_ids(tokens, "tokens", self.config.codebook_size)
        if last is not None:
            check_int(last, "last")
        q = rearrange(self.quantizer.decode(tokens), "b t r s e -> b t e r s")
        return self._render(q, last).clamp(0, 1)

    def flops_per_frame(self, *, backward: bool = True) -> float:
        """Conv FLOPs of one frame through ``forward`` (x3 with the backward pass), from the config alone:
        encoder and decoder convolutions (the quantizer's distances and norms are not counted)."""
        c = self.config
        rows, cols = c.token_grid
        forward = self.encoder.flops(*c.image_size) + self.decoder.flops(rows, cols)
        if self.pre_temporal is not None:  # two (k, 1, 1) convs over the latent grid
            forward += 2 * 2 * c.codebook_dim**2 * c.temporal_kernel * rows * cols
        return float(3 * forward if backward else forward)


def tokenizer_loss(module: nn.Module, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The Task loss of the tokenizer stage (``module`` may be the Trainer's wrapped model)."""
    out = module(frames)
    return out.loss, out.metrics
