"""The EMA of the weights: AveragedModel's arithmetic, whole or per shard, tied weights, swapping in."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from quintet.training.ema import WeightEMA


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # one tensor, two names
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def nudge(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * (step + 1))
        model.count += 1


@pytest.mark.parametrize("sharded", [False, True])
def test_ema_follows_averaged_model_and_keeps_tied_weights_one(sharded):
    torch.manual_seed(0)
    model = Tied()
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.7), use_buffers=True)
    ema = WeightEMA(model, 0.7, sharded=sharded)
    for step in range(4):
        nudge(model, step)
        ema.update(model)
        reference.update_parameters(model)
    state = ema.state_dict()
    assert set(state) == set(model.state_dict())  # both names of the tied weight
    assert state["head.weight"] is state["embed.weight"]
    for name, value in reference.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-7)
    # an integer buffer (a counter) is not averaged, as AveragedModel's rounding would: it follows the model
    assert int(state["count"]) == int(model.count) == 4
    assert ema.n_averaged == 4

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        assert torch.equal(model.hidden.weight, state["hidden.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    again = WeightEMA(model, 0.7, sharded=sharded)
    again.load_state_dict({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())


def test_a_checkpoint_without_every_tensor_is_a_clear_error():
    ema = WeightEMA(Tied(), 0.9, sharded=True)
    with pytest.raises(KeyError, match="hidden"):
        ema.load_state_dict({"embed.weight": torch.zeros(5, 4)})
