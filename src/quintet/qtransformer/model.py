"""Q-Transformer (Chebotar et al. 2023): per-action-dimension discretised Q-functions on a transformer.

Observation frames are encoded (MaxViT for images, an MLP for state vectors), pooled into a few
tokens per frame by a TokenLearner, and mixed by a transformer whose attention is frame-causal (a
token of frame t sees frames <= t). A Q head turns the tokens into Q-values:

- one action dimension: pooled tokens -> ``action_bins`` Q-values (optionally dueling);
- ``d`` action dimensions: an autoregressive decoder whose token ``i`` is the embedding of the bin
  chosen for dimension ``i`` (a start token first) and whose output ``i`` scores the bins of
  dimension ``i + 1``: ``Q(s, a_1..a_i, .)``. Greedy decoding picks one dimension at a time with a
  key/value cache; ``forward`` computes the same numbers teacher-forced on given actions.

Q-values are sigmoids in [0, 1], so rewards must be scaled into [0, 1] (see ``data.RewardScaler``).

Shape glossary: ``b`` batch, ``c`` channels, ``f`` frames, ``h``/``w`` image height/width, ``s`` state
dim, ``n`` learned tokens per frame, ``d`` model dim, ``k`` action dimensions given, ``a`` action
bins, ``e`` text-embedding dim.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from einops import einsum, rearrange, repeat
from torch import nn

from quintet.core import ConditionedNorm, KVCache, PretrainedModel, RMSNorm, SinusoidalPositions, Transformer
from quintet.core.validation import check_ids, check_tensor
from quintet.qtransformer.config import MaxViTConfig, QTransformerConfig, StateEncoderConfig
from quintet.qtransformer.instructions import InstructionEncoder
from quintet.qtransformer.maxvit import MaxViT
from quintet.qtransformer.token_learner import TokenLearner


class StateEncoder(nn.Module):
    """``forward(states (b, s), cond (b, e) | None) -> feature map (b, d, 1, num_tokens)``: residual MLP."""

    def __init__(self, config: StateEncoderConfig, *, dim_cond: int | None = None):
        super().__init__()
        self.config, self.dim_cond, self.embed_dim = config, dim_cond, config.embed_dim
        self.proj_in = nn.Linear(config.state_dim, config.dim)
        self.norms = nn.ModuleList(
            ConditionedNorm("rms", config.dim, dim_cond) if dim_cond else RMSNorm(config.dim)
            for _ in range(config.depth)
        )
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(config.dim, config.dim * 2), nn.SiLU(), nn.Linear(config.dim * 2, config.dim))
            for _ in range(config.depth)
        )
        self.to_tokens = nn.Linear(config.dim, config.dim * config.num_tokens)

    def forward(self, states: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor(states, "states", ndim=2, dtype="float")
        if states.shape[-1] != self.config.state_dim:
            raise ValueError(f"states: expected (b, {self.config.state_dim}), got {tuple(states.shape)}")
        if (cond is None) != (self.dim_cond is None):
            raise ValueError("cond: needed exactly when the encoder is built with dim_cond")
        x = self.proj_in(states)[:, None]  # (b, 1, d): the token layout the norms expect
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x, cond) if self.dim_cond else norm(x))
        return rearrange(self.to_tokens(x), "b 1 (d n) -> b d 1 n", n=self.config.num_tokens)


def _dueling(values: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Dueling architecture (Wang et al. 2016): Q = V + A - mean(A)."""
    return values + advantages - advantages.mean(dim=-1, keepdim=True)


class SingleActionQHead(nn.Module):
    """Pooled frame tokens -> Q logits over the bins of the one action dimension."""

    def __init__(self, config: QTransformerConfig):
        super().__init__()
        self.norm = RMSNorm(config.dim)
        if config.dueling:
            self.stem = nn.Sequential(nn.Linear(config.dim, config.dim * 2), nn.SiLU())
            self.to_values = nn.Linear(config.dim * 2, 1)
            self.to_advantages = nn.Linear(config.dim * 2, config.action_bins)
        else:
            self.to_q = nn.Linear(config.dim, config.action_bins)
        self.dueling = config.dueling

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(tokens.mean(dim=1))
        if not self.dueling:
            return self.to_q(pooled)
        hidden = self.stem(pooled)
        return _dueling(self.to_values(hidden), self.to_advantages(hidden))


class AutoregressiveQHead(nn.Module):
    """Causal decoder over action dimensions, cross-attending to the frame tokens.

    Input token 0 is a start token (mean of the frame tokens); input token ``i`` (1-based) embeds the
    bin chosen for dimension ``i``. Output ``i`` scores the bins of dimension ``i + 1`` by a dot
    product with that dimension's output bin embeddings; with weight tying these are the input
    embeddings of the same dimension (the table that will embed the bin once chosen).
    """

    def __init__(self, config: QTransformerConfig):
        super().__init__()
        self.num_actions, self.action_bins = config.num_actions, config.action_bins
        self.bin_embeddings = nn.Parameter(torch.randn(config.num_actions, config.action_bins, config.dim) * 0.02)
        self.output_embeddings = (
            None
            if config.weight_tie_action_bin_embed
            else nn.Parameter(torch.randn(config.num_actions, config.action_bins, config.dim) * 0.02)
        )
        self.q_bias = nn.Parameter(torch.zeros(config.num_actions, config.action_bins))
        self.to_values = nn.Parameter(torch.zeros(config.num_actions, config.dim)) if config.dueling else None
        self.decoder = Transformer(
            config.dim,
            config.q_head_depth,
            heads=config.q_head_heads,
            dim_head=config.q_head_dim_head,
            causal=True,
            dim_context=config.dim,
            dropout=config.dropout,
        )

    def start_token(self, context: torch.Tensor) -> torch.Tensor:
        return context.mean(dim=1, keepdim=True)

    def embed_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """``actions (b, k)`` bins of dimensions ``0..k-1`` -> their input embeddings ``(b, k, d)``."""
        dims = torch.arange(actions.shape[1], device=actions.device)
        return self.bin_embeddings[dims, actions]

    def q_logits(self, hidden: torch.Tensor, first_dim: int) -> torch.Tensor:
        """Decoder outputs ``(b, k, d)`` for dimensions ``first_dim..first_dim+k-1`` -> logits ``(b, k, a)``."""
        dims = slice(first_dim, first_dim + hidden.shape[1])
        table = self.bin_embeddings if self.output_embeddings is None else self.output_embeddings
        logits = einsum(hidden, table[dims], "b k d, k a d -> b k a") + self.q_bias[dims]
        if self.to_values is None:
            return logits
        values = einsum(hidden, self.to_values[dims], "b k d, k d -> b k")
        return _dueling(rearrange(values, "b k -> b k 1"), logits)

    def forward(self, context: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
        """Teacher-forced logits ``(b, min(k + 1, num_actions), a)`` given the bins of the first ``k`` dims."""
        tokens = self.start_token(context)
        if actions is not None and actions.shape[1]:
            given = actions[:, : self.num_actions - 1]  # the last dimension's bin conditions nothing
            tokens = torch.cat((tokens, self.embed_bins(given)), dim=1)
        return self.q_logits(self.decoder(tokens, context=context), first_dim=0)

    def decode(
        self,
        context: torch.Tensor,
        *,
        guide,
        use_cache: bool = True,
        forced: torch.Tensor | None = None,
        forced_bins: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one bin per dimension, argmax of the (guided) logits unless ``forced`` says otherwise.

        ``guide`` maps decoder logits (rows of the context batch) to the logits of the ``b`` samples
        (classifier-free guidance halves the batch). Returns bins ``(b, num_actions)`` and their
        logits ``(b, num_actions, a)``.
        """
        repeats = context.shape[0]
        cache = KVCache() if use_cache else None
        tokens = self.start_token(context)
        chosen, all_logits = [], []
        for dim in range(self.num_actions):
            if cache is not None:
                hidden, cache = self.decoder(tokens[:, -1:], context=context, cache=cache)
            else:
                hidden = self.decoder(tokens, context=context)
            logits = guide(self.q_logits(hidden[:, -1:], first_dim=dim)[:, 0])
            bins = logits.argmax(dim=-1)
            if forced is not None:
                bins = torch.where(forced[:, dim], forced_bins[:, dim], bins)
            chosen.append(bins)
            all_logits.append(logits)
            if dim + 1 < self.num_actions:
                embedded = self.bin_embeddings[dim, bins]
                embedded = repeat(embedded, "b d -> (r b) 1 d", r=repeats // bins.shape[0])
                tokens = torch.cat((tokens, embedded), dim=1)
        return torch.stack(chosen, dim=1), torch.stack(all_logits, dim=1)


@contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class QTransformer(PretrainedModel):
    """``model(obs, actions=None, text_embeds=None, cond_scale=1.0, text_ids=None)`` -> Q-values in [0, 1].

    - ``obs``: images ``(b, c, f, h, w)`` or states ``(b, f, s)``, ``f <= config.frames``.
    - ``actions``: bins ``(b, k)`` (``(b,)`` for one dimension). Several dimensions return
      ``(b, min(k + 1, num_actions), a)`` whose entry ``i`` is ``Q(s, a_1..a_i, .)`` (0-based: the
      bins of dimension ``i`` given the actions before it); one dimension returns ``(b, a)``.
    - ``text_embeds (b, e)``: required exactly when ``condition_on_text``. In training, each is
      replaced by a learned null embedding with probability ``cond_drop_prob``; ``cond_scale != 1``
      applies classifier-free guidance ``null + cond_scale * (text - null)`` to the Q logits.
    - ``text_ids (b, L)``: instead of ``text_embeds``, the instruction's word ids
      (:meth:`tokenize`) for a model with its own ``instruction_encoder``.
    """

    config_class = QTransformerConfig

    def __init__(self, config: QTransformerConfig):
        super().__init__(config)
        dim_cond = config.text_embed_dim if config.condition_on_text else None
        if isinstance(config.encoder, MaxViTConfig):
            self.encoder = MaxViT(config.encoder, dim_cond=dim_cond)
        else:
            self.encoder = StateEncoder(config.encoder, dim_cond=dim_cond)
        self.token_learner = TokenLearner(
            config.dim, num_tokens=config.num_learned_tokens, ff_mult=config.token_learner_ff_mult
        )
        self.frame_positions = SinusoidalPositions(config.dim)
        self.transformer = Transformer(
            config.dim,
            config.depth,
            heads=config.heads,
            dim_head=config.dim_head,
            dim_cond=dim_cond,
            dropout=config.dropout,
        )
        self.null_text_embed = nn.Parameter(torch.zeros(config.text_embed_dim)) if dim_cond else None
        self.instruction_encoder = (
            InstructionEncoder(config.instruction_encoder) if config.instruction_encoder is not None else None
        )
        self.q_head = SingleActionQHead(config) if config.num_actions == 1 else AutoregressiveQHead(config)

    @classmethod
    def with_encoder(cls, config: QTransformerConfig, encoder: nn.Module) -> QTransformer:
        """A Q-Transformer on a custom observation encoder.

        ``encoder`` is any module with ``embed_dim == config.dim`` that maps one frame per row, as
        ``config.encoder`` describes the observations (``(b, c, h, w)`` images or ``(b, s)`` states),
        to a feature map ``(b, embed_dim, h', w')``; a text-conditioned model calls it as
        ``encoder(x, cond)``. ``save_pretrained`` stores its weights; to reload, build the model with
        ``with_encoder`` again and load the weights into it.
        """
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder: expected an nn.Module, got {type(encoder).__name__}")
        if getattr(encoder, "embed_dim", None) != config.dim:
            raise ValueError(
                f"encoder: needs an embed_dim attribute equal to config.dim={config.dim}, "
                f"got {getattr(encoder, 'embed_dim', None)!r}"
            )
        model = cls(config)
        model.encoder = encoder
        return model

    @property
    def single_action(self) -> bool:
        return self.config.num_actions == 1

    # ---------------------------------------------------------------- input checks

    def _check_obs(self, obs: torch.Tensor) -> None:
        config = self.config
        if config.is_image:
            check_tensor(obs, "obs", ndim=5, dtype="float")
            channels = config.encoder.channels
            if obs.shape[1] != channels or not 1 <= obs.shape[2] <= config.frames:
                raise ValueError(
                    f"obs: expected images (b, {channels}, frames <= {config.frames}, h, w), got {tuple(obs.shape)}"
                )
        else:
            check_tensor(obs, "obs", ndim=3, dtype="float")
            state_dim = config.encoder.state_dim
            if obs.shape[2] != state_dim or not 1 <= obs.shape[1] <= config.frames:
                raise ValueError(
                    f"obs: expected states (b, frames <= {config.frames}, {state_dim}), got {tuple(obs.shape)}"
                )

    def _check_actions(self, actions: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if actions is None:
            return None
        check_ids(actions, "actions", self.config.action_bins)
        if self.single_action:
            if actions.shape not in ((batch,), (batch, 1)):
                raise ValueError(f"actions: one action dimension takes bins (b={batch},), got {tuple(actions.shape)}")
            return actions
        if actions.ndim != 2 or actions.shape[0] != batch or actions.shape[1] > self.config.num_actions:
            raise ValueError(
                f"actions: expected bins (b={batch}, k <= {self.config.num_actions}), got {tuple(actions.shape)}"
            )
        return actions

    def tokenize(self, instructions: list[str]) -> torch.Tensor:
        """Instructions -> the word ids ``(b, L)`` its instruction encoder reads (on the model's device)."""
        if self.instruction_encoder is None:
            raise ValueError("instructions: this model has no instruction_encoder; pass text_embeds")
        return self.instruction_encoder.tokenize(instructions).to(self.null_text_embed.device)

    def _text_condition(
        self, text_embeds: torch.Tensor | None, text_ids: torch.Tensor | None, batch: int, *, drop: bool
    ) -> torch.Tensor | None:
        if not self.config.condition_on_text:
            if text_embeds is not None or text_ids is not None:
                name = "text_embeds" if text_embeds is not None else "text_ids"
                raise ValueError(f"{name}: this model is not text-conditioned (condition_on_text=False)")
            return None
        if text_ids is not None:
            if self.instruction_encoder is None:
                raise ValueError("text_ids: this model has no instruction_encoder; pass text_embeds")
            if text_embeds is not None:
                raise ValueError("text_ids: give the instruction once, as text_ids or as text_embeds")
            check_tensor(text_ids, "text_ids", ndim=2, dtype="int")
            if text_ids.shape[0] != batch:
                raise ValueError(f"text_ids: expected word ids (b={batch}, L), got {tuple(text_ids.shape)}")
            text_embeds = self.instruction_encoder(text_ids)
        if text_embeds is None:
            raise ValueError(
                "text_ids: required (an instruction's word ids), the model encodes instructions itself"
                if self.instruction_encoder is not None
                else "text_embeds: required, the model is text-conditioned (condition_on_text=True)"
            )
        check_tensor(text_embeds, "text_embeds", ndim=2, dtype="float")
        if tuple(text_embeds.shape) != (batch, self.config.text_embed_dim):
            raise ValueError(
                f"text_embeds: expected (b={batch}, {self.config.text_embed_dim}), got {tuple(text_embeds.shape)}"
            )
        if drop and self.config.cond_drop_prob > 0:
            dropped = torch.rand(batch, 1, device=text_embeds.device) < self.config.cond_drop_prob
            text_embeds = torch.where(dropped, self.null_text_embed.to(text_embeds.dtype), text_embeds)
        return text_embeds

    # ---------------------------------------------------------------- state encoding

    def frame_mask(self, frames: int, device: torch.device | None = None) -> torch.Tensor:
        """``(f n, f n)`` boolean mask, True where a token of frame t may see a token of frame <= t."""
        frame_of = torch.arange(frames, device=device).repeat_interleave(self.config.num_learned_tokens)
        return frame_of[:, None] >= frame_of[None, :]

    def encode_state(self, obs: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Observations + condition ``(b, e) | None`` -> frame tokens ``(b, f, n, d)``."""
        if self.config.is_image:
            b, frames = obs.shape[0], obs.shape[2]
            flat = rearrange(obs, "b c f h w -> (b f) c h w")
        else:
            b, frames = obs.shape[0], obs.shape[1]
            flat = rearrange(obs, "b f s -> (b f) s")
        frame_cond = repeat(cond, "b e -> (b f) e", f=frames) if cond is not None else None
        feature_map = self.encoder(flat) if frame_cond is None else self.encoder(flat, frame_cond)
        tokens = self.token_learner(feature_map)
        tokens = rearrange(tokens, "(b f) n d -> b f n d", b=b)
        tokens = tokens + rearrange(self.frame_positions(frames).to(tokens.dtype), "f d -> f 1 d")
        flat_tokens = rearrange(tokens, "b f n d -> b (f n) d")
        mixed = self.transformer(flat_tokens, attn_mask=self.frame_mask(frames, obs.device), cond=cond)
        return rearrange(mixed, "b (f n) d -> b f n d", f=frames)

    def _guided_contexts(self, obs, text_embeds, cond_scale, *, drop, text_ids=None):
        """Frame tokens ``(r b, f n, d)`` and the map from head logits to guided logits of ``b`` rows."""
        b = obs.shape[0]
        cond = self._text_condition(text_embeds, text_ids, b, drop=drop)
        guided = cond is not None and cond_scale != 1.0
        if guided:
            obs = torch.cat((obs, obs))
            cond = torch.cat((cond, repeat(self.null_text_embed.to(cond.dtype), "e -> b e", b=b)))
        context = rearrange(self.encode_state(obs, cond), "b f n d -> b (f n) d")

        def guide(logits: torch.Tensor) -> torch.Tensor:
            if not guided:
                return logits
            with_text, without_text = logits.chunk(2)
            return without_text + cond_scale * (with_text - without_text)  # classifier-free guidance

        return context, guide

    # ---------------------------------------------------------------- Q-values

    def forward(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        cond_scale: float = 1.0,
        text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_obs(obs)
        actions = self._check_actions(actions, obs.shape[0])
        context, guide = self._guided_contexts(obs, text_embeds, cond_scale, drop=self.training, text_ids=text_ids)
        if self.single_action:
            return guide(self.q_head(context)).sigmoid()
        if actions is not None and context.shape[0] != actions.shape[0]:
            actions = torch.cat((actions, actions))
        return guide(self.q_head(context, actions)).sigmoid()

    @torch.no_grad()
    def get_optimal_actions(
        self,
        obs: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        cond_scale: float = 1.0,
        return_q_values: bool = False,
        *,
        use_cache: bool = True,
        text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy bins ``(b, num_actions)`` (``(b,)`` for one dimension), deterministic (eval mode).

        With ``return_q_values`` also the Q-values along the chosen path, ``(b, num_actions, a)``
        (``(b, a)``): what ``forward(obs, actions=bins)`` returns.
        """
        return self._act(
            obs, text_embeds, cond_scale, use_cache=use_cache, return_q_values=return_q_values, text_ids=text_ids
        )

    @torch.no_grad()
    def get_actions(
        self,
        obs: torch.Tensor,
        epsilon: float,
        *,
        random_dims_fraction: float = 1.0,
        text_embeds: torch.Tensor | None = None,
        cond_scale: float = 1.0,
        generator: torch.Generator | None = None,
        text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Epsilon-greedy bins: with probability ``epsilon`` a sample explores, drawing uniform bins for
        ``ceil(random_dims_fraction * num_actions)`` random dimensions; the other dimensions stay greedy
        given the bins chosen before them."""
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon: expected a probability in [0, 1], got {epsilon!r}")
        if not 0.0 < random_dims_fraction <= 1.0:
            raise ValueError(f"random_dims_fraction: expected a value in (0, 1], got {random_dims_fraction!r}")
        self._check_obs(obs)
        b, d = obs.shape[0], self.config.num_actions
        # drawn on the CPU so that a CPU generator reproduces the same exploration on any device
        explore = torch.rand(b, generator=generator) < epsilon
        num_random = max(1, math.ceil(random_dims_fraction * d))
        in_subset = torch.rand(b, d, generator=generator).argsort(dim=1).argsort(dim=1) < num_random
        forced = (explore[:, None] & in_subset).to(obs.device)
        random_bins = torch.randint(self.config.action_bins, (b, d), generator=generator).to(obs.device)
        return self._act(obs, text_embeds, cond_scale, forced=forced, forced_bins=random_bins, text_ids=text_ids)

    def _act(
        self,
        obs,
        text_embeds,
        cond_scale,
        *,
        use_cache=True,
        return_q_values=False,
        forced=None,
        forced_bins=None,
        text_ids=None,
    ):
        self._check_obs(obs)
        with _eval_mode(self):
            context, guide = self._guided_contexts(obs, text_embeds, cond_scale, drop=False, text_ids=text_ids)
            if self.single_action:
                logits = guide(self.q_head(context))
                bins = logits.argmax(dim=-1)
                if forced is not None:
                    bins = torch.where(forced[:, 0], forced_bins[:, 0], bins)
            else:
                bins, logits = self.q_head.decode(
                    context, guide=guide, use_cache=use_cache, forced=forced, forced_bins=forced_bins
                )
        return (bins, logits.sigmoid()) if return_q_values else bins
