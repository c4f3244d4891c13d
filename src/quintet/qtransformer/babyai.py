"""BabyAI (MiniGrid): the Q-Transformer paper's setting, embedded: pixels, instructions, sparse success.

Chebotar et al. learn robot skills offline from camera images and a language instruction, with a
reward only on success, from demonstrations plus autonomously collected failures. BabyAI
(Chevalier-Boisvert et al. 2019, the ``minigrid`` package, ``rl`` extra) is that setting on a
laptop: a grid world seen from the agent (a 7 x 7 cell partial view rendered as RGB), a mission
string per episode ("go to the red ball", "open the blue door", "pick up a key"), a reward
``1 - 0.9 t / T`` on success and 0 otherwise, and a scripted expert, the BabyAI bot.

:class:`BabyAIEnv` plays several levels as one gymnasium env (level ``seed % L``), observes RGB
frames ``(3, 7 t, 7 t)`` uint8 and reports the mission in ``info``; :func:`bot_policy` is the bot
with action noise (the offline data); :func:`family_of` groups missions by their verb phrase, the
instruction families the metrics are reported by. MiniGrid's action space is one discrete
dimension of 7 actions (left, right, forward, pickup, drop, toggle, done): the Q-Transformer bins it
as one action dimension of 7 bins (its single-step Q head).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from quintet.core.validation import check_int, check_number

FAMILIES = ("go to", "pick up", "open", "put")
"""verb phrases that start BabyAI missions; a mission's family is the one it starts with"""
VIEW_CELLS = 7
"""MiniGrid's default agent view: 7 x 7 cells ahead of and beside the agent"""
NUM_ACTIONS = 7


def family_of(mission: str) -> str:
    """The instruction family of a mission: its leading verb phrase ("go to", "pick up", "open", ...)."""
    text = mission.strip().lower()
    return next((family for family in FAMILIES if text.startswith(family)), text.split(" ", 1)[0])


@dataclass(frozen=True, kw_only=True)
class BabyAIWorld:
    """Which BabyAI levels are played and how they are seen."""

    levels: tuple[str, ...]
    """gymnasium ids of BabyAI levels; episode seed ``s`` plays ``levels[s % len(levels)]``"""
    tile_size: int = 4
    """pixels per grid cell: the 7 x 7 view renders as ``(3, 7 * tile_size, 7 * tile_size)``"""
    max_steps: int | None = None
    """episode step limit (None: each level's own, ``1 - 0.9 t / T`` success rewards use it)"""

    def __post_init__(self) -> None:
        if not isinstance(self.levels, tuple) or not self.levels or not all(isinstance(x, str) for x in self.levels):
            raise ValueError(f"levels: expected a non-empty tuple of BabyAI env ids, got {self.levels!r}")
        check_int(self.tile_size, "tile_size")
        if self.max_steps is not None:
            check_int(self.max_steps, "max_steps")

    @property
    def image_size(self) -> int:
        return VIEW_CELLS * self.tile_size

    def make(self, count: int = 1) -> list[BabyAIEnv]:
        return [BabyAIEnv(self) for _ in range(count)]


def _quiet(function, *args, **kwargs):
    """Call ``function`` with stdout swallowed (MiniGrid prints each rejected level layout it re-samples)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


class BabyAIEnv(gym.Env):
    """Several BabyAI levels as one env with RGB partial-view observations.

    ``reset(seed=s)`` plays level ``s % L`` with seed ``s`` and returns the frame ``(3, H, W)`` uint8
    and ``info`` with ``mission``, ``family`` and ``level``. :meth:`expert_action` is the BabyAI bot's
    next action from the current state (it tracks the actions actually taken, so it recovers from
    noisy ones; call it at most once per step).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, world: BabyAIWorld):
        import minigrid  # noqa: F401  (registers the BabyAI levels)

        if not isinstance(world, BabyAIWorld):
            raise TypeError(f"world: expected a BabyAIWorld, got {type(world).__name__}")
        self.world = world
        size = world.image_size
        self.observation_space = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        self.action_space = gym.spaces.Discrete(NUM_ACTIONS)
        self.render_mode = "rgb_array"
        self._levels: dict[str, Any] = {}
        self._env: Any = None
        self._bot: Any = None
        self._taken: int | None = None
        self.mission = ""
        self.level = ""

    def _level_env(self, level: str) -> Any:
        if level not in self._levels:
            kwargs = {} if self.world.max_steps is None else {"max_steps": self.world.max_steps}
            self._levels[level] = gym.make(level, **kwargs)
        return self._levels[level]

    def frame(self) -> np.ndarray:
        """The agent's view as RGB ``(3, H, W)`` uint8."""
        image = self._env.unwrapped.get_frame(tile_size=self.world.tile_size, agent_pov=True)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def render(self) -> np.ndarray:
        return self.frame().transpose(1, 2, 0)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        levels = self.world.levels
        self.level = levels[seed % len(levels) if seed is not None else int(self.np_random.integers(len(levels)))]
        self._env = self._level_env(self.level)
        observation, _ = _quiet(self._env.reset, seed=seed)
        self.mission = observation["mission"]
        self._bot, self._taken = None, None
        return self.frame(), self.info()

    def info(self) -> dict[str, str]:
        return {"mission": self.mission, "family": family_of(self.mission), "level": self.level}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._env is None:
            raise RuntimeError("step: call reset first")
        action = int(np.asarray(action).reshape(-1)[0])
        if not 0 <= action < NUM_ACTIONS:
            raise ValueError(f"action: expected an id in [0, {NUM_ACTIONS}), got {action}")
        _, reward, terminated, truncated, _ = self._env.step(action)
        self._taken = action
        return self.frame(), float(reward), bool(terminated), bool(truncated), self.info()

    def expert_action(self) -> int | None:
        """The bot's next action, or None where the bot cannot go on (after a noisy action it cannot undo)."""
        from minigrid.utils.baby_ai_bot import BabyAIBot

        if self._bot is _NO_BOT:
            return None
        try:
            if self._bot is None:
                self._bot = _quiet(BabyAIBot, self._env)
            return int(_quiet(self._bot.replan, self._taken))
        except Exception:  # the bot raises on states it was not written for (a box opened by a noisy toggle)
            self._bot = _NO_BOT
            return None
        finally:
            self._taken = None


_NO_BOT = object()


def bot_policy(envs: Sequence[BabyAIEnv], noise: float, rng: np.random.Generator):
    """The BabyAI bot acting in ``envs[0]`` with probability ``1 - noise``, else a uniform random action.

    A rollout policy for ONE env (the bot reads the env's state, not the observation).
    """
    check_number(noise, "noise", low=0.0, high=1.0)
    if len(envs) != 1:
        raise ValueError(f"envs: the bot policy drives one env, got {len(envs)}")
    env = envs[0]

    def policy(observations: np.ndarray) -> np.ndarray:
        expert = env.expert_action()
        explore = expert is None or rng.random() < noise
        action = int(rng.integers(NUM_ACTIONS)) if explore else expert
        return np.full((len(observations), 1), action, dtype=np.int64)

    return policy
