"""Q-Transformer (Chebotar et al. 2023): scalable offline RL via autoregressive Q-functions.

Importing this package registers the ``qtransformer`` system (presets ``tiny``, ``cartpole``,
``lunarlander-offline``).
"""

from quintet.qtransformer.config import MaxViTConfig, QTransformerConfig, StateEncoderConfig
from quintet.qtransformer.data import (
    ActionDiscretiser,
    Episode,
    ReplayDataset,
    RewardScaler,
    collect_episodes,
    evaluate,
    from_minari,
    rollout,
    to_minari,
)
from quintet.qtransformer.learner import QLearner
from quintet.qtransformer.maxvit import MaxViT
from quintet.qtransformer.model import QTransformer, StateEncoder
from quintet.qtransformer.system import QTransformerSystem
from quintet.qtransformer.token_learner import TokenLearner

__all__ = [
    "ActionDiscretiser",
    "Episode",
    "MaxViT",
    "MaxViTConfig",
    "QLearner",
    "QTransformer",
    "QTransformerConfig",
    "QTransformerSystem",
    "ReplayDataset",
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
