"""Genie: a world model learned from recorded play (Bruce et al. 2024; Genie 2).

Models: :class:`FrameTokenizer` (frames <-> tokens), :class:`LatentActionModel` (actions from video),
:class:`Genie` (the dynamics transformer); :class:`FrameDecoder` / :func:`imagine` produce frames.
``quintet.genie.world`` (``World``, ``WorldModelEnv``) and ``quintet.genie.play`` need gymnasium /
pygame-ce; ``quintet.genie.system`` plugs the three stages into the registry.
"""

from quintet.genie.config import GenieConfig, LatentActionConfig, TokenizerConfig
from quintet.genie.dynamics import Genie, GenieOutput
from quintet.genie.generation import FrameDecoder, imagine
from quintet.genie.latent_actions import LatentActionModel, normalized_mutual_information
from quintet.genie.objectives import ClipBatch, dynamics_loss, training_choices
from quintet.genie.tokenizer import FrameTokenizer

__all__ = [
    "ClipBatch",
    "FrameDecoder",
    "FrameTokenizer",
    "Genie",
    "GenieConfig",
    "GenieOutput",
    "LatentActionConfig",
    "LatentActionModel",
    "TokenizerConfig",
    "dynamics_loss",
    "imagine",
    "normalized_mutual_information",
    "training_choices",
]
