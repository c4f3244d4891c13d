"""BabyAI (MiniGrid): the Q-Transformer paper's setting, embedded: pixels, instructions, sparse success.

Chebotar et al. learn robot skills offline from camera images and a language instruction, with a
reward only on success, from demonstrations plus autonomously collected failures. BabyAI
(Chevalier-Boisvert et al. 2019, the ``minigrid`` package, ``rl`` extra) is that setting on a
laptop: a grid world seen from the agent (a 7 x 7 cell partial view rendered as RGB), a mission
string per episode ("go to the red ball", "open the blue door", "pick up the grey key"), a reward
``1 - 0.9 t / T`` on success and 0 otherwise, and a scripted expert, the BabyAI bot.

This module is the part that needs no gymnasium (settings, families); the env, the bot and
:func:`~quintet.qtransformer.babyai_env.make_envs` (a world's envs) live in
:mod:`quintet.qtransformer.babyai_env` (``rl`` extra).

- :class:`BabyAIEnv` plays several levels as one gymnasium env (level ``seed % L``), observes RGB
  frames ``(3, 7 t, 7 t)`` uint8 and reports the mission in ``info``. ``reset(options={"goal":
  "other"})`` keeps the start but retargets the instruction to another object of the scene.
- :func:`bot_policy`: the offline data, the way the paper gets it: the bot with action noise, and a
  share of failed episodes in which the bot pursues another object than the instruction names.
- :func:`family_of`: a mission's instruction family, its leading verb phrase.

MiniGrid's action space is one discrete dimension of 7 actions (left, right, forward, pickup, drop,
toggle, done): the Q-Transformer bins it as one action dimension, one bin per action (its single-step
Q head); a world may keep only the first ``num_actions`` (go to / pick up need 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from quintet.core.validation import check_int

FAMILIES = ("go to", "pick up", "open", "put")
"""verb phrases that start BabyAI missions; a mission's family is the one it starts with"""
VIEW_CELLS = 7
"""MiniGrid's default agent view: 7 x 7 cells ahead of and beside the agent"""
NUM_ACTIONS = 7
"""MiniGrid's actions: left, right, forward, pickup, drop, toggle, done"""
ENV_ID = "quintet/BabyAI-v0"
"""the gymnasium id of :class:`BabyAIEnv` (kwargs ``levels``, ``tile_size``, ``max_steps``)"""


def family_of(mission: str) -> str:
    """The instruction family of a mission: its leading verb phrase ("go to", "pick up", "open", ...)."""
    text = str(mission).strip().lower()
    return next((family for family in FAMILIES if text.startswith(family)), text.split(" ", 1)[0])


@dataclass(frozen=True, kw_only=True)
class BabyAIWorld:
    """Which BabyAI levels are played and how they are seen."""

    levels: tuple[str, ...]
    """gymnasium ids of BabyAI levels; episode seed ``s`` plays ``levels[s % len(levels)]``"""
    tile_size: int = 4
    """pixels per grid cell: the 7 x 7 view renders as ``(3, 7 * tile_size, 7 * tile_size)``"""
    max_steps: int | None = None
    """episode step limit (None: each level's own); success rewards ``1 - 0.9 t / T`` use it"""
    num_actions: int = NUM_ACTIONS
    """the first ``num_actions`` of MiniGrid's actions are the env's (one dimension of that many bins):
    3 turn and move, 4 adds pickup (go to / pick up need no more), 6 adds drop and toggle (doors), 7
    adds done. Actions an instruction never needs are not only noise in the data: a no-op repeated by
    a deterministic greedy policy from an unchanged view never ends"""

    def __post_init__(self) -> None:
        if not isinstance(self.levels, tuple) or not self.levels or not all(isinstance(x, str) for x in self.levels):
            raise ValueError(f"levels: expected a non-empty tuple of BabyAI env ids, got {self.levels!r}")
        check_int(self.tile_size, "tile_size")
        if self.max_steps is not None:
            check_int(self.max_steps, "max_steps")
        check_int(self.num_actions, "num_actions", minimum=3)
        if self.num_actions > NUM_ACTIONS:
            raise ValueError(f"num_actions: MiniGrid has {NUM_ACTIONS} actions, got {self.num_actions}")

    @property
    def image_size(self) -> int:
        return VIEW_CELLS * self.tile_size

    @property
    def env_kwargs(self) -> dict:
        """``gymnasium.make(ENV_ID, **env_kwargs)`` makes this world's env (what Minari records)."""
        return {
            "levels": list(self.levels),
            "tile_size": self.tile_size,
            "max_steps": self.max_steps,
            "num_actions": self.num_actions,
        }
