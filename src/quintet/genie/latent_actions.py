"""Genie's latent action model: discrete actions learned from video that has none.

    a_t = VQ(maxpool(E([x_t, x_{t+1}, x_{t+1} - x_t])))       # eq. 1: one of a few codes per transition
    x̂_{t+1} = x_t + D(x_t, a_t)                           # eq. 2: the decoder sees frame t and the code only

    loss = ||w * (x̂_{t+1} - x_{t+1})||² + commitment   # w: higher on the pixels that changed

With only ``num_latent_actions`` codes (8) and frame ``t`` given, the code can carry little more than
which way things moved; in a game that is mostly what the player did. The decoder's frame path is an
encoder-decoder whose bottleneck is modulated by the code (FiLM) and which predicts the change
``x_{t+1} - x_t``. :func:`normalized_mutual_information` scores how well the codes agree with the
true actions of recorded play.

Shape glossary: ``b`` batch, ``t`` frames, ``c``/``h``/``w`` image channels/height/width, ``e`` code dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from quintet.core import PretrainedModel
from quintet.core.quantize import VectorQuantizer
from quintet.genie.config import LatentActionConfig
from quintet.genie.convs import DownStack, UpStack, frames_to_unit, psnr


@dataclass
class LatentActionOutput:
    actions: torch.Tensor
    """``(b, t - 1)`` latent action codes"""
    reconstruction: torch.Tensor
    """``(b, t - 1, c, h, w)``: frames ``1 .. t-1`` rebuilt from their predecessor and the code"""
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class LatentActionModel(PretrainedModel):
    """``forward(frames (b, t, c, h, w)) -> LatentActionOutput``; ``infer(frames) -> codes (b, t - 1)``."""

    config_class = LatentActionConfig

    def __init__(self, config: LatentActionConfig):
        super().__init__(config)
        c = config
        self.encoder = DownStack(3 * c.image_channels, c.channels, 1, c.action_dim)
        self.quantizer = VectorQuantizer(
            c.action_dim,
            c.num_latent_actions,
            ema_decay=0.9,
            commitment_weight=c.commitment_weight,
            dead_code_threshold=20,  # a small codebook collapses easily: re-seed codes nobody uses
        )
        bottleneck = c.channels[-1]
        self.frame_encoder = DownStack(c.image_channels, c.channels, 1, bottleneck)
        self.to_film = nn.Linear(c.action_dim, 2 * bottleneck)
        self.frame_decoder = UpStack(bottleneck, c.channels, 1, c.image_channels)

    def _pairs(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = frames_to_unit(frames, "frames", channels=self.config.image_channels, size=self.config.image_size)
        if unit.shape[1] < 2:
            raise ValueError(f"frames: a transition needs >= 2 frames, got shape {tuple(frames.shape)}")
        before = rearrange(unit[:, :-1], "b t c h w -> (b t) c h w")
        after = rearrange(unit[:, 1:], "b t c h w -> (b t) c h w")
        return before, after

    def _code_input(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        pair = torch.cat((before, after, after - before), dim=1) * 2 - 1
        # eq. 1: max-pooled over space, one vector per transition: a mean would dilute the few places that
        # moved with the many that did not, and the codebook would collapse onto that common part
        return self.encoder(pair).amax(dim=(2, 3))

    def forward(self, frames: torch.Tensor) -> LatentActionOutput:
        b = frames.shape[0]
        before, after = self._pairs(frames)
        out = self.quantizer(self._code_input(before, after))
        scale, shift = self.to_film(out.quantized)[:, :, None, None].chunk(2, dim=1)
        h = self.frame_encoder(before * 2 - 1)
        change = self.frame_decoder(h * (1 + scale) + shift)  # eq. 2: the change, from frame t and the code
        predicted = before + change / 2  # the decoder works in [-1, 1]: half of it is a [0, 1] change
        mse = F.mse_loss(predicted, after)
        moved = ((after - before).abs().amax(dim=1, keepdim=True) > 0.05).float()  # pixels that changed
        weight = 1 + self.config.changed_pixel_weight * moved
        weighted = ((predicted - after).pow(2) * weight).mean() / weight.mean()
        metrics = {
            "lam_mse": mse.detach(),
            "lam_psnr": psnr(predicted.detach(), after),
            **{f"lam_{name}": value for name, value in out.metrics.items()},
        }
        return LatentActionOutput(
            actions=rearrange(out.codes, "(b t) -> b t", b=b),
            reconstruction=rearrange(predicted, "(b t) c h w -> b t c h w", b=b),
            loss=weighted * 4 + out.loss,  # x4: the squared error in the decoder's [-1, 1] units
            metrics=metrics,
        )

    @torch.no_grad()
    def infer(self, frames: torch.Tensor) -> torch.Tensor:
        """Latent action codes ``(b, t - 1)`` of the transitions of ``frames (b, t, c, h, w)``."""
        before, after = self._pairs(frames)
        codes = self.quantizer.encode(self._code_input(before, after))
        return rearrange(codes, "(b t) -> b t", b=frames.shape[0])

    def flops_per_transition(self, *, backward: bool = True) -> float:
        """Conv FLOPs of one transition through ``forward`` (x3 with the backward pass)."""
        c = self.config
        rows, cols = (side // 2 ** len(c.channels) for side in c.image_size)
        forward = 2 * self.encoder.flops(*c.image_size) // 2 + self.frame_encoder.flops(*c.image_size)
        forward += self.frame_decoder.flops(rows, cols)
        return float(3 * forward if backward else forward)


def latent_action_loss(module: nn.Module, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = module(frames)
    return out.loss, out.metrics


def normalized_mutual_information(labels: np.ndarray, codes: np.ndarray) -> float:
    """``2 I(X; Y) / (H(X) + H(Y))`` of two discrete labelings (0: independent, 1: one determines the other)."""
    labels, codes = np.asarray(labels).ravel(), np.asarray(codes).ravel()
    if labels.shape != codes.shape or not labels.size:
        raise ValueError(f"codes: expected one code per label, got {codes.shape} and {labels.shape}")
    _, x = np.unique(labels, return_inverse=True)
    _, y = np.unique(codes, return_inverse=True)
    joint = np.zeros((x.max() + 1, y.max() + 1))
    np.add.at(joint, (x, y), 1.0)
    joint /= joint.sum()
    px, py = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * np.log(joint[nonzero] / np.outer(px, py)[nonzero])).sum())
    entropy = float(-(px[px > 0] * np.log(px[px > 0])).sum() - (py[py > 0] * np.log(py[py > 0])).sum())
    return 0.0 if entropy == 0 else max(0.0, 2 * mutual / entropy)
