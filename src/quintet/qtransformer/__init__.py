"""Q-Transformer (Chebotar et al. 2023): scalable offline RL via autoregressive Q-functions.

:class:`QTransformerSystem` (presets ``tiny``, ``cartpole``, ``demo``, ``lunarlander-offline``,
``babyai-tiny``, ``babyai``) registers through the ``quintet.systems`` entry point. BabyAI presets learn
from RGB views and language instructions (:mod:`quintet.qtransformer.babyai`).
"""

from quintet.qtransformer.babyai import BabyAIWorld
from quintet.qtransformer.config import (
    InstructionEncoderConfig,
    MaxViTConfig,
    QTransformerConfig,
    StateEncoderConfig,
)
from quintet.qtransformer.data import (
    ActionDiscretiser,
    Episode,
    ReplayDataset,
    ReplaySpec,
    RewardScaler,
    collect_episodes,
    evaluate,
    from_minari,
    rollout,
    to_minari,
)
from quintet.qtransformer.instructions import HFSentenceEncoder, InstructionEncoder
from quintet.qtransformer.learner import QLearner
from quintet.qtransformer.maxvit import MaxViT
from quintet.qtransformer.model import QTransformer, StateEncoder
from quintet.qtransformer.presets import BabyAISettings, RLSettings
from quintet.qtransformer.system import QTransformerSystem
from quintet.qtransformer.token_learner import TokenLearner

__all__ = [
    "ActionDiscretiser",
    "BabyAISettings",
    "BabyAIWorld",
    "Episode",
    "HFSentenceEncoder",
    "InstructionEncoder",
    "InstructionEncoderConfig",
    "MaxViT",
    "MaxViTConfig",
    "QLearner",
    "QTransformer",
    "QTransformerConfig",
    "QTransformerSystem",
    "RLSettings",
    "ReplayDataset",
    "ReplaySpec",
    "RewardScaler",
    "StateEncoder",
    "StateEncoderConfig",
    "TokenLearner",
    "collect_episodes",
    "evaluate",
    "from_minari",
    "rollout",
    "to_minari",
]
