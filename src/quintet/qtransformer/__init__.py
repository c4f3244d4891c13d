"""Q-Transformer (Chebotar et al. 2023): scalable offline RL via autoregressive Q-functions.

:class:`QTransformerSystem` (presets ``tiny``, ``cartpole``, ``demo``, ``lunarlander-offline``) registers
through the ``quintet.systems`` entry point.
"""

from quintet.qtransformer.config import MaxViTConfig, QTransformerConfig, StateEncoderConfig
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
