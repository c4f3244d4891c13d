"""The baseline the RQ-Transformer's speed claim is measured against: one causal transformer over all
``h * w * D`` codes in raster-depth order, decoded by the library's one loop (``core.generation``).

A sequence is ``[start, S_{1,1}, .., S_{1,D}, S_{2,1}, ..]``: the start token is the class token (or
the null-class token, unconditional), so class-conditional sampling is generation after a one-token
prompt. Input ids: codes ``[0, K)``, class ``c`` as ``K + c``, the null class as ``K + num_classes``.

Shape glossary: ``b`` batch, ``n`` tokens, ``N = h * w * D`` codes, ``K`` codebook size, ``c`` model dim.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from quintet.core import KVCache, LearnedPositions, PretrainedModel, RotaryEmbedding, Transformer
from quintet.core.generation import check_token_ids, generate
from quintet.core.validation import check_ids
from quintet.rqtransformer.config import FlatCodeLMConfig, RQTransformerConfig
from quintet.rqtransformer.model import RQTransformer
from quintet.rqtransformer.prior import (
    check_codes,
    class_labels,
    code_cross_entropy,
    drop_classes,
    init_weights,
    sampling_labels,
    stack_flops,
)


class FlatCodeLM(PretrainedModel):
    """``model(ids (b, n), cache=None) -> logits (b, n, K)``: logits at token ``i`` predict the code at ``i + 1``.

    ``sequence(codes, class_ids)`` builds the ids of whole images. In training mode the class token at
    position 0 becomes the null token with probability ``class_dropout``.
    """

    config_class = FlatCodeLMConfig

    def __init__(self, config: FlatCodeLMConfig):
        super().__init__(config)
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.positions = LearnedPositions(config.num_codes, config.dim)  # start + N - 1 codes are ever read
        self.transformer = Transformer(
            config.dim,
            config.layers,
            heads=config.heads,
            dim_head=config.dim_head,
            causal=True,
            ff_mult=config.ff_mult,
            dropout=config.dropout,
            rotary=config.rotary,
            rotary_axes=2,
        )
        self.to_logits = nn.Linear(config.dim, config.codebook_size, bias=False)
        # rotary (row, column) of the code each token carries: token i > 0 holds code i - 1; the start token
        # sits just left of position 0
        h, w, d = config.code_shape
        grid = RotaryEmbedding.grid(h, w).repeat_interleave(d, dim=0)
        self.register_buffer("carried_positions", torch.cat((torch.tensor([[0, -1]]), grid[:-1])), persistent=False)
        init_weights(self)

    def new_cache(self) -> KVCache:
        return KVCache()

    def sequence(self, codes: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[start, codes in raster-depth order]``: ``(b, 1 + N)`` ids (read ``[:, :-1]``, predict ``[:, 1:]``)."""
        return code_sequence(self.config, codes, class_ids)

    def forward(self, ids: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        config = self.config
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache (from new_cache()), got {type(cache).__name__}")
        start = cache.length if cache is not None else 0
        check_token_ids(ids, "ids")
        n = ids.shape[1]
        if n < 1 or start + n > config.num_codes:
            decoded = f", {start} already decoded" if start else ""
            raise ValueError(
                f"ids: expected 1 to {config.num_codes - start} tokens (a start token and at most N - 1 = "
                f"{config.num_codes - 1} codes{decoded}), got shape {tuple(ids.shape)}"
            )
        if not torch.compiler.is_compiling():
            check_ids(ids, "ids", config.num_tokens)
            K = config.codebook_size
            if start == 0 and bool((ids[:, 0] < K).any()):
                raise ValueError(f"ids: position 0 must hold a start token in [{K}, {config.num_tokens})")
            if bool((ids[:, 1 if start == 0 else 0 :] >= K).any()):
                raise ValueError(f"ids: positions after the start token must hold codes in [0, {K})")
        if start == 0 and self.training and config.num_classes and config.class_dropout:
            labels = drop_classes(ids[:, 0] - config.codebook_size, config, training=True)
            ids = torch.cat((labels[:, None] + config.codebook_size, ids[:, 1:]), dim=1)
        x = self.token_emb(ids) + self.positions(torch.arange(start, start + n, device=ids.device))
        rotary = self.carried_positions[start : start + n] if config.rotary else None
        x = self.transformer(x, positions=rotary, cache=cache)
        x = x[0] if cache is not None else x
        return self.to_logits(x)

    def code_logits(self, codes: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits of every code, ``(b, h, w, D, K)``, as :class:`RQTransformer` returns them."""
        ids = self.sequence(codes, class_ids)
        h, w, d = self.config.code_shape
        return rearrange(self(ids[:, :-1]), "b (h w d) k -> b h w d k", h=h, w=w, d=d)

    def loss(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return code_cross_entropy(logits, codes, label_smoothing=self.config.label_smoothing)

    def flops_per_sample(self) -> float:
        """Forward + backward matmul FLOPs of one image's codes (backward = 2 x forward)."""
        config = self.config
        n = config.num_codes
        body = stack_flops(config, layers=config.layers, tokens=n, context=n)
        return 3.0 * (body + 2 * config.dim * config.codebook_size * n)

    @torch.inference_mode()
    def generate(
        self,
        class_ids: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample codes ``(b, h, w, D)`` for ``class_ids (b,)`` or ``batch_size`` unconditional samples,
        one code per step after the start token (``core.generation.generate``)."""
        config = self.config
        device = self.to_logits.weight.device
        labels, b = sampling_labels(config, class_ids, batch_size, None, device)
        prompt = start_tokens(config, labels, b, device)
        codes = generate(
            self,
            prompt,
            config.num_codes,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            use_cache=use_cache,
        )
        h, w, d = config.code_shape
        return rearrange(codes, "b (h w d) -> b h w d", h=h, w=w, d=d)


def start_tokens(config: FlatCodeLMConfig, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """``(b, 1)`` start ids: class ``c`` is ``K + c``; the null class (unconditional) ``K + num_classes``."""
    if labels is None:
        return torch.full((batch, 1), config.codebook_size + config.num_classes, dtype=torch.long, device=device)
    return (labels + config.codebook_size)[:, None]


def code_sequence(config: FlatCodeLMConfig, codes: torch.Tensor, class_ids: torch.Tensor | None) -> torch.Tensor:
    """``[start, codes in raster-depth order]`` ids ``(b, 1 + N)`` of whole images."""
    check_codes(codes, config)
    labels = class_labels(class_ids, config, codes.shape[0], codes.device)
    return torch.cat((start_tokens(config, labels, codes.shape[0], codes.device), codes.flatten(1)), dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_parameters(model_class: type[PretrainedModel], config) -> int:
    with torch.device("meta"):
        return count_parameters(model_class(config))


def flat_baseline(config: RQTransformerConfig) -> FlatCodeLMConfig:
    """The flat code LM closest in parameter count to the RQ-Transformer of ``config`` (same width, heads,
    code grid, classes and training options; only the number of layers is chosen)."""
    if not isinstance(config, RQTransformerConfig):
        raise TypeError(f"config: expected an RQTransformerConfig, got {type(config).__name__}")
    target = _meta_parameters(RQTransformer, config)

    def flat(layers: int) -> FlatCodeLMConfig:
        return FlatCodeLMConfig(
            codebook_size=config.codebook_size,
            code_shape=config.code_shape,
            num_classes=config.num_classes,
            class_dropout=config.class_dropout,
            dim=config.dim,
            heads=config.heads,
            dim_head=config.dim_head,
            ff_mult=config.ff_mult,
            dropout=config.dropout,
            label_smoothing=config.label_smoothing,
            layers=layers,
            rotary=config.spatial_rotary,
        )

    one, two = _meta_parameters(FlatCodeLM, flat(1)), _meta_parameters(FlatCodeLM, flat(2))
    per_layer = two - one
    layers = max(1, round((target - (one - per_layer)) / per_layer))  # parameters grow linearly with layers
    return flat(layers)
