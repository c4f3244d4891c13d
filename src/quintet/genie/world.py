"""A playable world: frames in, actions in, imagined frames out; and the same as a gymnasium env.

:class:`World` joins a frame tokenizer and a dynamics model around one :class:`FrameDecoder` (a
key/value cache across frames, a bounded context window), so each ``step(action)`` costs one
imagined frame. :class:`WorldModelEnv` is a ``gymnasium.Env`` whose ``reset`` starts from real
recorded frames and whose ``step`` returns imagined ones, so any agent can act (and train) inside
the model. Rewards come from an optional ``reward_fn`` (the dynamics model predicts frames, not
rewards).

Shape glossary: ``t`` frames, ``c``/``h``/``w`` image channels/height/width, ``K`` max keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from quintet.core.validation import check_int
from quintet.genie.dynamics import NO_KEY, Genie
from quintet.genie.generation import FrameDecoder
from quintet.genie.tokenizer import FrameTokenizer


class World:
    """``reset(frames, actions)`` with real frames, then ``step(action) -> next imagined frame``.

    Frames are uint8 ``(c, h, w)`` numpy arrays (``reset`` takes ``(t, c, h, w)``). An action is an id
    in ``[0, num_actions)``, or for a multi-key model a collection of pressed keys; None for a model
    without actions.
    """

    def __init__(
        self,
        tokenizer: FrameTokenizer,
        dynamics: Genie,
        *,
        temperature: float = 0.0,
        cfg_scale: float = 1.0,
        steps: int | None = None,
        seed: int = 0,
        use_cache: bool = True,
    ):
        if not isinstance(tokenizer, FrameTokenizer):
            raise TypeError(f"tokenizer: expected a FrameTokenizer, got {type(tokenizer).__name__}")
        if not isinstance(dynamics, Genie):
            raise TypeError(f"dynamics: expected a Genie dynamics model, got {type(dynamics).__name__}")
        if tuple(tokenizer.config.token_grid) != tuple(dynamics.config.token_grid) or (
            tokenizer.config.codebook_size != dynamics.config.num_codes
        ):
            raise ValueError(
                f"dynamics: its tokens ({dynamics.config.token_grid}, {dynamics.config.num_codes} codes) are not the "
                f"tokenizer's ({tokenizer.config.token_grid}, {tokenizer.config.codebook_size} codes)"
            )
        self.tokenizer, self.dynamics = tokenizer.eval(), dynamics.eval()
        self.device = next(dynamics.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.decoder = FrameDecoder(
            dynamics,
            temperature=temperature,
            cfg_scale=cfg_scale,
            steps=steps,
            generator=self.generator,
            use_cache=use_cache,
        )
        self.temporal = tokenizer.config.temporal_kernel if tokenizer.config.temporal_convs else 1
        self.frame: np.ndarray | None = None

    @property
    def num_actions(self) -> int | None:
        return self.dynamics.config.num_actions

    def action_tensor(self, action: object, name: str = "action") -> torch.Tensor | None:
        """One step's action as the model takes it (``(1,)`` id or ``(1, K)`` key set); clear errors."""
        config = self.dynamics.config
        if not config.has_actions:
            if action is not None:
                raise ValueError(f"{name}: this world model takes no actions (it was trained without them)")
            return None
        if action is None:
            return None  # "no action": the model's learned null action
        if config.max_keys == 1:
            if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
                raise ValueError(f"{name}: expected an action id in [0, {config.num_actions}), got {action!r}")
            if not 0 <= int(action) < config.num_actions:
                raise ValueError(f"{name}: action {int(action)} is not in [0, {config.num_actions})")
            return torch.tensor([int(action)], device=self.device)
        if isinstance(action, (int, np.integer)) and not isinstance(action, bool):
            action = [action]  # one key pressed
        keys = sorted({int(key) for key in action}) if isinstance(action, (Sequence, set, frozenset)) else None
        if keys is None or any(not 0 <= key < config.num_actions for key in keys):
            raise ValueError(f"{name}: expected a set of keys in [0, {config.num_actions}), got {action!r}")
        if len(keys) > config.max_keys:
            raise ValueError(f"{name}: at most max_keys={config.max_keys} keys at once, got {len(keys)}")
        padded = keys + [NO_KEY] * (config.max_keys - len(keys))
        return torch.tensor([padded], device=self.device)

    @torch.no_grad()
    def reset(self, frames: np.ndarray | torch.Tensor, actions: Sequence | None = None) -> np.ndarray:
        """Start from real frames ``(t, c, h, w)`` uint8 and the ``t - 1`` actions between them."""
        frames = torch.as_tensor(np.asarray(frames))
        if frames.ndim != 4 or frames.dtype != torch.uint8:
            raise ValueError(
                f"frames: expected real frames (t, c, h, w) uint8, got {frames.dtype} {tuple(frames.shape)}"
            )
        tokens = self.tokenizer.encode(frames[None].to(self.device))
        steps = None
        if actions is not None and len(actions):
            if len(actions) != frames.shape[0] - 1:
                raise ValueError(f"actions: expected {frames.shape[0] - 1} (one between frames), got {len(actions)}")
            steps = torch.cat([self.action_tensor(a, f"actions[{i}]")[:, None] for i, a in enumerate(actions)], dim=1)
        self.decoder.reset(tokens, steps)
        self.frame = frames[-1].numpy()
        return self.frame

    @torch.no_grad()
    def step(self, action: object = None) -> np.ndarray:
        """Imagine the frame that follows ``action``; returns it as uint8 ``(c, h, w)``."""
        if self.frame is None:
            raise ValueError("step: call reset(frames) with at least one real frame first")
        self.decoder.step(self.action_tensor(action))
        window = self.decoder.tokens[:, -self.temporal :]  # temporal convs read the frames before
        frame = self.tokenizer.decode(window, last=1)[0, 0]
        self.frame = frame.mul(255).round().to(torch.uint8).cpu().numpy()
        return self.frame


class WorldModelEnv(gym.Env):
    """A ``gymnasium.Env`` inside a world model: ``reset`` starts from a real clip, ``step`` imagines.

    - ``starts``: real clips to start from, ``frames (n, t, c, h, w)`` uint8 and ``actions (n, t - 1)``
      (None for a model without actions); ``reset`` picks one at random (seeded).
    - observations: ``(h, w, c)`` uint8 frames (the layout gymnasium's image envs use);
      ``action_space``: ``Discrete(num_actions)``, ``MultiBinary(num_actions)`` for a multi-key model.
    - ``reward_fn(previous_frame, action, frame) -> float`` (default: 0); episodes are truncated after
      ``max_steps``; they never terminate (the model does not predict game over).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(
        self,
        world: World,
        starts: tuple[np.ndarray, np.ndarray | None],
        *,
        max_steps: int = 200,
        reward_fn: Callable[[np.ndarray, object, np.ndarray], float] | None = None,
        render_mode: str | None = None,
    ):
        if not isinstance(world, World):
            raise TypeError(f"world: expected a World, got {type(world).__name__}")
        frames, actions = starts
        frames = np.asarray(frames)
        if frames.ndim != 5 or frames.dtype != np.uint8 or not len(frames):
            raise ValueError(f"starts: expected real clips (n, t, c, h, w) uint8, got {frames.dtype} {frames.shape}")
        check_int(max_steps, "max_steps")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode: expected None or 'rgb_array', got {render_mode!r}")
        self.world, self.frames, self.actions = world, frames, actions
        self.max_steps, self.reward_fn, self.render_mode = max_steps, reward_fn, render_mode
        c, h, w = frames.shape[2:]
        self.observation_space = gym.spaces.Box(0, 255, (h, w, c), np.uint8)
        config = world.dynamics.config
        if not config.has_actions:
            self.action_space = gym.spaces.Discrete(1)  # a single "wait" action: the video plays on
        elif config.max_keys == 1:
            self.action_space = gym.spaces.Discrete(config.num_actions)
        else:
            self.action_space = gym.spaces.MultiBinary(config.num_actions)
        self.steps = 0

    def _observation(self) -> np.ndarray:
        return np.ascontiguousarray(self.world.frame.transpose(1, 2, 0))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        index = int(self.np_random.integers(len(self.frames)))
        actions = None if self.actions is None else list(np.asarray(self.actions[index]))
        self.world.reset(self.frames[index], actions)
        self.steps = 0
        return self._observation(), {"start": index}

    def _model_action(self, action: object) -> object:
        config = self.world.dynamics.config
        if not config.has_actions:
            return None
        if config.max_keys == 1:
            return int(action)
        pressed = np.flatnonzero(np.asarray(action))
        return [int(key) for key in pressed]

    def step(self, action):
        if not self.action_space.contains(action if not isinstance(action, int) else np.int64(action)):
            raise ValueError(f"action: {action!r} is not in the action space {self.action_space}")
        previous = self.world.frame
        frame = self.world.step(self._model_action(action))
        self.steps += 1
        reward = float(self.reward_fn(previous, action, frame)) if self.reward_fn is not None else 0.0
        return self._observation(), reward, False, self.steps >= self.max_steps, {}

    def render(self):
        return self._observation() if self.world.frame is not None else None
