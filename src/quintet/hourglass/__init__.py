"""Hourglass: a hierarchical transformer LM (Nawrot et al. 2021) and its equal-size flat baseline."""

from quintet.core.generation import generate
from quintet.hourglass.config import FlatConfig, HourglassConfig
from quintet.hourglass.model import (
    FlatLM,
    HourglassCache,
    HourglassLM,
    HourglassTransformer,
    count_parameters,
    flat_baseline,
)
from quintet.hourglass.system import HourglassRecipe, HourglassSystem

__all__ = [
    "FlatConfig",
    "FlatLM",
    "HourglassCache",
    "HourglassConfig",
    "HourglassLM",
    "HourglassRecipe",
    "HourglassSystem",
    "HourglassTransformer",
    "count_parameters",
    "flat_baseline",
    "generate",
]
