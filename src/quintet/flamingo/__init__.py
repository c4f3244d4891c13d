"""Flamingo (Alayrac et al. 2022): a language model given eyes, learning new tasks from a few examples in its prompt."""

from quintet.flamingo.config import FlamingoConfig, ImageClassifierConfig, LanguageModelConfig, VisionConfig
from quintet.flamingo.model import CausalLM, Flamingo, FlamingoCache, flamingo_flops
from quintet.flamingo.vision import ConvEncoder, ImageClassifier, PerceiverResampler, VisionTransformer
from quintet.flamingo.xattn import GatedCrossAttentionBlock, media_attention_mask, media_time

__all__ = [
    "CausalLM",
    "ConvEncoder",
    "Flamingo",
    "FlamingoCache",
    "FlamingoConfig",
    "GatedCrossAttentionBlock",
    "ImageClassifier",
    "ImageClassifierConfig",
    "LanguageModelConfig",
    "PerceiverResampler",
    "VisionConfig",
    "VisionTransformer",
    "flamingo_flops",
    "media_attention_mask",
    "media_time",
]
