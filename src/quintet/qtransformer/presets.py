"""The Q-Transformer's presets: model configs, optimisation settings and each preset's ``RLSettings``
(its recipe: the environment, the data and how it is learned)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from quintet.core.validation import check_int, check_number
from quintet.qtransformer.babyai import ENV_ID as BABYAI_ENV_ID
from quintet.qtransformer.babyai import BabyAIWorld
from quintet.qtransformer.config import (
    InstructionEncoderConfig,
    MaxViTConfig,
    QTransformerConfig,
    StateEncoderConfig,
)
from quintet.registry import Preset, Stage
from quintet.training.task import TrainSettings

OfflinePolicy = Literal["random", "lunar-heuristic", "babyai-bot"]


@dataclass(frozen=True, kw_only=True)
class RLSettings:
    """What a preset learns from and how (the optimiser settings live in ``TrainSettings``)."""

    env_id: str
    gamma: float
    reward_low: float
    reward_high: float
    sparse_rewards: bool = False
    """rewards only on success: scale ``[reward_low, reward_high]`` onto [0, 1] (a success is worth 1);
    False: onto [0, 1 - gamma], so that a dense reward's discounted return stays within [0, 1]"""
    return_range: tuple[float, float] | None = None
    """dense rewards: scale so that discounted returns in this range span [0, 1] (rewards clipped to
    ``[reward_low, reward_high]``), for finer Q resolution than the worst case ``1 - gamma`` allows"""
    conservative_weight: float = 1.0
    n_step: int = 1
    target_ema: float = 0.99
    eval_episodes: int = 10
    dataset_episodes: int = 0
    """offline presets: size of the fixed dataset"""
    action_noise: float = 0.0
    """offline presets: std of the Gaussian noise added to the heuristic controller's actions (the
    BabyAI bot: the probability of a uniform random action)"""
    steps_per_round: int = 0
    """online-offline presets: optimizer steps between collection rounds (0: offline, a fixed dataset)"""
    initial_episodes: int = 20
    """uniform-random episodes of round 0 (offline CartPole without --data: the whole dataset)"""
    episodes_per_round: int = 10
    """online: epsilon-greedy episodes collected at the start of every later round"""
    epsilon: tuple[float, float] = (0.3, 0.02)
    """online: exploration rate of round 1 and of round ``epsilon_rounds`` on, linear in between"""
    epsilon_rounds: int = 20
    """online: the round from which exploration stays at ``epsilon[1]`` (independent of the step cap)"""
    collect_envs: int = 8
    """environments stepped in lockstep while collecting (one batched policy call per step)"""
    target_return: float | None = None
    """stop training once the greedy evaluation's mean return reaches this"""
    offline_policy: OfflinePolicy = "random"
    """offline presets without ``--data``: who plays the generated dataset (``initial_episodes``
    uniform-random episodes, or ``dataset_episodes`` of gymnasium's LunarLander heuristic with
    ``action_noise``, or of the BabyAI bot)"""

    def __post_init__(self) -> None:
        for name in (
            "n_step",
            "eval_episodes",
            "initial_episodes",
            "episodes_per_round",
            "epsilon_rounds",
            "collect_envs",
        ):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("dataset_episodes", "steps_per_round"):
            check_int(getattr(self, name), name, minimum=0)
        check_number(self.gamma, "gamma", low=0.0, high=1.0, high_open=True)
        check_number(self.target_ema, "target_ema", low=0.0, high=1.0)
        check_number(self.conservative_weight, "conservative_weight", low=0.0)
        check_number(self.action_noise, "action_noise", low=0.0)
        if self.return_range is not None and (
            not isinstance(self.return_range, tuple)
            or len(self.return_range) != 2
            or not self.return_range[0] <= 0.0 <= self.return_range[1]
            or self.sparse_rewards
        ):
            raise ValueError(
                f"return_range: expected (low <= 0, high >= 0) for dense rewards, got {self.return_range!r}"
            )
        if not self.reward_low < self.reward_high:
            raise ValueError(f"reward_low/reward_high: expected low < high, got {self.reward_low} / {self.reward_high}")
        if not isinstance(self.epsilon, tuple) or len(self.epsilon) != 2:
            raise ValueError(f"epsilon: expected a pair (first round, from epsilon_rounds on), got {self.epsilon!r}")
        for value in self.epsilon:
            check_number(value, "epsilon", low=0.0, high=1.0)
        if self.offline_policy not in ("random", "lunar-heuristic", "babyai-bot"):
            raise ValueError(
                f"offline_policy: expected 'random', 'lunar-heuristic' or 'babyai-bot', got {self.offline_policy!r}"
            )


@dataclass(frozen=True, kw_only=True)
class BabyAISettings(RLSettings):
    """An instruction-following preset on BabyAI pixels (:mod:`quintet.qtransformer.babyai`).

    The offline data is ``dataset_episodes`` episodes of the BabyAI bot taking a random action with
    probability ``action_noise``, a share ``misdirected`` of them pursuing another object than the
    instruction names; ``eval_episodes`` held-out seeds per evaluation (right, shuffled and
    retargeted instructions, and guided at ``guided_scale``), ``collect_envs`` stepped in lockstep.
    """

    env_id: str = BABYAI_ENV_ID
    gamma: float = 0.9
    reward_low: float = 0.0
    reward_high: float = 1.0
    sparse_rewards: bool = True
    offline_policy: OfflinePolicy = "babyai-bot"
    world: BabyAIWorld
    misdirected: float = 0.25
    """share of the offline episodes in which the bot pursues another object (purposeful failures)"""
    recover: float = 0.0
    """share of the misdirected episodes in which the bot turns to the instructed object at a random step"""
    random_episodes: float = 0.0
    """share of the offline episodes played by uniform random actions (an untrained policy's failures)"""
    guided_scale: float = 1.5
    """the ``cond_scale`` of the guided evaluation (classifier-free guidance on the instruction)"""
    text_encoder: str | None = None
    """a Hugging Face sentence encoder (local folder, or a hub id in the local cache), frozen; its
    hidden size must be the model's ``text_embed_dim``. None: the model's own instruction encoder"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.world, BabyAIWorld):
            raise TypeError(f"world: expected a BabyAIWorld, got {type(self.world).__name__}")
        check_number(self.action_noise, "action_noise", low=0.0, high=1.0)
        check_number(self.misdirected, "misdirected", low=0.0, high=1.0)
        check_number(self.recover, "recover", low=0.0, high=1.0)
        check_number(self.random_episodes, "random_episodes", low=0.0, high=1.0 - self.misdirected)
        check_number(self.guided_scale, "guided_scale", low=0.0)
        if self.offline_policy != "babyai-bot":
            raise ValueError(f"offline_policy: a BabyAI preset's data is 'babyai-bot', got {self.offline_policy!r}")
        if self.text_encoder is not None and not (isinstance(self.text_encoder, str) and self.text_encoder):
            raise ValueError(f"text_encoder: expected a model path or id, got {self.text_encoder!r}")


TINY = QTransformerConfig(
    num_actions=2,
    action_bins=5,
    encoder=StateEncoderConfig(state_dim=8, dim=16, depth=1, num_tokens=2),
    dim=16,
    depth=1,
    heads=2,
    dim_head=8,
    frames=2,
    num_learned_tokens=2,
    q_head_depth=1,
    q_head_heads=2,
    q_head_dim_head=8,
)

CARTPOLE = QTransformerConfig(
    num_actions=1,
    action_bins=2,
    encoder=StateEncoderConfig(state_dim=4, dim=32, depth=1, num_tokens=2),
    dim=32,
    depth=1,
    heads=2,
    dim_head=16,
    frames=1,
    num_learned_tokens=2,
)

# 8 bins a dimension: a bin holds the actions of four of 32, so its Q-value is fitted on four times the
# transitions, and the greedy argmax picks among 8 estimates instead of 32 noisier ones (measured on the
# same 300 noisy-heuristic episodes, data mean 140: 8 bins 277 after 2000 steps and 280 at the end,
# std 15 over 20 seeds; 32 bins 113 to 215 between runs and checkpoints, std 40 to 140). The data's
# actions are 8-bin actions too: the heuristic's continuous action plus noise, discretised.
LUNARLANDER = QTransformerConfig(
    num_actions=2,
    action_bins=8,
    encoder=StateEncoderConfig(state_dim=8, dim=64, depth=2, num_tokens=2),
    dim=64,
    depth=1,
    heads=4,
    dim_head=16,
    frames=1,
    num_learned_tokens=2,
    q_head_depth=1,
    q_head_heads=4,
    q_head_dim_head=16,
)

BABYAI_LEVELS = ("quintet/BabyAI-GoToDistinctS6N3-v0", "quintet/BabyAI-PickupDistinctS6N3-v0")
"""two instruction families, "go to" and "pick up", each naming one of three objects of a room by colour and
type (18 instructions a family). Objects of distinct colours and types, so one grounded word is enough;
four actions (turn, move, pick up). Chosen for a CPU demo: on BabyAI's GoToLocal + pick up + "open the
door" levels with all seven actions, 1500 steps (26 minutes on a loaded core) reached 0.27 success
(0.20 with a shuffled instruction)"""

# the 7 x 7 cell view at 4 pixels a cell (28 x 28): a patch stem makes one token per cell, attended in one
# 7 x 7 window; the instruction (a bag of words: the encoder has no layers, so each word FiLMs the
# features directly) modulates the stem's cells and the output map the TokenLearner pools
BABYAI = QTransformerConfig(
    num_actions=1,
    action_bins=4,
    encoder=MaxViTConfig(
        channels=3,
        dim=32,
        depth=(1,),
        patch_size=4,
        window_size=7,
        heads=2,
        dim_head=16,
        mbconv_expansion_rate=2.0,
        num_mem_kv=0,
        film_output=True,
    ),
    dim=32,
    depth=1,
    heads=2,
    dim_head=16,
    # one frame: 1.7x the optimizer steps of two in the demo's minutes, which mattered more here than
    # what a second frame shows (babyai-tiny and the tests keep two)
    frames=1,
    num_learned_tokens=4,
    condition_on_text=True,
    text_embed_dim=32,
    cond_drop_prob=0.1,
    instruction_encoder=InstructionEncoderConfig(dim=32, depth=0),
)

BABYAI_TINY = QTransformerConfig(
    num_actions=1,
    action_bins=7,
    encoder=MaxViTConfig(channels=3, dim=16, depth=(1,), window_size=7, heads=2, dim_head=8, num_mem_kv=0),
    dim=16,
    depth=1,
    heads=2,
    dim_head=8,
    frames=2,
    num_learned_tokens=2,
    condition_on_text=True,
    text_embed_dim=16,
    instruction_encoder=InstructionEncoderConfig(dim=16, heads=2, dim_head=8),
)

# the data: the bot with 30 % random actions, 20 % of the episodes misdirected to another object, 35 %
# uniform random (an untrained policy's episodes): success about 0.6 (go to), as the issue asks. Mostly
# purposeful failures (misdirected 0.5 to 0.7, with or without a late turn to the instructed object)
# taught no instruction following in 2 minutes (measured: 0.5 to 0.6 greedy, shuffled within 0.1)
# 5-step returns: the reward reaches the start of a 5 to 10 step episode in one or two backups (measured
# on go to, 120 s: 1-step 0.52 with two frames; 3-step 0.65, 5-step 0.72, 10-step 0.65 with one)
# 5000 episodes (generated in about a minute): offline, greedy success 0.785 over 200 held-out seeds after
# 10,000 steps, against 0.75 from 1500 episodes after 20,000. 200 evaluation seeds, because 60 read up to
# 0.09 above the 300-seed rate (a success rate over n seeds has a standard error of about 0.4 / sqrt(n)).
# Nearly every failure of the offline policy is a deadlock (eval_deadlock_rate 0.195 of 0.215): facing
# a distractor that stands between it and the instructed object, it moves forward into it, the view does
# not change, and the greedy policy repeats the move until time runs out. The bot walks around such
# objects, so the data barely shows the state; the policy's own episodes do: two rounds of 1500 of them
# (epsilon 0.05, at steps 5000 and 10,000) made it 0.835, deadlocks 0.105 (0.07 at step 14,000).
BABYAI_RL = BabyAISettings(
    world=BabyAIWorld(levels=BABYAI_LEVELS, tile_size=4, max_steps=20, num_actions=4),
    n_step=5,
    dataset_episodes=5000,
    action_noise=0.3,
    misdirected=0.2,
    random_episodes=0.35,
    eval_episodes=200,
    collect_envs=16,
    steps_per_round=5000,
    episodes_per_round=1500,
    epsilon=(0.05, 0.05),
    epsilon_rounds=1,
)

BABYAI_TINY_RL = BabyAISettings(
    world=BabyAIWorld(levels=("BabyAI-GoToLocalS6N2-v0",), tile_size=4, max_steps=8),
    dataset_episodes=6,
    action_noise=0.3,
    eval_episodes=2,
    collect_envs=2,
)

# three rounds: the bot's data, then the policy's episodes at steps 5000 and 10,000 (20,000 steps with a
# third round at 15,000 measured the same, 0.83 at step 16,000)
BABYAI_TRAIN = TrainSettings(
    steps=15_000,
    batch_size=32,
    lr=1e-3,
    warmup_steps=50,
    weight_decay=0.0,
    eval_every=2000,
    checkpoint_every=2000,
    log_every=100,
)

# Online rounds re-collect with the current policy; the conservative penalty (eq. 2) would pin the
# Q-values of the bins epsilon-greedy rarely takes and lock in the behaviour policy (measured: the
# return plateaued near 120 with weight 0.1), so this preset, unlike the offline one, turns it off.
CARTPOLE_RL = RLSettings(
    env_id="CartPole-v1",
    gamma=0.99,
    reward_low=0.0,
    reward_high=1.0,
    conservative_weight=0.0,
    steps_per_round=500,
    epsilon_rounds=60,
    target_return=475.0,
)

TINY_RL = RLSettings(
    env_id="LunarLanderContinuous-v3",
    gamma=0.98,
    reward_low=-10.0,
    reward_high=10.0,
    initial_episodes=4,
    collect_envs=4,
    eval_episodes=2,
)
"""two action dimensions and two stacked frames, end to end in seconds"""

# Rewards keep their crash (-100) and landing (+100) bonuses, and the data's discounted returns (-176
# to 157) span the Q range; a termination continues in the absorbing state (RewardScaler.terminal_value).
# The former scale (rewards clipped to +-10 onto [0, 1 - gamma], terminations worth 0) valued every
# termination as -10 per step forever: the policy learned to hover instead of landing (measured 153.7,
# the noise-free heuristic that lands 284.7); the terminal value alone with the +-10 clip made a crash
# (-10 once) cheaper than hovering's fuel (measured -547: it crashed).
LUNARLANDER_RL = RLSettings(
    env_id="LunarLanderContinuous-v3",
    gamma=0.99,
    reward_low=-100.0,
    reward_high=100.0,
    return_range=(-200.0, 200.0),
    conservative_weight=1.0,
    n_step=1,
    eval_episodes=20,
    dataset_episodes=300,
    action_noise=0.6,
    offline_policy="lunar-heuristic",
)

# a cap: the run stops at the target return (measured: step 12500 of 30000, 233 s on 2 cores); the
# evaluation after each 500-step round is what the stop reads
CARTPOLE_TRAIN = TrainSettings(
    steps=30_000, batch_size=128, lr=1e-3, warmup_steps=100, weight_decay=0.0, eval_every=500, checkpoint_every=2500
)

LUNARLANDER_TRAIN = TrainSettings(
    steps=5000,
    batch_size=128,
    lr=5e-4,
    warmup_steps=200,
    weight_decay=0.0,
    ema_decay=0.995,
    eval_every=1000,
    checkpoint_every=7000,
    log_every=100,
)


def qtransformer_presets(system: str) -> dict[str, Preset]:
    def preset(name, description, data, minutes, config, settings, rl) -> Preset:
        stage = Stage(model_config=config, settings=settings)
        return Preset(
            system=system,
            name=name,
            description=description,
            data=data,
            expected_minutes=minutes,
            stages=(stage,),
            recipe=rl,
        )

    return {
        "tiny": preset(
            "tiny",
            "smallest model (2 action dimensions, 2 stacked frames), for tests",
            "4 uniform-random LunarLanderContinuous-v3 episodes",
            0.01,
            TINY,
            TrainSettings(steps=20, batch_size=4, lr=1e-3, warmup_steps=2, eval_every=10, log_every=5),
            TINY_RL,
        ),
        "cartpole": preset(
            "cartpole",
            "CartPole-v1: epsilon-greedy collection rounds + offline training until return >= 475",
            "CartPole-v1 (gymnasium), collected online into the run folder (or a --data ReplayDataset)",
            5.0,
            CARTPOLE,
            CARTPOLE_TRAIN,
            CARTPOLE_RL,
        ),
        "demo": preset(
            "demo",
            "the demo's first part: the cartpole preset under the demo's time budget",
            "CartPole-v1 (gymnasium), collected online",
            10.0,
            CARTPOLE,
            CARTPOLE_TRAIN,
            CARTPOLE_RL,
        ),
        "babyai-tiny": preset(
            "babyai-tiny",
            "smallest pixel + instruction model (BabyAI, 28 x 28 RGB views, 2 frames), for tests",
            "6 BabyAI-GoToLocalS6N2 episodes of the noisy BabyAI bot",
            0.01,
            BABYAI_TINY,
            TrainSettings(steps=20, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=0, log_every=5),
            BABYAI_TINY_RL,
        ),
        "babyai": preset(
            "babyai",
            "BabyAI from pixels + instructions: go to / pick up, from the noisy bot, then two rounds of its own",
            "5000 BabyAI episodes (2 levels) of the bot with action noise and misdirected failures, then "
            "2 x 1500 epsilon-greedy episodes of the policy, collected into the run folder",
            15.0,
            BABYAI,
            BABYAI_TRAIN,
            BABYAI_RL,
        ),
        "lunarlander-offline": preset(
            "lunarlander-offline",
            "LunarLanderContinuous, 2 dims x 8 bins, offline from 300 noisy heuristic episodes",
            "LunarLanderContinuous-v3 episodes of the gymnasium heuristic with action noise",
            3.0,
            LUNARLANDER,
            LUNARLANDER_TRAIN,
            LUNARLANDER_RL,
        ),
    }
