"""The BabyAI env and its expert, for :mod:`quintet.qtransformer.babyai` (``rl`` extra: gymnasium, minigrid)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI levels)
import numpy as np
from minigrid.core.constants import COLOR_NAMES
from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel
from minigrid.envs.babyai.core.verifier import GoToInstr, ObjDesc, OpenInstr, PickupInstr

from quintet.core.validation import check_number
from quintet.qtransformer.babyai import ENV_ID, NUM_ACTIONS, BabyAIWorld, family_of


def _quiet(function, *args, **kwargs):
    """Call ``function`` with stdout swallowed (MiniGrid prints each rejected level layout it re-samples)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


_NO_BOT = object()
"""the bot gave up this episode (a state it was not written for, after a noisy action)"""


class BabyAIEnv(gym.Env):
    """Several BabyAI levels as one env with RGB partial-view observations.

    ``reset(seed=s)`` plays level ``s % L`` with seed ``s`` and returns the frame ``(3, H, W)`` uint8
    and ``info`` with ``mission``, ``family``, ``level`` and ``seed``; ``options={"goal": "other"}``
    retargets the instruction to another object of the same start (the env then rewards reaching
    that one). :meth:`expert_action` is the BabyAI bot's next action from the current state (the bot
    tracks the actions actually taken, so it recovers from noisy ones; call it once per step).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self, levels: Sequence[str], tile_size: int = 4, max_steps: int | None = None, num_actions: int = NUM_ACTIONS
    ):
        self.world = BabyAIWorld(
            levels=tuple(levels), tile_size=tile_size, max_steps=max_steps, num_actions=num_actions
        )
        size = self.world.image_size
        self.observation_space = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        self.action_space = gym.spaces.Discrete(num_actions)
        self.render_mode = "rgb_array"
        self._levels: dict[str, Any] = {}
        self._env: Any = None
        self._bot: Any = None
        self._taken: int | None = None
        self._seed: int | None = None
        self.mission = ""
        self.level = ""

    def _level_env(self, level: str) -> Any:
        if level not in self._levels:
            kwargs = {} if self.world.max_steps is None else {"max_steps": self.world.max_steps}
            self._levels[level] = gym.make(level, **kwargs)
        return self._levels[level]

    @property
    def grid_env(self) -> Any:
        """The MiniGrid level being played (``unwrapped``)."""
        if self._env is None:
            raise RuntimeError("env: call reset first")
        return self._env.unwrapped

    def frame(self) -> np.ndarray:
        """The agent's view as RGB ``(3, H, W)`` uint8."""
        image = self.grid_env.get_frame(tile_size=self.world.tile_size, agent_pov=True)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def render(self) -> np.ndarray:
        return self.frame().transpose(1, 2, 0)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        levels = self.world.levels
        self.level = levels[seed % len(levels) if seed is not None else int(self.np_random.integers(len(levels)))]
        self._env = self._level_env(self.level)
        observation, _ = _quiet(self._env.reset, seed=seed)
        self.mission, self._seed = observation["mission"], seed
        self._bot, self._taken = None, None
        goal = (options or {}).get("goal", "instructed")
        if goal == "other":
            other = self.other_instruction(np.random.default_rng(seed))
            if other is not None:
                other.reset_verifier(self.grid_env)
                self.grid_env.instrs = other
                self.mission = other.surface(self.grid_env)
        elif goal != "instructed":
            raise ValueError(f"options: goal is 'instructed' or 'other', got {goal!r}")
        return self.frame(), self.info()

    def info(self) -> dict[str, Any]:
        return {"mission": self.mission, "family": family_of(self.mission), "level": self.level, "seed": self._seed}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._env is None:
            raise RuntimeError("step: call reset first")
        action = int(np.asarray(action).reshape(-1)[0])
        if not 0 <= action < self.world.num_actions:
            raise ValueError(f"action: expected an id in [0, {self.world.num_actions}), got {action}")
        _, reward, terminated, truncated, _ = self._env.step(action)
        self._taken = action
        return self.frame(), float(reward), bool(terminated), bool(truncated), self.info()

    @property
    def step_count(self) -> int:
        return int(self.grid_env.step_count)

    # -- the expert

    def other_instruction(self, rng: np.random.Generator) -> Any:
        """The current instruction retargeted to another object of the scene (same verb), or None.

        Another object is one the instruction does not describe, of the same kind (a door for a door,
        a ball / box / key otherwise), with a colour and type no described object shares.
        """
        instrs = self.grid_env.instrs
        desc = getattr(instrs, "desc", None)
        if desc is None:  # sequences ("... then ...") and put-next instructions have no single target
            return None
        described = {(obj.type, obj.color) for obj in desc.obj_set}
        doors = desc.type == "door"
        candidates = sorted(
            {
                (obj.type, obj.color)
                for obj in self.grid_env.grid.grid
                if obj is not None
                and (obj.type == "door") == doors
                and obj.type in ("door", "ball", "box", "key")
                and (obj.type, obj.color) not in described
            }
        )
        if not candidates:
            return None
        kind, color = candidates[int(rng.integers(len(candidates)))]
        return type(instrs)(ObjDesc(kind, color))

    def misdirect(self, rng: np.random.Generator) -> bool:
        """Make the bot pursue another object for the rest of the episode (the env still rewards the
        instructed one): a purposeful failure. False where the scene has no other object."""
        other = self.other_instruction(rng)
        if other is None:
            return False
        from minigrid.utils.baby_ai_bot import BabyAIBot

        instructed = self.grid_env.instrs
        other.reset_verifier(self.grid_env)
        self.grid_env.instrs = other  # the bot reads its goal from the env once, when it is built
        try:
            self._bot = _quiet(BabyAIBot, self._env)
        finally:
            self.grid_env.instrs = instructed
        return True

    def follow_instruction(self) -> None:
        """The bot pursues the instructed object from here on (after :meth:`misdirect`)."""
        self._bot = None

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


def make_envs(world: BabyAIWorld, count: int = 1) -> list[BabyAIEnv]:
    """``count`` envs playing ``world``; each has the gymnasium spec ``ENV_ID`` with ``world.env_kwargs``
    (what Minari records of it)."""
    if not isinstance(world, BabyAIWorld):
        raise TypeError(f"world: expected a BabyAIWorld, got {type(world).__name__}")
    return [gym.make(ENV_ID, **world.env_kwargs).unwrapped for _ in range(count)]


def bot_policy(
    env: BabyAIEnv,
    rng: np.random.Generator,
    *,
    noise: float,
    misdirected: float = 0.0,
    recover: float = 0.0,
    random_episodes: float = 0.0,
):
    """The BabyAI bot in ``env`` (ONE env: the bot reads its state), the data of the paper's setting.

    Each step takes a uniform random action with probability ``noise`` (and when the bot gives up or
    names an action the env does not have), else the bot's; a share ``misdirected`` of the episodes
    the bot pursues another object than the instruction names (failed episodes that look purposeful),
    and a share ``recover`` of those turns to the instructed object at a random step (a detour: the
    data then shows how to leave a wrong object, and succeeds when time is left); a share
    ``random_episodes`` of the episodes takes uniform random actions throughout (an untrained policy's
    autonomously collected episodes, mostly failed).
    """
    check_number(noise, "noise", low=0.0, high=1.0)
    check_number(misdirected, "misdirected", low=0.0, high=1.0)
    check_number(recover, "recover", low=0.0, high=1.0)
    check_number(random_episodes, "random_episodes", low=0.0, high=1.0)
    if misdirected + random_episodes > 1.0:
        raise ValueError(f"random_episodes: with misdirected at most 1, got {misdirected} + {random_episodes}")
    switch_at: list[int] = []  # the step at which this episode's detour ends (none: it does not)
    acting_randomly = [False]
    if not isinstance(env, BabyAIEnv):
        raise TypeError(f"env: the bot drives one BabyAIEnv, got {type(env).__name__}")

    def policy(observations: np.ndarray) -> np.ndarray:
        if env.step_count == 0 and env._bot is None:
            switch_at.clear()
            kind = rng.random()
            acting_randomly[0] = misdirected <= kind < misdirected + random_episodes
            if kind < misdirected and env.misdirect(rng) and rng.random() < recover:
                switch_at.append(int(rng.integers(1, env.grid_env.max_steps)))
        if switch_at and env.step_count == switch_at[0]:
            env.follow_instruction()
        expert = env.expert_action()
        explore = acting_randomly[0] or expert is None or expert >= env.world.num_actions or rng.random() < noise
        action = int(rng.integers(env.world.num_actions)) if explore else expert
        return np.full((len(observations), 1), action, dtype=np.int64)

    return policy


# ---------------------------------------------------------------------------- two levels BabyAI lacks


class PickupLocal(RoomGridLevel):
    """Pick up the named one of ``num_dists`` distinct objects in one room ("pick up the red ball")."""

    def __init__(self, room_size: int = 6, num_dists: int = 2, **kwargs):
        self.num_dists = num_dists
        super().__init__(num_rows=1, num_cols=1, room_size=room_size, **kwargs)

    def gen_mission(self) -> None:
        self.place_agent()
        objs = self.add_distractors(num_distractors=self.num_dists, all_unique=True)
        self.check_objs_reachable()
        obj = self._rand_elem(objs)
        self.instrs = PickupInstr(ObjDesc(obj.type, obj.color))


class DistinctObjects(RoomGridLevel):
    """``num_objs`` objects of one room, no two of the same colour or type; the instruction names one
    ("go to the red ball" / "pick up the grey key"), so its colour word alone, or its type word alone,
    tells which: grounding one word is enough, which a policy learns from pixels in minutes on a CPU
    (BabyAI's ``GoToLocal`` may need both words, or names one of two identical objects)."""

    def __init__(self, verb: str = "go to", room_size: int = 6, num_objs: int = 3, **kwargs):
        if verb not in ("go to", "pick up"):
            raise ValueError(f"verb: expected 'go to' or 'pick up', got {verb!r}")
        if not 1 <= num_objs <= 3:
            raise ValueError(f"num_objs: expected 1 to 3 (ball, box, key), got {num_objs}")
        self.verb, self.num_objs = verb, num_objs
        super().__init__(num_rows=1, num_cols=1, room_size=room_size, **kwargs)

    def gen_mission(self) -> None:
        self.place_agent()
        kinds = self._rand_subset(["ball", "box", "key"], self.num_objs)
        colors = self._rand_subset(COLOR_NAMES, self.num_objs)
        objs = [self.add_object(0, 0, kind, color)[0] for kind, color in zip(kinds, colors)]
        self.check_objs_reachable()
        obj = self._rand_elem(objs)
        instr = GoToInstr if self.verb == "go to" else PickupInstr
        self.instrs = instr(ObjDesc(obj.type, obj.color))


class OpenDoorColor(RoomGridLevel):
    """Open the named one of the four doors of the room ("open the blue door").

    BabyAI's ``OpenDoorColor`` always names the door on the same wall (its first), so a policy that
    ignores the colour solves it; here the named door is drawn among the four.
    """

    def gen_mission(self) -> None:
        colors = self._rand_subset(COLOR_NAMES, 4)
        doors = [self.add_door(1, 1, door_idx=i, color=color, locked=False)[0] for i, color in enumerate(colors)]
        door = self._rand_elem(doors)
        self.place_agent(1, 1)
        self.instrs = OpenInstr(ObjDesc(door.type, color=door.color))


_HERE = "quintet.qtransformer.babyai_env"
gym.register(ENV_ID, entry_point=f"{_HERE}:BabyAIEnv", disable_env_checker=True)
gym.register("quintet/BabyAI-PickupLocalS6N2-v0", entry_point=f"{_HERE}:PickupLocal")
gym.register("quintet/BabyAI-OpenDoorColor-v0", entry_point=f"{_HERE}:OpenDoorColor")
gym.register("quintet/BabyAI-GoToDistinctS6N3-v0", entry_point=f"{_HERE}:DistinctObjects", kwargs={"verb": "go to"})
gym.register("quintet/BabyAI-PickupDistinctS6N3-v0", entry_point=f"{_HERE}:DistinctObjects", kwargs={"verb": "pick up"})
