"""Flamingo on Hugging Face models: gated cross-attention in any ``transformers`` causal LM.

``Flamingo.from_hf(language_model, vision_model, ...)`` (or :meth:`HFFlamingo.from_hf`) adds to a
frozen causal LM (GPT-2, Llama, ... any model whose decoder layers sit in one ``nn.ModuleList``)
and a frozen vision model (a CLIP vision tower, or any model whose output has ``last_hidden_state``):

- a Perceiver resampler on the vision features and a gated cross-attention block before every
  ``cross_attn_every``-th decoder layer, run by forward pre-hooks on those layers, so the base
  model's modules and weights stay exactly as they were (its ``state_dict`` keys included);
- two new tokens after the base vocabulary, ``<image>`` (id ``V``) and ``<|endofchunk|>`` (``V + 1``),
  with their own input embeddings and output rows (the base embedding matrix is not resized).

Only the added weights are trained and saved: they are the module's whole ``state_dict`` (the base
models are frozen inputs, not state), so ``model.safetensors`` holds them alone, checkpoints and
resuming work as for any quintet model; ``config.json`` records the base models' names and
``base_models.json`` their configs and a weight fingerprint. Loading
rebuilds the whole from locally available base models and refuses a different base. Decoding
uses the LM's own key/value cache (``DynamicCache``) plus the media keys/values computed once.

Shape glossary: ``b`` batch, ``n`` text tokens, ``m`` media, ``f`` frames, ``l`` latents, ``d`` LM
width, ``e`` vision width, ``V`` base vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from quintet.core import KVCache, PretrainedModel
from quintet.core.config import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_config, load_weights
from quintet.core.generation import check_token_ids, generate
from quintet.core.io import atomic_write_text, read_json
from quintet.core.validation import check_ids, check_int, check_number, check_tensor
from quintet.flamingo.prompt import MediaPrompt
from quintet.flamingo.vision import PerceiverResampler
from quintet.flamingo.xattn import GatedCrossAttentionBlock, MediaContext, media_context

BASE_MODELS_FILE = "base_models.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BASE_PREFIXES = ("language_model.", "vision_model.")


@dataclass(frozen=True, kw_only=True)
class HFFlamingoConfig:
    """The adapter: which base models it sits on (name or local path) and what it adds."""

    language_model: str
    """``from_pretrained`` name or path of the base causal LM"""
    vision_model: str
    """``from_pretrained`` name or path of the vision model (a CLIP model uses its vision tower)"""
    num_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    max_frames: int = 1
    cross_attn_every: int = 1
    cross_attn_heads: int = 8
    cross_attn_dim_head: int = 64
    cross_attn_ff_mult: float = 4.0
    gate_scale: float = 1.0
    """the gates are tanh(gate_scale * alpha); see ``GatedCrossAttentionBlock``"""
    qk_norm: bool = True
    """RMS-normalised queries and keys in the resampler and the cross-attention (see ``FlamingoConfig``)"""
    only_attend_immediate_media: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    """per-channel mean the vision model was trained with (images arrive in [0, 1])"""
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        for name in ("language_model", "vision_model"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name}: expected a model name or path (str), got {getattr(self, name)!r}")
        for name in ("num_latents", "resampler_depth", "resampler_heads", "resampler_dim_head", "max_frames"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("cross_attn_every", "cross_attn_heads", "cross_attn_dim_head"):
            check_int(getattr(self, name), name, minimum=1)
        check_number(self.cross_attn_ff_mult, "cross_attn_ff_mult", low=0.0, low_open=True)
        check_number(self.gate_scale, "gate_scale", low=0.0, low_open=True)
        for name in ("qk_norm", "only_attend_immediate_media"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 3:
                raise ValueError(f"{name}: expected three per-channel numbers, got {value!r}")
        if not all(s > 0 for s in self.image_std):
            raise ValueError(f"image_std: expected positive numbers, got {self.image_std!r}")


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``transformers`` causal LM, found without a table of architectures:
    the ``nn.ModuleList`` holding ``num_hidden_layers`` modules with the most parameters."""
    config = language_model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = getattr(text_config, "num_hidden_layers", None)
    candidates = [
        module
        for module in language_model.modules()
        if isinstance(module, nn.ModuleList) and len(module) == depth and depth
    ]
    if not candidates:
        raise ValueError(f"language_model: found no list of {depth} decoder layers in {type(language_model).__name__}")
    return max(candidates, key=lambda layers: sum(p.numel() for p in layers.parameters()))


def _vision_tower(vision_model: nn.Module) -> tuple[nn.Module, Any]:
    """The image encoder of ``vision_model`` (a CLIP / SigLIP model's vision tower) and its config."""
    config = vision_model.config
    if hasattr(config, "vision_config") and hasattr(vision_model, "vision_model"):
        return vision_model.vision_model, config.vision_config
    return vision_model, config


def _vision_width(config: Any) -> int:
    width = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or [None])[-1]
    if not isinstance(width, int):
        raise ValueError(f"vision_model: cannot tell the feature width of a {type(config).__name__}")
    return width


def _fingerprint(module: nn.Module) -> dict[str, float]:
    """A cheap identity of a model's weights: parameter count and the mean |w| of its first tensor."""
    first = next(iter(module.state_dict().values()))
    count = float(sum(p.numel() for p in module.parameters()))
    return {"parameters": count, "first_abs_mean": first.abs().double().mean().item()}


def _same_fingerprint(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["parameters"] == b["parameters"] and math.isclose(a["first_abs_mean"], b["first_abs_mean"], rel_tol=1e-2)


class HFFlamingoCache:
    """Decoding state: the LM's own cache, the media keys/values of each cross-attention layer, and
    how many media each row has met."""

    def __init__(self, language_model: nn.Module):
        from transformers import DynamicCache

        self.text = DynamicCache(config=language_model.config)
        self.media = KVCache()
        self.num_media = 0
        self.media_seen: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.text.get_seq_length()


class HFFlamingo(PretrainedModel):
    """``model(ids (b, n), images (b, m, [f,] 3, h, w), *, media_mask, cache) -> logits (b, n, V + 2)``.

    ``HFFlamingo(config)`` loads the base models named in ``config``; :meth:`from_hf` wraps models
    already in memory. Inputs follow :class:`~quintet.flamingo.model.Flamingo`: images in [0, 1]
    at the vision model's size, one ``<image>`` token per real image, padding media last.
    """

    config_class = HFFlamingoConfig

    def __init__(
        self,
        config: HFFlamingoConfig,
        *,
        language_model: nn.Module | None = None,
        vision_model: nn.Module | None = None,
        **load_kwargs: Any,
    ):
        super().__init__(config)
        from transformers import AutoModel, AutoModelForCausalLM

        if language_model is None:
            language_model = AutoModelForCausalLM.from_pretrained(config.language_model, **load_kwargs)
        if vision_model is None:
            vision_model = AutoModel.from_pretrained(config.vision_model, **load_kwargs)
        if not hasattr(language_model, "get_input_embeddings") or not hasattr(language_model, "config"):
            raise TypeError(f"language_model: expected a transformers causal LM, got {type(language_model).__name__}")
        self.language_model = language_model.requires_grad_(False)
        self.vision_model = vision_model.requires_grad_(False)
        vision_config = _vision_tower(vision_model)[1]
        self.image_size = getattr(vision_config, "image_size", None)

        embeddings = language_model.get_input_embeddings()
        self.base_vocab, dim = embeddings.num_embeddings, embeddings.embedding_dim
        self.media_token_id, self.end_of_chunk_token_id = self.base_vocab, self.base_vocab + 1
        self.num_tokens = self.base_vocab + 2
        text_config = language_model.config.get_text_config()
        self.max_seq_len = int(getattr(text_config, "max_position_embeddings", None) or 2**31 - 1)
        dim_media = _vision_width(vision_config)

        # new tokens start at the mean base embedding / output row, as in vocabulary extensions
        output = language_model.get_output_embeddings()
        self.extra_embeddings = nn.Parameter(embeddings.weight.detach().float().mean(0).repeat(2, 1).clone())
        self.extra_output = nn.Parameter(output.weight.detach().float().mean(0).repeat(2, 1).clone())
        self.resampler = PerceiverResampler(
            dim_media,
            depth=config.resampler_depth,
            num_latents=config.num_latents,
            heads=config.resampler_heads,
            dim_head=config.resampler_dim_head,
            max_frames=config.max_frames,
            qk_norm=config.qk_norm,
        )
        layers = decoder_layers(language_model)
        self.cross_attn_layers = tuple(range(0, len(layers), config.cross_attn_every))
        self.cross_attn = nn.ModuleDict(
            {
                str(layer): GatedCrossAttentionBlock(
                    dim,
                    dim_media=dim_media,
                    heads=config.cross_attn_heads,
                    dim_head=config.cross_attn_dim_head,
                    ff_mult=config.cross_attn_ff_mult,
                    norm="layer",
                    gate_scale=config.gate_scale,
                    qk_norm=config.qk_norm,
                )
                for layer in self.cross_attn_layers
            }
        )
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(3, 1, 1), persistent=False)
        self._context: tuple[MediaContext, HFFlamingoCache | None] | None = None
        self._final_hidden: torch.Tensor | None = None
        self._in_forward = False
        for layer in self.cross_attn_layers:
            layers[layer].register_forward_pre_hook(self._cross_attention_hook(layer), with_kwargs=True)
        output.register_forward_pre_hook(self._capture_final_hidden)

    @property
    def vision_tower(self) -> nn.Module:
        return _vision_tower(self.vision_model)[0]

    @classmethod
    def from_hf(cls, language_model: nn.Module, vision_model: nn.Module, **options: Any) -> HFFlamingo:
        """Wrap a loaded causal LM and vision model; ``options`` are :class:`HFFlamingoConfig` fields."""
        config = HFFlamingoConfig(
            language_model=getattr(language_model.config, "_name_or_path", "") or "",
            vision_model=getattr(vision_model.config, "_name_or_path", "") or "",
            **options,
        )
        return cls(config, language_model=language_model, vision_model=vision_model)

    # ----------------------------------------------------------------------------------- hooks
    def _cross_attention_hook(self, layer: int):
        block = self.cross_attn[str(layer)]

        def hook(module, args, kwargs):
            if self._context is None:
                return None
            context, cache = self._context
            hidden = args[0] if args else kwargs["hidden_states"]
            layer_cache = cache.media.layer(layer) if cache is not None else None
            attended = block.attend(hidden.to(block.ff_gate.dtype), context, layer_cache).to(hidden.dtype)
            if args:
                return (attended, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": attended}

        return hook

    def _capture_final_hidden(self, module, args):
        if self._in_forward:  # the base LM used on its own keeps working as before
            self._final_hidden = args[0]

    # --------------------------------------------------------------------------------- forward
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``ids`` over the extended vocabulary (base rows stay the base model's)."""
        base = self.language_model.get_input_embeddings()
        embedded = base(ids.clamp(max=self.base_vocab - 1))
        extra = self.extra_embeddings.to(embedded.dtype)[(ids - self.base_vocab).clamp(min=0)]
        return torch.where((ids >= self.base_vocab)[..., None], extra, embedded)

    def encode_media(self, images: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens ``(b, m, l, e)`` of ``images (b, m, [f,] 3, h, w)`` in [0, 1]."""
        check_tensor(images, "images", ndim=(5, 6), dtype="float")
        size = self.image_size
        if images.shape[-3] != 3 or (size is not None and tuple(images.shape[-2:]) != (size, size)):
            shape = f"3, {size}, {size}" if size is not None else "3, h, w"
            raise ValueError(f"images: expected (b, m, [frames,] {shape}) in [0, 1], got {tuple(images.shape)}")
        frames = images if images.ndim == 6 else rearrange(images, "b m c h w -> b m 1 c h w")
        b, m, f = frames.shape[:3]
        if f > self.config.max_frames:
            raise ValueError(f"images: {f} frames per media exceed max_frames={self.config.max_frames}")
        pixels = (rearrange(frames, "b m f c h w -> (b m f) c h w") - self.image_mean) / self.image_std
        parameter = next(self.vision_tower.parameters())
        features = self.vision_tower(pixel_values=pixels.to(parameter.dtype)).last_hidden_state
        if features.ndim == 4:  # a conv net's feature map (N, e, h, w)
            features = rearrange(features, "n e h w -> n (h w) e")
        features = rearrange(features, "(b m f) p e -> b m f p e", b=b, m=m)
        return self.resampler(features.to(self.resampler.latents.dtype), media_mask)

    def new_cache(self) -> HFFlamingoCache:
        return HFFlamingoCache(self.language_model)

    def forward(
        self,
        ids: torch.Tensor,
        images: torch.Tensor | None = None,
        *,
        media_mask: torch.Tensor | None = None,
        cache: HFFlamingoCache | None = None,
    ) -> torch.Tensor:
        check_token_ids(ids, "ids")
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"ids: expected at least one token per row, got shape {tuple(ids.shape)}")
        if not torch.compiler.is_compiling():
            check_ids(ids, "ids", self.num_tokens)
        if cache is not None and not isinstance(cache, HFFlamingoCache):
            raise TypeError(f"cache: expected an HFFlamingoCache (from new_cache()), got {type(cache).__name__}")
        total = (cache.length if cache is not None else 0) + ids.shape[1]
        if total > self.max_seq_len:
            raise ValueError(f"ids: {total} tokens exceed max_seq_len={self.max_seq_len}")
        context = media_context(
            ids,
            images,
            media_mask,
            name="images",
            cache=cache,
            media_token_id=self.media_token_id,
            num_latents=self.config.num_latents,
            only_immediate=self.config.only_attend_immediate_media,
            encode=self.encode_media,
        )
        self._context = (context, cache) if context is not None else None
        self._in_forward = True
        try:
            out = self.language_model(
                inputs_embeds=self.embed(ids),
                cache=cache.text if cache is not None else None,
                use_cache=cache is not None,
            )
            hidden = self._final_hidden
        finally:
            self._context, self._final_hidden, self._in_forward = None, None, False
        extra = hidden.to(self.extra_output.dtype) @ self.extra_output.T  # logits of <image>, <|endofchunk|>
        return torch.cat((out.logits.to(extra.dtype), extra), dim=-1)

    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        images: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """``core.generation.generate`` with the prompt's images; see :meth:`Flamingo.generate`."""
        bound = MediaPrompt(
            self,
            dict(images=images, media_mask=media_mask),
            media_token_id=self.media_token_id,
            num_tokens=self.num_tokens,
            max_seq_len=self.max_seq_len,
        )
        return generate(bound, prompt, max_new_tokens, **options)

    # ------------------------------------------------------------------------------ save / load
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The added weights only: the base models are frozen inputs, rebuilt from their names, not state."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(tuple(prefix + p for p in BASE_PREFIXES))]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the added weights; ``strict`` checks exactly those (the base models' are not loaded)."""
        expected = set(self.state_dict())
        if strict and set(state_dict) != expected:
            missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise RuntimeError(f"state_dict: missing adapter keys {missing}, unexpected keys {unexpected}")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        result.missing_keys[:] = [k for k in result.missing_keys if not k.startswith(BASE_PREFIXES)]
        return result

    def base_models_record(self) -> dict[str, Any]:
        return {
            name: {
                "name_or_path": getattr(self.config, name),
                "config": model.config.to_dict(),
                "fingerprint": _fingerprint(model),
            }
            for name, model in (("language_model", self.language_model), ("vision_model", self.vision_model))
        }

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)  # config.json and the added weights (model.safetensors)
        record = json.dumps(self.base_models_record(), indent=2, sort_keys=True, default=str)
        atomic_write_text(Path(save_directory) / BASE_MODELS_FILE, record + "\n")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        language_model: nn.Module | None = None,
        vision_model: nn.Module | None = None,
        map_location: str | torch.device = "cpu",
        **load_kwargs: Any,
    ) -> HFFlamingo:
        """Rebuild a saved adapter on its base models: given here, or loaded by their recorded names
        (``load_kwargs`` go to ``from_pretrained``, e.g. ``local_files_only=True``); a base model whose
        weights differ from the recorded one is refused."""
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: not an adapter folder")
        config = load_config(cls.config_class, directory / CONFIG_FILE)
        for name, given in (("language_model", language_model), ("vision_model", vision_model)):
            if given is None and not getattr(config, name):
                raise ValueError(f"{name}: the adapter records no base model name; pass the model")
        model = cls(config, language_model=language_model, vision_model=vision_model, **load_kwargs)
        record_path = directory / BASE_MODELS_FILE
        if record_path.is_file():
            recorded = read_json(record_path, CheckpointError)
            for name, current in model.base_models_record().items():
                if not _same_fingerprint(recorded[name]["fingerprint"], current["fingerprint"]):
                    raise CheckpointError(
                        f"{directory}: {name} is not the base model this adapter was trained on "
                        f"(recorded {recorded[name]['name_or_path']!r}, weights differ)"
                    )
        load_weights(model, directory / WEIGHTS_FILE, map_location=map_location)
        model.eval()
        return model
