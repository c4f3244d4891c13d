"""quintet.core: the building blocks every system composes, each written once."""

from quintet.core import sampling
from quintet.core.attention import Attention, KVCache, LayerCache
from quintet.core.config import (
    CheckpointError,
    PretrainedModel,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from quintet.core.feedforward import FeedForward
from quintet.core.norms import ConditionedNorm, RMSNorm, make_norm
from quintet.core.positions import LearnedPositions, RotaryEmbedding, SinusoidalPositions, apply_rotary
from quintet.core.quantize import QuantizerOutput, ResidualQuantizer, VectorQuantizer
from quintet.core.transformer import Transformer, TransformerBlock

__all__ = [
    "Attention",
    "CheckpointError",
    "ConditionedNorm",
    "FeedForward",
    "KVCache",
    "LayerCache",
    "LearnedPositions",
    "PretrainedModel",
    "QuantizerOutput",
    "RMSNorm",
    "ResidualQuantizer",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "Transformer",
    "TransformerBlock",
    "VectorQuantizer",
    "apply_rotary",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "make_norm",
    "sampling",
    "save_config",
]
