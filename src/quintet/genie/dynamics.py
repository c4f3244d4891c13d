"""Genie's dynamics model (Bruce et al. 2024): a transformer over the tokens of a video and its actions.

A clip of ``t`` frames, each a grid of ``S = rows * cols`` tokens from the frame tokenizer, becomes one
sequence of blocks, frames in time order and tokens of a frame in raster order:

    [m_1 .. m_M] [h_0 z_0^1 .. z_0^S] [h_1 z_1^1 .. z_1^S] ... [h_{t-1} z_{t-1}^1 .. z_{t-1}^S]

``m`` are learned meta (register) tokens; the head slot ``h_i`` of frame ``i`` carries the action
``a_{i-1}`` taken after frame ``i - 1`` (frame 0 and hidden actions carry a learned "no action").
The action's embedding is also added to every slot of its frame's block, so **every** token of frame
``t + 1`` is conditioned on ``a_t``, its first token included:

    x_{i,j} = E_tok[z_i^j] + P_space[j] + E_act[a_{i-1}] + E_prev[z_{i-1}^p(j)]   # eq. 1: slot j of frame i

where ``p(j)`` is the grid position slot ``j`` predicts (``previous_frame_input``: the token there one
frame earlier is the best first guess in a mostly static game, given straight to the slot).

Time enters through rotary positions (every slot of frame ``i`` sits at time ``i``), space through the
learned ``P_space`` and (``space_positions="rotary"``) two more rotary axes, the token's row and column:
attention then sees the offset (dt, dy, dx) between two tokens directly, the bias a video model needs
to look at the same place in the frame before. Two objectives give two ways to produce a frame:

- ``autoregressive``: causal attention over the whole sequence; slot ``j`` of frame ``i`` predicts
  token ``z_i^{j+1}`` (the head predicts the first). Decoding is token by token with a key/value
  cache across frames (see ``genie.generation``).
- ``maskgit`` (Genie's way): the clean blocks are followed by copies of frames ``1 .. t-1`` whose
  tokens are partly replaced by a mask token. A clean block sees the clean blocks up to its own
  (block-causal), a masked copy of frame ``i`` sees the clean blocks before ``i`` and itself, and each
  masked slot predicts its own token. This is exactly what parallel decoding sees (a clean past in
  the cache and the frame being refined), so training matches inference.

The action-prediction head reads the last slot of frame ``i + 1`` and predicts ``a_i`` (which action
led from frame ``i`` to ``i + 1``). That slot sees ``a_i`` in its input unless the action was hidden,
so the head learns only on steps whose action was hidden (``action_dropout``), never from a leak.

Shape glossary: ``b`` batch, ``t`` frames, ``r``/``c`` token rows/columns, ``S`` tokens per frame,
``L = S + 1`` slots per frame, ``M`` meta tokens, ``n`` sequence slots, ``d`` model dim, ``v`` codes,
``A`` actions, ``K`` max keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from quintet.core import KVCache, PretrainedModel, Transformer
from quintet.core.validation import check_ids, check_tensor
from quintet.genie.config import GenieConfig

NO_KEY = -1
"""padding of a key set (``max_keys > 1``)"""


@dataclass
class GenieOutput:
    logits: torch.Tensor
    """``(b, t - 1, r, c, v)``: logits of the tokens of frames ``1 .. t-1``"""
    action_logits: torch.Tensor | None
    """``(b, t - 1, A)``: which action led to frames ``1 .. t-1`` (None without an action head)"""


class SpaceTimeRotary(nn.Module):
    """Rotary angles of ``(time, row, column)`` positions ``(n, 3) -> (n, e/2)`` (axial: a third of the
    rotated pairs turn with each axis, time taking the remainder), for ``core.apply_rotary``; scores
    then depend only on the offsets (dt, dy, dx)."""

    axes = 3

    def __init__(self, dim_head: int, *, time_theta: float, space_theta: float):
        super().__init__()
        pairs = dim_head // 2
        space = pairs // 3
        time = pairs - 2 * space

        def frequencies(count: int, theta: float) -> torch.Tensor:
            return theta ** (-torch.arange(0, count, dtype=torch.float32) / count)

        self.register_buffer("time_freq", frequencies(time, time_theta), persistent=False)
        self.register_buffer("space_freq", frequencies(space, space_theta), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        check_tensor(positions, "positions", ndim=2)
        p = positions.to(torch.float32)
        return torch.cat((p[:, :1] * self.time_freq, p[:, 1:2] * self.space_freq, p[:, 2:3] * self.space_freq), dim=-1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class Genie(PretrainedModel):
    """``model(tokens (b, t, r, c), actions, *, lengths, token_mask, hide_actions) -> GenieOutput``."""

    config_class = GenieConfig

    def __init__(self, config: GenieConfig):
        super().__init__(config)
        d = config.dim
        self.maskgit = config.objective == "maskgit"
        self.mask_id = config.num_codes  # the mask token of the maskgit objective
        self.token_embed = nn.Embedding(config.num_codes + int(self.maskgit), d)
        self.head_token = nn.Parameter(torch.zeros(d))
        # row num_codes: "no previous frame" (the first frame of a clip or window)
        self.previous_embed = nn.Embedding(config.num_codes + 1, d) if config.previous_frame_input else None
        self.no_previous = config.num_codes
        self.space_positions = nn.Parameter(torch.zeros(config.block_size, d))
        self.meta_tokens = nn.Parameter(torch.zeros(config.num_meta_tokens, d)) if config.num_meta_tokens else None
        # rows 0 .. A-1: actions (keys); row A: "no action" (frame 0, hidden actions)
        self.action_embed = nn.Embedding(config.num_actions + 1, d) if config.has_actions else None
        self.key_set_embed = nn.Parameter(torch.zeros(d)) if config.has_actions and config.max_keys > 1 else None
        self.transformer = Transformer(
            d,
            config.depth,
            heads=config.heads,
            dim_head=config.dim_head,
            causal=not self.maskgit,
            ff_mult=config.ff_mult,
            rotary=True,
            rotary_theta=config.rotary_theta,
            dropout=config.dropout,
        )
        if config.space_positions == "rotary":  # the stack's 1-D rotary becomes (time, row, column)
            self.transformer.rotary = SpaceTimeRotary(
                config.dim_head, time_theta=config.rotary_theta, space_theta=config.space_theta
            )
        rows, cols = config.token_grid
        grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols))
        # (row, column) of every slot of a block; the head slot sits before the first row
        self.register_buffer("slot_space", torch.cat((torch.full((1, 2), -1), grid)), persistent=False)
        self.to_logits = nn.Linear(d, config.num_codes, bias=False)
        self.to_action = (
            nn.Linear(d, config.num_actions, bias=False) if config.has_actions and config.action_loss_weight else None
        )
        self.apply(_init_weights)
        for parameter in (self.head_token, self.space_positions, self.meta_tokens, self.key_set_embed):
            if parameter is not None:
                nn.init.normal_(parameter, std=0.02)
        self._masks: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ input checks

    def check_tokens(self, tokens: object, name: str = "tokens") -> torch.Tensor:
        """``(b, t, r, c)`` integer codes of this model's grid; returns them as ``(b, t, S)``."""
        check_tensor(tokens, name, ndim=4, dtype="int")
        if tuple(tokens.shape[2:]) != self.config.token_grid:
            raise ValueError(
                f"{name}: expected (b, t, {self.config.token_grid[0]}, {self.config.token_grid[1]}) token grids, "
                f"got shape {tuple(tokens.shape)}"
            )
        if tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"{name}: expected at least one clip of one frame, got shape {tuple(tokens.shape)}")
        if not torch.compiler.is_compiling():
            check_ids(tokens, name, self.config.num_codes)
        return rearrange(tokens, "b t r c -> b t (r c)")

    def check_actions(self, actions: object, batch: int, steps: int, name: str = "actions") -> torch.Tensor | None:
        """Actions of ``steps`` steps: ``(b, steps)`` ids, or ``(b, steps, K)`` sorted key sets padded with -1.

        One extra trailing step (the action after the last frame) is accepted and dropped.
        """
        config = self.config
        if actions is None:
            return None
        if not config.has_actions:
            raise ValueError(f"{name}: this model was built without actions (num_actions=None); pass none")
        single = config.max_keys == 1
        check_tensor(actions, name, ndim=2 if single else 3, dtype="int")
        if actions.shape[0] != batch or actions.shape[1] not in (steps, steps + 1):
            expected = f"(b={batch}, {steps}{'' if single else ', K'})"
            raise ValueError(f"{name}: expected {expected} (one per step between frames), got {tuple(actions.shape)}")
        actions = actions[:, :steps]
        if single:
            if not torch.compiler.is_compiling():
                check_ids(actions, name, config.num_actions)
            return actions
        if actions.shape[2] > config.max_keys:
            raise ValueError(f"{name}: at most max_keys={config.max_keys} keys per step, got {actions.shape[2]}")
        if not torch.compiler.is_compiling():
            pressed = actions != NO_KEY
            if bool(((actions < NO_KEY) | (actions >= config.num_actions)).any()):
                raise ValueError(
                    f"{name}: keys must lie in [0, {config.num_actions}) (padding {NO_KEY}), "
                    f"got range [{int(actions.min())}, {int(actions.max())}]"
                )
            if bool((~pressed[..., :-1] & pressed[..., 1:]).any()):
                raise ValueError(f"{name}: padding ({NO_KEY}) must come after the pressed keys of a step")
            if bool((pressed[..., 1:] & (actions[..., 1:] <= actions[..., :-1])).any()):
                raise ValueError(f"{name}: the keys of a step must be sorted and distinct")
        return actions

    def _check_lengths(self, lengths: object, batch: int, frames: int) -> torch.Tensor | None:
        if lengths is None:
            return None
        check_tensor(lengths, "lengths", ndim=1, dtype="int")
        if lengths.shape[0] != batch:
            raise ValueError(f"lengths: expected one length per clip (b={batch}), got shape {tuple(lengths.shape)}")
        if not torch.compiler.is_compiling() and bool(((lengths < 1) | (lengths > frames)).any()):
            raise ValueError(f"lengths: expected clip lengths in [1, {frames}], got {lengths.tolist()}")
        return lengths

    def _check_steps_mask(self, value: object, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        if value is None:
            return None
        check_tensor(value, name, dtype="bool")
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")
        return value

    # ------------------------------------------------------------------ pieces shared with decoding

    def action_embeddings(
        self, actions: torch.Tensor | None, hidden: torch.Tensor | None, shape: tuple[int, int]
    ) -> torch.Tensor | None:
        """Embeddings ``(b, n, d)`` of checked actions ``(b, n[, K])``; None actions or hidden steps get
        the "no action" row. ``shape = (b, n)``. None for a model without actions."""
        if not self.config.has_actions:
            return None
        null = self.action_embed.weight[self.config.num_actions]
        if actions is None:
            return null.expand(*shape, -1)
        if self.config.max_keys == 1:
            embedded = self.action_embed(actions)
        else:
            pressed = (actions != NO_KEY).unsqueeze(-1)
            keys = self.action_embed(actions.clamp_min(0)) * pressed
            embedded = keys.sum(dim=2) + self.key_set_embed  # a set of keys: the sum of their embeddings
        if hidden is not None:
            embedded = torch.where(hidden.unsqueeze(-1), null, embedded)
        return embedded

    def _previous_hints(self, previous: torch.Tensor) -> torch.Tensor:
        """``(b, n, L, d)``: for every slot, the embedding of the previous frame's token at the grid position
        the slot predicts (maskgit: slot j + 1 holds position j; autoregressive: slot j predicts position j);
        zero for the slot that predicts no position."""
        hints = self.previous_embed(previous)
        none = hints.new_zeros(*hints.shape[:2], 1, hints.shape[-1])
        return torch.cat((none, hints) if self.maskgit else (hints, none), dim=2)

    def first_previous(self, batch: int, device) -> torch.Tensor:
        """The "no previous frame" codes ``(b, 1, S)`` of a clip's first frame."""
        return torch.full((batch, 1, self.config.tokens_per_frame), self.no_previous, device=device)

    def embed_frames(
        self, tokens: torch.Tensor, block_actions: torch.Tensor | None, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Blocks ``(b, n * L, d)`` of frames ``tokens (b, n, S)`` (codes or the mask id), each led by its head
        slot; ``block_actions (b, n, d)`` is the embedding of the action that led to each frame, ``previous
        (b, n, S)`` the codes of the frame before each one (or "no previous frame")."""
        x = self.token_embed(tokens)
        head = self.head_token.expand(*tokens.shape[:2], 1, -1)
        x = torch.cat((head, x), dim=2) + self.space_positions
        if block_actions is not None:
            x = x + block_actions.unsqueeze(2)  # eq. 1: every slot of frame i + 1 carries a_i
        if self.previous_embed is not None and previous is not None:
            x = x + self._previous_hints(previous)
        return rearrange(x, "b n l d -> b (n l) d")

    def slot_bias(self, block_action: torch.Tensor | None, previous: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``(b, L, d)``: what every slot of one block adds to its token's embedding (space, the action that
        led to the frame ``block_action (b, d)``, the previous frame's hints ``previous (b, S)``); computed once
        per frame by token-by-token decoding."""
        bias = self.space_positions.expand(batch, -1, -1)
        if block_action is not None:
            bias = bias + block_action.unsqueeze(1)
        if self.previous_embed is not None and previous is not None:
            bias = bias + self._previous_hints(previous[:, None])[:, 0]
        return bias

    def embed_slots(self, tokens: torch.Tensor, bias: torch.Tensor, start: int) -> torch.Tensor:
        """Consecutive slots of one block from slot ``start`` on, for token-by-token decoding: the head
        (when ``start == 0``), then the slots holding ``tokens (b, k)``; ``bias`` from :meth:`slot_bias`."""
        x = self.token_embed(tokens)
        if start == 0:
            x = torch.cat((self.head_token.expand(tokens.shape[0], 1, -1), x), dim=1)
        return x + bias[:, start : start + x.shape[1]]

    def meta(self, batch: int) -> torch.Tensor | None:
        return None if self.meta_tokens is None else self.meta_tokens.expand(batch, -1, -1)

    def run(self, x: torch.Tensor, positions: torch.Tensor, **kwargs) -> torch.Tensor:
        """The transformer over slots ``x (b, n, d)`` at rotary ``positions``; ``kwargs``: masks, cache."""
        out = self.transformer(x, positions=positions, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def new_cache(self) -> KVCache:
        return KVCache()

    def positions(self, frames: torch.Tensor, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Rotary positions of slots ``start .. start + count - 1`` (default: all ``L``) of the block of each
        frame index in ``frames (f,)``: times ``(f * count,)``, or ``(f * count, 3)`` (time, row, column)."""
        slots = self.slot_space[start : start + count if count is not None else None]
        times = repeat(frames, "f -> (f l)", l=slots.shape[0])
        if self.config.space_positions != "rotary":
            return times
        return torch.cat((times[:, None], slots.repeat(frames.shape[0], 1)), dim=1)

    def meta_positions(self, device) -> torch.Tensor:
        """Rotary positions of the meta tokens: time 0, before the grid."""
        times = torch.zeros(self.config.num_meta_tokens, dtype=torch.long, device=device)
        if self.config.space_positions != "rotary":
            return times
        return torch.cat((times[:, None], torch.full((len(times), 2), -1, device=device)), dim=1)

    def block_causal_mask(self, clean_frames: int, masked_frames: tuple[int, ...], device) -> torch.Tensor:
        """``(n, n)`` attention of ``[meta][clean 0 .. clean_frames-1][masked copies of masked_frames]``:
        meta sees meta; clean frame i sees meta and clean frames <= i; the masked copy of frame i sees
        meta, clean frames < i and itself. True = may attend."""
        key = (clean_frames, masked_frames, str(device))
        if key not in self._masks:
            L, M = self.config.block_size, self.config.num_meta_tokens
            frame = torch.cat(
                (
                    torch.full((M,), -1, device=device),
                    repeat(torch.arange(clean_frames, device=device), "n -> (n l)", l=L),
                    repeat(torch.tensor(masked_frames, device=device, dtype=torch.long), "n -> (n l)", l=L),
                )
            )
            kind = torch.cat(
                (
                    torch.zeros(M, device=device),
                    torch.ones(clean_frames * L, device=device),
                    torch.full((len(masked_frames) * L,), 2, device=device),
                )
            )
            q_kind, k_kind = kind[:, None], kind[None, :]
            q_frame, k_frame = frame[:, None], frame[None, :]
            mask = (k_kind == 0).expand(len(kind), -1)
            mask = mask | ((q_kind == 1) & (k_kind == 1) & (k_frame <= q_frame))
            mask = mask | ((q_kind == 2) & (k_kind == 1) & (k_frame < q_frame))
            mask = mask | ((q_kind == 2) & (k_kind == 2) & (k_frame == q_frame))
            if len(self._masks) > 16:
                self._masks.clear()
            self._masks[key] = mask
        return self._masks[key]

    # ------------------------------------------------------------------ teacher-forced forward

    def forward(
        self,
        tokens: torch.Tensor,
        actions: torch.Tensor | None = None,
        *,
        lengths: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        hide_actions: torch.Tensor | None = None,
    ) -> GenieOutput:
        """Logits of frames ``1 .. t-1`` from ``tokens (b, t, r, c)`` and ``actions``.

        - ``actions``: ``(b, t - 1)`` ids or ``(b, t - 1, K)`` key sets (``actions[:, i]`` after frame ``i``);
          None: every step has "no action" (also the only choice for a model without actions).
        - ``lengths (b,)``: real frames per clip; padded frames never change the outputs of real ones.
        - ``token_mask (b, t - 1, r, c)`` (maskgit): True = hidden from the masked copy of frame ``i + 1``;
          default: every token hidden (the first refinement step).
        - ``hide_actions (b, t - 1)``: True = the model sees "no action" for that step.
        """
        config = self.config
        z = self.check_tokens(tokens)
        b, t, S = z.shape
        if t < 2:
            raise ValueError(f"tokens: a clip needs >= 2 frames (a past and a next), got shape {tuple(tokens.shape)}")
        if t > config.max_frames:
            raise ValueError(f"tokens: at most max_frames={config.max_frames} frames, got {t}")
        actions = self.check_actions(actions, b, t - 1)
        lengths = self._check_lengths(lengths, b, t)
        hide_actions = self._check_steps_mask(hide_actions, "hide_actions", (b, t - 1))
        if token_mask is not None and not self.maskgit:
            raise ValueError("token_mask: only the maskgit objective masks tokens")
        token_mask = self._check_steps_mask(token_mask, "token_mask", (b, t - 1, *config.token_grid))

        steps = self.action_embeddings(actions, hide_actions, (b, t - 1))
        block_actions = None
        if steps is not None:
            block_actions = torch.cat((self.action_embeddings(None, None, (b, 1)), steps), dim=1)
        frames = torch.arange(t, device=z.device)
        meta = self.meta(b)
        previous = torch.cat((self.first_previous(b, z.device), z[:, :-1]), dim=1)
        parts = ([meta] if meta is not None else []) + [self.embed_frames(z, block_actions, previous)]
        positions = [self.meta_positions(z.device), self.positions(frames)]
        valid = None if lengths is None else frames[None, :] < lengths[:, None]  # (b, t): real frames
        padding = [valid] if valid is not None else []

        if self.maskgit:
            hidden = (
                rearrange(token_mask, "b t r c -> b t (r c)")
                if token_mask is not None
                else torch.ones(b, t - 1, S, dtype=torch.bool, device=z.device)
            )
            masked = z[:, 1:].masked_fill(hidden, self.mask_id)
            masked_actions = block_actions[:, 1:] if block_actions is not None else None
            parts.append(self.embed_frames(masked, masked_actions, z[:, :-1]))
            positions.append(self.positions(frames[1:]))
            padding = [valid, valid[:, 1:]] if valid is not None else []
            attn_mask = self.block_causal_mask(t, tuple(range(1, t)), z.device)
        else:
            attn_mask = None
        key_padding_mask = None
        if padding:
            blocks = repeat(torch.cat(padding, dim=1), "b n -> b (n l)", l=config.block_size)
            key_padding_mask = F.pad(blocks, (config.num_meta_tokens, 0), value=True)

        h = self.run(
            torch.cat(parts, dim=1), torch.cat(positions), attn_mask=attn_mask, key_padding_mask=key_padding_mask
        )
        h = h[:, config.num_meta_tokens :]
        clean = rearrange(h[:, : t * config.block_size], "b (t l) d -> b t l d", l=config.block_size)
        if self.maskgit:
            predicted = rearrange(h[:, t * config.block_size :], "b (t l) d -> b t l d", l=config.block_size)[:, :, 1:]
        else:
            predicted = clean[:, 1:, :S]  # slot j predicts token j + 1; the head predicts the first
        logits = rearrange(self.to_logits(predicted), "b t (r c) v -> b t r c v", r=config.token_grid[0])
        # the last slot of frame i + 1 has seen frames <= i + 1: which action led there
        action_logits = self.to_action(clean[:, 1:, -1]) if self.to_action is not None else None
        return GenieOutput(logits=logits, action_logits=action_logits)

    # ------------------------------------------------------------------ cost

    def sequence_length(self, frames: int) -> int:
        """Slots of a training clip of ``frames`` frames (maskgit adds the masked copies)."""
        copies = 2 * frames - 1 if self.maskgit else frames
        return self.config.num_meta_tokens + copies * self.config.block_size

    def flops_per_clip(self, frames: int, *, backward: bool = True) -> float:
        """Matmul FLOPs of one clip through ``forward`` (x3 with the backward pass), from the config alone.

        Per slot and layer: 2 * (3 d e_all + e_all d + 3 d f) for the qkv, output and SwiGLU
        projections (``e_all = heads * dim_head``, ``f`` the SwiGLU hidden width), and attention
        4 * n * e_all for QK^T and AV over all ``n`` slots (SDPA computes masked scores too);
        plus the logits of the predicted tokens and the action head.
        """
        c = self.config
        n = self.sequence_length(frames)
        inner = c.heads * c.dim_head
        hidden = int(c.dim * c.ff_mult * 2 / 3)
        per_slot = 2 * (3 * c.dim * inner + inner * c.dim + 3 * c.dim * hidden)
        layers = c.depth * (n * per_slot + 4 * n * n * inner)
        head = 2 * (frames - 1) * (c.tokens_per_frame * c.dim * c.num_codes)
        if self.to_action is not None:
            head += 2 * (frames - 1) * c.dim * c.num_actions
        forward = float(layers + head)
        return 3 * forward if backward else forward
