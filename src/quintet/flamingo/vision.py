"""The vision side of Flamingo: a small image encoder (conv net or ViT) and the Perceiver resampler.

The resampler (Alayrac et al. 2022, section 2.1 and appendix A.1.1) turns the variable number of
patch features of one media item (an image, or the frames of a video) into a fixed number of
visual tokens: learned latents cross-attend to the features concatenated with the latents
themselves, then pass a feed-forward layer, ``depth`` times.

Shape glossary: ``b`` batch, ``m`` media per sample, ``f`` frames per media, ``p`` patches per
frame, ``l`` latents, ``d`` feature dim, ``c`` image channels, ``h``/``w`` image height/width.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from quintet.core import Attention, FeedForward, PretrainedModel, Transformer, make_norm
from quintet.core.validation import check_int, check_tensor
from quintet.flamingo.config import ImageClassifierConfig, VisionConfig
from quintet.flamingo.flops import classifier_flops


def _check_images(images: torch.Tensor, config: VisionConfig) -> None:
    c, s = config.channels, config.image_size
    check_tensor(images, "images", ndim=4, dtype="float")
    if tuple(images.shape[1:]) != (c, s, s):
        raise ValueError(f"images: expected (N, {c}, {s}, {s}) pixels, got shape {tuple(images.shape)}")


class ConvEncoder(nn.Module):
    """Conv net: ``images (N, c, h, w)`` in [0, 1] -> ``(N, 1 + h' * w', d)``: the global max-pool of its
    last feature map (a summary token, as a ViT's class token), then the map's cells.

    Each stage is conv 3x3 -> group norm -> GELU -> 2x2 max-pool. On the embedded 32 x 32 shapes it
    learns the classes in a few hundred steps on a CPU, where a ViT of the same cost needs thousands
    (measured): the demo's encoder.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        widths = [config.dim // 2] + [config.dim] * (config.depth - 1)
        layers: list[nn.Module] = []
        for width_in, width in zip([config.channels, *widths[:-1]], widths):
            layers += [nn.Conv2d(width_in, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU(), nn.MaxPool2d(2)]
        self.stages = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.config)
        cells = rearrange(self.stages(images * 2 - 1), "n d h w -> n (h w) d")
        return torch.cat((cells.amax(dim=1, keepdim=True), cells), dim=1)


class VisionTransformer(nn.Module):
    """ViT: ``images (N, c, h, w)`` in [0, 1] -> patch features ``(N, p, d)``.

    Linear patch embedding plus a learned position per patch, then a bidirectional core transformer.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        patch_dim = config.channels * config.patch_size**2
        self.to_patch = nn.Linear(patch_dim, config.dim)
        self.positions = nn.Parameter(torch.randn(config.tokens_per_image, config.dim) * 0.02)
        self.transformer = Transformer(
            config.dim,
            config.depth,
            heads=config.heads,
            dim_head=config.dim_head,
            ff_mult=config.ff_mult,
            norm="layer",
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.config)
        size = self.config.patch_size
        patches = rearrange(images, "n c (h p1) (w p2) -> n (h w) (p1 p2 c)", p1=size, p2=size)
        x = self.to_patch(patches * 2 - 1) + self.positions  # pixels to [-1, 1], then patch embedding
        return self.transformer(x)


def vision_encoder(config: VisionConfig) -> ConvEncoder | VisionTransformer:
    return ConvEncoder(config) if config.kind == "conv" else VisionTransformer(config)


class ImageClassifier(PretrainedModel):
    """``model(images (N, c, h, w)) -> class logits (N, classes)``: a linear head on a summary of the
    encoder's features: the conv net's global max-pool token (a shape may sit anywhere in the image),
    a ViT's mean over patches. Pre-trains Flamingo's encoder, as
    the paper's encoder is pre-trained (contrastively) before Flamingo freezes it."""

    config_class = ImageClassifierConfig

    def __init__(self, config: ImageClassifierConfig):
        super().__init__(config)
        self.encoder = vision_encoder(config.vision)
        self.head = nn.Linear(config.vision.dim, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        return self.head(features[:, 0] if self.config.vision.kind == "conv" else features.mean(dim=1))

    def train_flops(self, batch_size: int) -> float:
        """Convolution / matmul FLOPs of one forward + backward pass over ``batch_size`` images."""
        return classifier_flops(self.config, batch_size)


class PerceiverResampler(nn.Module):
    """``features (b, m, [f,] p, d)`` -> visual tokens ``(b, m, l, d)``, a fixed ``l`` per media item.

    ``forward(features, media_mask=None)``: ``media_mask (b, m)`` marks real media (True); the
    tokens of padding media are zero. Each media item is resampled on its own, so padding never
    changes a real item's tokens. Frames of one item share its latents and are told apart by
    learned time embeddings. ``qk_norm``: RMS-normalised queries and keys (``FlamingoConfig.qk_norm``).
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 2,
        num_latents: int = 64,
        heads: int = 4,
        dim_head: int = 32,
        max_frames: int = 1,
        ff_mult: float = 4.0,
        qk_norm: bool = False,
    ):
        super().__init__()
        for value, name in ((dim, "dim"), (depth, "depth"), (num_latents, "num_latents"), (max_frames, "max_frames")):
            check_int(value, name, minimum=1)
        self.dim, self.max_frames = dim, max_frames
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.time_embeddings = nn.Parameter(torch.randn(max_frames, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "media_norm": make_norm("layer", dim),
                    "latent_norm": make_norm("layer", dim),
                    "attn": Attention(dim, dim_context=dim, heads=heads, dim_head=dim_head, qk_norm=qk_norm),
                    "ff_norm": make_norm("layer", dim),
                    "ff": FeedForward(dim, ff_mult, activation="gelu"),
                }
            )
            for _ in range(depth)
        )
        self.norm = make_norm("layer", dim)

    def forward(self, features: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor(features, "features", ndim=(4, 5), dtype="float")
        if features.ndim == 4:
            features = rearrange(features, "b m p d -> b m 1 p d")
        b, m, f, _, d = features.shape
        if d != self.dim:
            raise ValueError(f"features: expected feature dim {self.dim}, got shape {tuple(features.shape)}")
        if f > self.max_frames:
            raise ValueError(f"features: {f} frames per media item exceed max_frames={self.max_frames}")
        if media_mask is not None:
            check_tensor(media_mask, "media_mask", ndim=2, dtype="bool")
            if tuple(media_mask.shape) != (b, m):
                raise ValueError(f"media_mask: expected shape (b={b}, m={m}), got {tuple(media_mask.shape)}")

        x = features + rearrange(self.time_embeddings[:f], "f d -> f 1 d")  # time embeddings of the frames
        x = rearrange(x, "b m f p d -> (b m) (f p) d")  # each media item attends only to its own frames
        latents = repeat(self.latents, "l d -> n l d", n=b * m)
        for layer in self.layers:
            queries = layer["latent_norm"](latents)
            # eq. (A.1): keys and values are the media features concatenated with the latents
            context = torch.cat((layer["media_norm"](x), queries), dim=1)
            latents = latents + layer["attn"](queries, context)  # X <- X + Attention(q=X, kv=[X_f; X])
            latents = latents + layer["ff"](layer["ff_norm"](latents))  # X <- X + FFW(X)
        tokens = rearrange(self.norm(latents), "(b m) l d -> b m l d", b=b)
        if media_mask is not None:
            tokens = tokens * media_mask[:, :, None, None].to(tokens.dtype)
        return tokens
