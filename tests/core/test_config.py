import dataclasses
import json

import pytest
import torch
from torch import nn

from quintet.core import CheckpointError, PretrainedModel, Transformer, config_from_dict, config_to_dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class InnerConfig:
    width: int = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class OtherInnerConfig:
    depth: int = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig:
    num_tokens: int = 11
    dim: int = 16
    tie_embeddings: bool = True
    shorten: tuple[int, ...] = (2, 3)
    inner: InnerConfig | OtherInnerConfig = dataclasses.field(default_factory=OtherInnerConfig)

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"dim: expected > 0, got {self.dim}")


class ToyModel(PretrainedModel):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.num_tokens, config.dim)
        self.body = Transformer(config.dim, 1, heads=2, dim_head=8, causal=True)
        self.head = nn.Linear(config.dim, config.num_tokens, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnrelatedConfig:
    dim: int = 16


class UnrelatedModel(PretrainedModel):
    config_class = UnrelatedConfig

    def __init__(self, config):
        super().__init__(config)
        self.linear = nn.Linear(config.dim, config.dim)


def test_config_round_trip_keeps_types_and_nested_unions():
    config = ToyConfig(inner=InnerConfig(width=9), shorten=(4,))
    data = json.loads(json.dumps(config_to_dict(config)))
    assert config_from_dict(ToyConfig, data) == config


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_is_exact_and_keeps_ties(tmp_path, tie):
    model = ToyModel(ToyConfig(tie_embeddings=tie))
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = ToyModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 11, (2, 5))
    assert torch.equal(model.eval()(ids), loaded(ids))
    assert (loaded.head.weight is loaded.embed.weight) == tie
    assert loaded.config == model.config


def _saved(tmp_path):
    ToyModel(ToyConfig()).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def _write(tmp_path, data):
    (tmp_path / "config.json").write_text(json.dumps(data))


def test_unknown_config_field_names_the_file(tmp_path):
    data = _saved(tmp_path)
    _write(tmp_path, {**data, "surprise": 1})
    with pytest.raises(CheckpointError, match=r"config\.json.*surprise"):
        ToyModel.from_pretrained(tmp_path)


def test_missing_config_field_names_the_file(tmp_path):
    data = _saved(tmp_path)
    del data["dim"]
    _write(tmp_path, data)
    with pytest.raises(CheckpointError, match=r"config\.json.*missing.*dim"):
        ToyModel.from_pretrained(tmp_path)


def test_invalid_config_value_names_the_file(tmp_path):
    data = _saved(tmp_path)
    _write(tmp_path, {**data, "dim": -3})
    with pytest.raises(CheckpointError, match=r"config\.json.*dim"):
        ToyModel.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_weights_file(tmp_path):
    ToyModel(ToyConfig(dim=16)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    _write(tmp_path, {**data, "num_tokens": 12})
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        ToyModel.from_pretrained(tmp_path)


def test_corrupt_weights_file_names_the_file(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        ToyModel.from_pretrained(tmp_path)


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        ToyModel.from_pretrained(tmp_path / "nope" / "deeper")
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        ToyModel.from_pretrained(tmp_path)


def test_checkpoint_of_another_model_is_recognised(tmp_path):
    UnrelatedModel(UnrelatedConfig()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds a UnrelatedConfig, expected a ToyConfig"):
        ToyModel.from_pretrained(tmp_path)


def test_missing_weight_key_is_an_error(tmp_path):
    model = ToyModel(ToyConfig(tie_embeddings=False))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("head.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="head.weight"):
        ToyModel.from_pretrained(tmp_path)


def test_model_rejects_config_of_wrong_type():
    with pytest.raises(TypeError, match="config"):
        ToyModel(UnrelatedConfig())
