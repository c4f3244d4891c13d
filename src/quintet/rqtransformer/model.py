"""RQ-Transformer (Lee et al. 2022, sec. 3.2): an autoregressive prior over residual codes ``(h, w, D)``.

The ``T = h * w`` positions are read in raster order, the ``D`` codes of a position coarse to fine:

    u_1 = start (the class embedding, or a learned token)              # eq. 5: spatial inputs
    u_t = PE_T(t) + sum_d e(S_{t-1, d})                   (t > 1)
    h_t = SpatialTransformer(u_1 .. u_t)                               # causal over positions
    v_{t,1} = PE_D(1) + h_t                                            # eq. 6: depth inputs
    v_{t,d} = PE_D(d) + sum_{d' < d} e(S_{t,d'})          (d > 1)     # 'cumulative' (the paper's)
            = PE_D(d) + e(S_{t,d-1})                                   # or 'individual'
    p(S_{t,d} | S_{<t}, S_{t,<d}) = softmax over K of W DepthTransformer(v_{t,1} .. v_{t,d})  # eq. 7

So the large spatial transformer runs over ``h * w`` positions only, and the small depth transformer
over ``D`` codes, instead of one transformer over ``h * w * D`` codes (:class:`FlatCodeLM`). Both
stacks are ``quintet.core.Transformer``; sampling decodes each with its own ``KVCache``.

Options beyond the paper: class conditioning by FiLM of the spatial stack instead of the start token;
2-D axial rotary positions in the spatial attention (``spatial_rotary``), so attention scores see the
(row, column) offset between positions and a shape learned at one place is recognised anywhere.

Shape glossary: ``b`` batch, ``h, w`` code grid, ``t`` positions (``T = h * w``), ``D`` depth,
``K`` codebook size, ``c`` model dim.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from quintet.core import KVCache, LearnedPositions, PretrainedModel, RotaryEmbedding, Transformer
from quintet.core.sampling import sample
from quintet.rqtransformer.config import RQTransformerConfig
from quintet.rqtransformer.prior import (
    check_codes,
    class_labels,
    code_cross_entropy,
    drop_classes,
    guide,
    init_weights,
    sampling_labels,
    stack_flops,
)


class RQTransformer(PretrainedModel):
    """``model(codes (b, h, w, D), class_ids (b,) | None) -> logits (b, h, w, D, K)``.

    Logits at ``(t, d)`` predict code ``(t, d)`` from the codes before it in raster-depth order
    (teacher forcing). ``class_ids`` None on a class-conditional model means the null class
    (unconditional). In training mode the class is dropped with probability ``class_dropout``.
    """

    config_class = RQTransformerConfig

    def __init__(self, config: RQTransformerConfig):
        super().__init__(config)
        K, D, dim = config.codebook_size, config.depth, config.dim
        tables = 1 if config.shared_code_embedding else D
        self.code_emb = nn.Embedding(K * tables, dim)
        self.register_buffer(
            "depth_offsets", torch.arange(D) * K if tables > 1 else torch.zeros(D, dtype=torch.long), persistent=False
        )
        self.film = config.num_classes > 0 and config.class_conditioning == "film"
        # the last row is the null class: unconditional samples and classifier-free guidance
        self.class_emb = nn.Embedding(config.num_classes + 1, dim) if config.num_classes else None
        self.start = nn.Parameter(torch.zeros(dim)) if self.class_emb is None or self.film else None
        self.spatial_pos = LearnedPositions(config.num_positions, dim)
        self.depth_pos = LearnedPositions(D, dim)
        stack = dict(
            heads=config.heads, dim_head=config.dim_head, causal=True, ff_mult=config.ff_mult, dropout=config.dropout
        )
        # FiLM conditions the spatial stack; its outputs carry the class into the depth stack
        self.spatial = Transformer(
            dim,
            config.spatial_layers,
            dim_cond=dim if self.film else None,
            rotary=config.spatial_rotary,
            rotary_axes=2,
            **stack,
        )
        # rotary (row, column) of the codes each spatial token carries: token t holds position t - 1's codes,
        # the start token sits just left of position 0
        h, w, _ = config.code_shape
        carried = torch.cat((torch.tensor([[0, -1]]), RotaryEmbedding.grid(h, w)[:-1]))
        self.register_buffer("carried_positions", carried, persistent=False)
        self.depth_transformer = Transformer(dim, config.depth_layers, **stack)
        self.to_logits = nn.Linear(dim, K, bias=False)
        init_weights(self)

    # ---- pieces shared by the training forward and the decoding loop

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code embeddings ``e(S)``: codes ``(..., D)`` -> ``(..., D, c)``."""
        return self.code_emb(codes + self.depth_offsets)

    def _condition(self, labels: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The spatial start token ``(b, c)`` and the FiLM conditioning ``(b, c)`` (None without FiLM)."""
        if labels is None:
            return repeat(self.start, "c -> b c", b=batch), None
        classes = self.class_emb(labels)
        if self.film:
            return repeat(self.start, "c -> b c", b=batch), classes
        return classes, None

    def _rotary(self, start: int, end: int) -> torch.Tensor | None:
        """2-D rotary positions of spatial tokens ``start .. end - 1`` (None without spatial rotary)."""
        return self.carried_positions[start:end] if self.config.spatial_rotary else None

    def _depth_inputs(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """``v (b, t, D, c)`` from spatial outputs ``h (b, t, c)`` and code embeddings ``e (b, t, D, c)``."""
        earlier = embedded.cumsum(dim=2) if self.config.depth_input == "cumulative" else embedded
        v = torch.cat((hidden[:, :, None], earlier[:, :, :-1]), dim=2)  # eq. 6: h_t, then codes of depths < d
        return v + self.depth_pos(self.config.depth)

    # ---- training: every code in parallel

    def forward(self, codes: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        check_codes(codes, config)
        b, h, w, _ = codes.shape
        labels = drop_classes(class_labels(class_ids, config, b, codes.device), config, self.training)
        start, cond = self._condition(labels, b)

        embedded = rearrange(self.embed_codes(codes), "b h w d c -> b (h w) d c")
        previous = embedded[:, :-1].sum(dim=2)  # sum_d e(S_{t-1, d})
        u = torch.cat((start[:, None], previous), dim=1) + self.spatial_pos(config.num_positions)  # eq. 5
        hidden = self.spatial(u, cond=cond, positions=self._rotary(0, config.num_positions))

        v = rearrange(self._depth_inputs(hidden, embedded), "b t d c -> (b t) d c")
        logits = self.to_logits(self.depth_transformer(v))
        return rearrange(logits, "(b h w) d k -> b h w d k", b=b, h=h, w=w)

    def loss(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over every code (nats per code), with the config's label smoothing."""
        return code_cross_entropy(logits, codes, label_smoothing=self.config.label_smoothing)

    def flops_per_sample(self) -> float:
        """Forward + backward matmul FLOPs of one image's codes (backward = 2 x forward)."""
        config = self.config
        T, D = config.num_positions, config.depth
        spatial = stack_flops(
            config, layers=config.spatial_layers, tokens=T, context=T, dim_cond=config.dim if self.film else None
        )
        depth = stack_flops(config, layers=config.depth_layers, tokens=T * D, context=D)
        head = 2 * config.dim * config.codebook_size * T * D
        return 3.0 * (spatial + depth + head)

    # ---- sampling: one position per spatial step, then its D codes

    @torch.inference_mode()
    def generate(
        self,
        class_ids: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sample codes ``(b, h, w, D)`` for ``class_ids (b,)``, or ``batch_size`` unconditional samples.

        ``temperature=0`` is greedy; ``top_k`` / ``top_p`` filter each code's distribution.
        ``cfg_scale`` applies classifier-free guidance (1 = plain conditional sampling). With
        ``use_cache`` each transformer decodes one token per step with a ``KVCache``; without, every
        step recomputes the stack over all its inputs so far (same codes, the benchmark's reference).
        ``return_logits`` also returns the (guided) logits of every code, ``(b, h, w, D, K)``.
        """
        config = self.config
        device = self.to_logits.weight.device
        labels, b = sampling_labels(config, class_ids, batch_size, cfg_scale, device)
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache: expected a bool, got {use_cache!r}")
        if cfg_scale is not None:  # rows [conditional; unconditional], both fed the same sampled codes
            labels = torch.cat((labels, torch.full_like(labels, config.num_classes)))
        rows = b if cfg_scale is None else 2 * b
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        T, D = config.num_positions, config.depth
        spatial_pos, depth_pos = self.spatial_pos(T), self.depth_pos(D)
        cumulative = config.depth_input == "cumulative"

        was_training = self.training
        self.eval()
        try:
            start, cond = self._condition(labels, rows)
            codes = torch.zeros(b, T, D, dtype=torch.long, device=device)
            scores = []
            spatial_cache = KVCache() if use_cache else None
            # one depth cache, emptied at every position: its buffers are allocated once, not T times
            depth_cache = KVCache() if use_cache else None
            spatial_inputs = None  # without a cache: u_1 .. u_t
            u = (start + spatial_pos[0])[:, None]
            for t in range(T):
                # spatial step: h_t from u_t (cached) or from u_1 .. u_t (recomputed)
                if use_cache:
                    hidden = self.spatial(u, cond=cond, positions=self._rotary(t, t + 1), cache=spatial_cache)[0][:, -1]
                else:
                    spatial_inputs = u if spatial_inputs is None else torch.cat((spatial_inputs, u), dim=1)
                    hidden = self.spatial(spatial_inputs, cond=cond, positions=self._rotary(0, t + 1))[:, -1]

                # depth steps: the D codes of position t, each from v_{t,1} .. v_{t,d}
                if use_cache:
                    depth_cache.crop(0)
                depth_inputs = None
                v = (hidden + depth_pos[0])[:, None]
                code_sum = torch.zeros_like(hidden)
                for d in range(D):
                    if use_cache:
                        out = self.depth_transformer(v, cache=depth_cache)[0][:, -1]
                    else:
                        depth_inputs = v if depth_inputs is None else torch.cat((depth_inputs, v), dim=1)
                        out = self.depth_transformer(depth_inputs)[:, -1]
                    logits = guide(self.to_logits(out), cfg_scale)
                    code = sample(logits, **options)
                    codes[:, t, d] = code
                    if return_logits:
                        scores.append(logits)
                    embedded = self.code_emb(code + self.depth_offsets[d])
                    if cfg_scale is not None:
                        embedded = torch.cat((embedded, embedded))
                    code_sum = code_sum + embedded
                    if d + 1 < D:
                        v = ((code_sum if cumulative else embedded) + depth_pos[d + 1])[:, None]  # eq. 6
                if t + 1 < T:
                    u = (code_sum + spatial_pos[t + 1])[:, None]  # eq. 5
        finally:
            self.train(was_training)

        h, w, _ = config.code_shape
        codes = rearrange(codes, "b (h w) d -> b h w d", h=h, w=w)
        if not return_logits:
            return codes
        logits = rearrange(torch.stack(scores, dim=1), "b (h w d) k -> b h w d k", h=h, w=w, d=D)
        return codes, logits
