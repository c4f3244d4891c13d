"""RQ-Transformer (Lee et al. 2022): residual-quantized image codes and a fast two-level prior over them.

- :class:`RQVAE` codes images as ``(h, w, D)`` residual codes (``quintet.core.quantize``) and decodes them;
- :class:`RQTransformer` samples codes: a spatial transformer over positions, a depth transformer over
  each position's ``D`` codes, both KV-cached;
- :class:`FlatCodeLM` is the equal-parameter baseline over all ``h * w * D`` codes (:func:`flat_baseline`);
- ``quintet.rqtransformer.system`` trains them as two stages (``tokenizer`` then ``prior``).
"""

from quintet.rqtransformer.classifier import ClassifierConfig, ImageClassifier, trained_classifier
from quintet.rqtransformer.config import FlatCodeLMConfig, RQTransformerConfig, RQVAEConfig
from quintet.rqtransformer.flat import FlatCodeLM, count_parameters, flat_baseline
from quintet.rqtransformer.model import RQTransformer
from quintet.rqtransformer.rqvae import RQVAE, RQVAEOutput, psnr_from_mse

__all__ = [
    "ClassifierConfig",
    "FlatCodeLM",
    "FlatCodeLMConfig",
    "ImageClassifier",
    "RQTransformer",
    "RQTransformerConfig",
    "RQVAE",
    "RQVAEConfig",
    "RQVAEOutput",
    "count_parameters",
    "flat_baseline",
    "psnr_from_mse",
    "trained_classifier",
]
