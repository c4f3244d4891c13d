"""Config I/O and the save/load contract every quintet model follows.

Configs are frozen ``@dataclass(kw_only=True)`` classes. They are written to ``config.json`` with a
``__class__`` tag (so a checkpoint of one system is recognised as such when loaded by another) and
read back strictly: an unknown field, a missing field or a value of the wrong kind is an error that
names the file.

Models subclass :class:`PretrainedModel`, which takes ``save_pretrained`` / ``push_to_hub`` from
huggingface_hub's ``PyTorchModelHubMixin`` and replaces its loading, because the mixin's default
load is non-strict (missing keys are silently skipped) and its dataclass decoding drops unknown
fields and turns tuples into lists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import safetensors
import safetensors.torch
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from quintet.core.io import atomic_write, atomic_write_text, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CLASS_KEY = "__class__"

ConfigT = TypeVar("ConfigT")
ModelT = TypeVar("ModelT", bound="PretrainedModel")


class CheckpointError(ValueError):
    """A saved model or config cannot be loaded; the message names the file."""


def config_to_dict(config: Any) -> dict[str, Any]:
    """Encode a (possibly nested) config dataclass as JSON-ready data with class tags."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config: expected a dataclass instance, got {type(config).__name__}")
    out: dict[str, Any] = {CLASS_KEY: type(config).__name__}
    for field in dataclasses.fields(config):
        out[field.name] = _encode_value(getattr(config, field.name))
    return out


def _encode_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config value {value!r} of type {type(value).__name__} cannot be stored in JSON")


def _dataclass_candidates(annotation: Any) -> list[type]:
    """Dataclass types an annotation admits (``A``, ``A | B``, ``Optional[A]``)."""
    if dataclasses.is_dataclass(annotation):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _dataclass_candidates(arg)]
    return []


def config_from_dict(config_class: type[ConfigT], data: dict[str, Any], *, source: str = "config") -> ConfigT:
    """Decode what :func:`config_to_dict` wrote, strictly; errors name ``source``."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
    tagged = data.get(CLASS_KEY, config_class.__name__)
    if tagged != config_class.__name__:
        raise CheckpointError(f"{source}: holds a {tagged}, expected a {config_class.__name__}")
    hints = typing.get_type_hints(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(data) - set(fields) - {CLASS_KEY})
    if unknown:
        raise CheckpointError(f"{source}: unknown field(s) {unknown} for {config_class.__name__}")
    missing = sorted(set(fields) - set(data))
    if missing:
        raise CheckpointError(f"{source}: missing field(s) {missing} for {config_class.__name__}")
    kwargs = {name: _decode_value(hints[name], data[name], f"{source}: field {name!r}") for name in fields}
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid {config_class.__name__}: {error}") from error


def _decode_value(annotation: Any, value: Any, where: str) -> Any:
    if isinstance(value, dict) and CLASS_KEY in value:
        candidates = {c.__name__: c for c in _dataclass_candidates(annotation)}
        if value[CLASS_KEY] not in candidates:
            raise CheckpointError(f"{where}: {value[CLASS_KEY]} is not one of {sorted(candidates)}")
        return config_from_dict(candidates[value[CLASS_KEY]], value, source=where)
    if isinstance(value, list):
        return tuple(_decode_value(Any, v, where) for v in value)
    return value


def config_class_tag(directory: str | os.PathLike) -> str:
    """The config class name a ``save_pretrained`` folder's ``config.json`` is tagged with."""
    path = Path(directory) / CONFIG_FILE
    data = read_json(path, CheckpointError)
    if not isinstance(data.get(CLASS_KEY), str):
        raise CheckpointError(f"{path}: has no {CLASS_KEY!r} tag naming its config class")
    return data[CLASS_KEY]


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write ``config`` as JSON atomically (temp file + rename)."""
    atomic_write_text(Path(path), json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")


def load_config(config_class: type[ConfigT], path: str | os.PathLike) -> ConfigT:
    path = Path(path)
    return config_from_dict(config_class, read_json(path, CheckpointError), source=str(path))


class PretrainedModel(nn.Module, PyTorchModelHubMixin):
    """Base of every quintet model: built from one frozen config, saved as config.json + safetensors.

    Subclasses set ``config_class`` and take the config as their only ``__init__`` argument.
    """

    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config: expected {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def fsdp_units(self) -> list[nn.Module]:
        """The submodules FSDP shards one by one: by default every submodule whose class sets
        ``fsdp_unit = True`` (``core.TransformerBlock`` does); a model may name its own."""
        return [module for module in self.modules() if module is not self and getattr(module, "fsdp_unit", False)]

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        save_config(self.config, save_directory / CONFIG_FILE)
        # save_model (not save_file) deduplicates tied / shared tensors instead of failing on them.
        atomic_write(save_directory / WEIGHTS_FILE, lambda tmp: safetensors.torch.save_model(self, str(tmp)))

    @classmethod
    def from_pretrained(
        cls: type[ModelT],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        **hub_kwargs: Any,
    ) -> ModelT:
        """Load a model saved by ``save_pretrained`` (a local folder, or a Hub repo id), strictly."""
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            if directory.exists() or os.sep in str(pretrained_model_name_or_path).strip("/"):
                raise CheckpointError(f"{directory}: not a checkpoint folder")
            from huggingface_hub import snapshot_download

            directory = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
                    **hub_kwargs,
                )
            )
        config = load_config(cls.config_class, directory / CONFIG_FILE)
        model = cls(config)
        load_weights(model, directory / WEIGHTS_FILE, map_location=map_location)
        model.eval()
        return model


def load_weights(model: nn.Module, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> None:
    """Load safetensors weights into ``model`` strictly (every key present, every shape equal)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        # strict=True also raises on missing / unexpected keys; tied duplicates are handled inside.
        safetensors.torch.load_model(model, str(path), strict=True, device=str(map_location))
    except safetensors.SafetensorError as error:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({error})") from error
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the model: {error}") from error
