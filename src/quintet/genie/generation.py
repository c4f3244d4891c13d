"""Imagining frames with a Genie dynamics model, one frame per action, cached and uncached side by side.

:class:`FrameDecoder` holds a past of frames (real ones from ``reset``, then imagined ones) and
produces the next frame's tokens from an action:

- ``autoregressive`` models sample the ``S`` tokens of a frame one at a time. With ``use_cache`` a
  :class:`~quintet.core.KVCache` holds the keys/values of every frame so far, so each token costs one
  slot of compute; without, every token recomputes the whole sequence (the benchmark's reference).
- ``maskgit`` models decode a whole frame in ``steps`` parallel refinement passes (Chang et al.
  2022): start from all-masked tokens, sample every masked token, keep the most confident ones and
  re-mask the rest following the cosine schedule ``S * cos(pi/2 * (k+1)/steps)``. With a cache, the
  past frames' keys/values are computed once and each pass runs the current frame's ``S + 1`` slots
  only (then crops the cache back); the finished frame is appended in one more pass.

Classifier-free guidance on actions (``cfg_scale != 1``) runs a second row per sample whose current
action is hidden and mixes ``u + cfg_scale * (c - u)`` of the two rows' logits; both rows keep the
real actions of the past. The past is a window of at most ``window`` frames: when a new frame would
overflow it, the oldest frames are dropped down to half the window and the cache is rebuilt once, so
play can run forever at a bounded cost per frame.

Shape glossary: ``b`` batch, ``t`` frames, ``r``/``c`` token rows/columns, ``S`` tokens per frame,
``L = S + 1`` slots per frame, ``v`` codes, ``K`` max keys.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from einops import rearrange

from quintet.core.sampling import gumbel_noise, probabilities, sample
from quintet.core.validation import check_int, check_number
from quintet.genie.dynamics import Genie


class FrameDecoder:
    """``reset(tokens, actions)`` with real frames, then ``step(action) -> next frame's tokens (b, r, c)``."""

    def __init__(
        self,
        model: Genie,
        *,
        use_cache: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        cfg_scale: float = 1.0,
        steps: int | None = None,
        window: int | None = None,
        generator: torch.Generator | None = None,
        keep_logits: bool = False,
    ):
        if not isinstance(model, Genie):
            raise TypeError(f"model: expected a Genie dynamics model, got {type(model).__name__}")
        config = model.config
        check_number(cfg_scale, "cfg_scale", low=0.0)
        if cfg_scale != 1.0 and not config.has_actions:
            raise ValueError("cfg_scale: guidance needs a model with actions (num_actions set)")
        self.steps = config.maskgit_steps if steps is None else steps
        check_int(self.steps, "steps")
        self.window = config.max_frames if window is None else window
        check_int(self.window, "window", minimum=2)
        check_number(temperature, "temperature", low=0.0)
        self.model, self.config, self.use_cache = model, config, use_cache
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
        self.temperature, self.generator = temperature, generator
        self.cfg_scale = cfg_scale
        self.guided = cfg_scale != 1.0
        self.keep_logits = keep_logits
        self.logits: list[torch.Tensor] = []
        """with ``keep_logits``: per frame, the logits every sampling decision used (autoregressive
        ``(b, S, v)``; maskgit ``(b, steps, S, v)``)"""
        self.frames: list[torch.Tensor] = []
        self.actions: list[torch.Tensor | None] = []
        self.cache = None

    @property
    def tokens(self) -> torch.Tensor:
        """The frames in the window, ``(b, t, r, c)``."""
        return rearrange(torch.stack(self.frames, dim=1), "b t (r c) -> b t r c", r=self.config.token_grid[0])

    def reset(self, tokens: torch.Tensor, actions: torch.Tensor | None = None) -> None:
        """Start from real frames ``tokens (b, t, r, c)`` and the ``t - 1`` actions between them (the
        last ``window`` frames are kept)."""
        z = self.model.check_tokens(tokens)
        b, t = z.shape[:2]
        actions = self.model.check_actions(actions, b, t - 1)
        self.batch = b
        self.frames = list(z.unbind(1))
        self.actions = [None if actions is None else actions[:, i] for i in range(t - 1)]
        self.frames, self.actions = self.frames[-self.window :], self.actions[len(self.actions) - self.window + 1 :]
        self.logits = []
        if self.use_cache:
            with self._eval():
                self._prefill()

    @torch.inference_mode()
    def step(self, action: torch.Tensor | None = None) -> torch.Tensor:
        """Imagine the frame that follows ``action`` (``(b,)`` id, ``(b, K)`` key set, or None for a model
        without actions / "no action"); returns its tokens ``(b, r, c)``."""
        if not self.frames:
            raise ValueError("step: call reset(tokens) with at least one real frame first")
        if action is not None:
            action = self.model.check_actions(action[:, None], self.batch, 1, name="action")[:, 0]
        with self._eval():
            if len(self.frames) + 1 > self.window:
                keep = max(1, self.window // 2)
                self.frames, self.actions = self.frames[-keep:], self.actions[len(self.actions) - keep + 1 :]
                if self.use_cache:
                    self._prefill()
            current = self._action_rows(action)
            decode = self._refine if self.model.maskgit else self._autoregress
            tokens, logits = decode(current)
            self._commit(tokens, action)
        if self.keep_logits:
            self.logits.append(logits)
        return rearrange(tokens, "b (r c) -> b r c", r=self.config.token_grid[0])

    # ------------------------------------------------------------------ the past

    @contextmanager
    def _eval(self):
        """The model in eval mode (no dropout) while decoding; its own mode afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Duplicate a per-sample tensor for the guided second row."""
        return torch.cat((x, x)) if self.guided else x

    def _past(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``(rows, M + t L, d)`` of meta tokens and the window's frames, and their rotary times."""
        model, b, t = self.model, self.batch, len(self.frames)
        z = torch.stack(self.frames, dim=1)
        block_actions = None
        if self.config.has_actions:  # frame 0 follows no action; frame i + 1 follows actions[i]
            steps = [model.action_embeddings(None if a is None else a[:, None], None, (b, 1)) for a in self.actions]
            block_actions = torch.cat([model.action_embeddings(None, None, (b, 1)), *steps], dim=1)
        previous = torch.cat((model.first_previous(b, z.device), z[:, :-1]), dim=1)
        x = model.embed_frames(z, block_actions, previous)
        meta = model.meta(b)
        if meta is not None:
            x = torch.cat((meta, x), dim=1)
        positions = torch.cat((model.meta_positions(z.device), model.positions(torch.arange(t, device=z.device))))
        return self._rows(x), positions

    def _past_mask(self, with_current: bool):
        if not self.model.maskgit:
            return None
        t = len(self.frames)
        return self.model.block_causal_mask(t, (t,) if with_current else (), self.frames[0].device)

    @torch.inference_mode()
    def _prefill(self) -> None:
        self.cache = self.model.new_cache()
        x, times = self._past()
        self.model.run(x, times, cache=self.cache, attn_mask=self._past_mask(False))

    def _action_rows(self, action: torch.Tensor | None) -> torch.Tensor | None:
        """Embedding ``(rows, d)`` of the current action; the guided second row has it hidden."""
        model = self.model
        if not self.config.has_actions:
            return None
        given = model.action_embeddings(None if action is None else action[:, None], None, (self.batch, 1))[:, 0]
        if not self.guided:
            return given
        return torch.cat((given, model.action_embeddings(None, None, (self.batch, 1))[:, 0]))

    def _guide(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return logits
        conditional, unconditional = logits.chunk(2)
        return unconditional + self.cfg_scale * (conditional - unconditional)  # classifier-free guidance

    def _commit(self, tokens: torch.Tensor, action: torch.Tensor | None) -> None:
        """Append the finished frame to the past (and its clean block to the cache)."""
        model = self.model
        if self.use_cache and (model.maskgit or self.guided):
            if not model.maskgit:  # the guided row's current block saw no action: replace it by the real one
                self.cache.crop(self._base)
            block_action = None
            if self.config.has_actions:
                given = None if action is None else action[:, None]
                block_action = self._rows(model.action_embeddings(given, None, (self.batch, 1)))
            x = model.embed_frames(self._rows(tokens)[:, None], block_action, self._previous())
            model.run(x, self._current(), cache=self.cache)
        self.frames.append(tokens)
        self.actions.append(action)

    def _previous(self) -> torch.Tensor:
        """``(rows, 1, S)``: the frame before the one being imagined (the window's last)."""
        return self._rows(self.frames[-1])[:, None]

    def _current(self, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Rotary positions of slots ``start ..`` of the frame being imagined."""
        frame = torch.tensor([len(self.frames)], device=self.frames[0].device)
        return self.model.positions(frame, start, count)

    # ------------------------------------------------------------------ autoregressive: token by token

    def _autoregress(self, current: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        model, S = self.model, self.config.tokens_per_frame
        rows = self.batch * (2 if self.guided else 1)
        device = self.frames[0].device
        tokens = torch.zeros(rows, 0, dtype=torch.long, device=device)
        bias = model.slot_bias(current, self._previous()[:, 0], rows)
        all_logits = []
        if self.use_cache:
            self._base = self.cache.length
            x = model.embed_slots(tokens, bias, 0)  # the head slot: it predicts the first token
        else:
            past, past_times = self._past()
        for j in range(S):
            if self.use_cache:
                h = model.run(x, self._current(j, 1), cache=self.cache)[:, -1]
            else:
                x = torch.cat((past, model.embed_slots(tokens, bias, 0)), dim=1)
                times = torch.cat((past_times, self._current(0, j + 1)))
                h = model.run(x, times)[:, -1]
            logits = self._guide(model.to_logits(h))
            token = sample(logits, **self.sampling)
            all_logits.append(logits)
            tokens = torch.cat((tokens, self._rows(token)[:, None]), dim=1)
            if self.use_cache:
                x = model.embed_slots(tokens[:, -1:], bias, j + 1)
        if self.use_cache and not self.guided:
            model.run(x, self._current(S, 1), cache=self.cache)  # the frame's last token joins the cache
        return tokens[: self.batch], torch.stack(all_logits, dim=1)

    # ------------------------------------------------------------------ maskgit: parallel refinement

    def _refine(self, current: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        model, S, K = self.model, self.config.tokens_per_frame, self.steps
        device = self.frames[0].device
        tokens = torch.full((self.batch, S), model.mask_id, dtype=torch.long, device=device)
        block_action = current[:, None] if current is not None else None
        if not self.use_cache:
            past, past_times = self._past()
            mask = self._past_mask(True)
        all_logits = []
        for k in range(K):
            x = model.embed_frames(self._rows(tokens)[:, None], block_action, self._previous())
            times = self._current()
            if self.use_cache:
                base = self.cache.length
                h = model.run(x, times, cache=self.cache)
                self.cache.crop(base)  # the frame being refined is scratch until it is finished
            else:
                h = model.run(torch.cat((past, x), dim=1), torch.cat((past_times, times)), attn_mask=mask)
                h = h[:, -x.shape[1] :]
            logits = self._guide(model.to_logits(h[:, 1:]))
            all_logits.append(logits)
            tokens = self._reveal(tokens, logits, k)
        return tokens, torch.stack(all_logits, dim=1)

    def _reveal(self, tokens: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
        """One MaskGIT step: sample every masked token, keep the confident ones, re-mask the rest."""
        S, K, mask_id = self.config.tokens_per_frame, self.steps, self.model.mask_id
        masked = tokens == mask_id
        sampled = sample(logits, **self.sampling)
        confidence = probabilities(logits).gather(-1, sampled[..., None])[..., 0].clamp_min(1e-20).log()
        if self.temperature > 0:
            # MaskGIT's choice noise, annealed to zero over the steps: a little diversity in the order
            noise = gumbel_noise(confidence.shape, device=confidence.device, generator=self.generator)
            confidence = confidence + self.temperature * (1 - (k + 1) / K) * noise
        confidence = confidence.masked_fill(~masked, math.inf)  # revealed tokens stay revealed
        tokens = torch.where(masked, sampled, tokens)
        still_masked = math.floor(S * math.cos(math.pi / 2 * (k + 1) / K))  # cosine schedule
        if still_masked > 0:
            lowest = confidence.topk(still_masked, dim=-1, largest=False).indices
            tokens = tokens.scatter(-1, lowest, mask_id)
        return tokens


def imagine(
    model: Genie,
    tokens: torch.Tensor,
    actions: torch.Tensor | None,
    frames: int,
    **options,
) -> torch.Tensor:
    """Imagine ``frames`` new frames after ``tokens (b, t, r, c)``; returns their tokens ``(b, frames, r, c)``.

    ``actions``: ``(b, t - 1 + frames[, K])``: the ``t - 1`` actions between the given frames, then one
    per new frame (None for a model without actions). ``options``: those of :class:`FrameDecoder`.
    """
    check_int(frames, "frames")
    decoder = FrameDecoder(model, **options)
    b, t = model.check_tokens(tokens).shape[:2]
    actions = model.check_actions(actions, b, t - 1 + frames)
    decoder.reset(tokens, None if actions is None else actions[:, : t - 1])
    new = [decoder.step(None if actions is None else actions[:, t - 1 + i]) for i in range(frames)]
    return torch.stack(new, dim=1)
