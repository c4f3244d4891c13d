"""Every registered preset of every system: forward, backward, save/load, cached == uncached generation.

A system is covered here the day it registers; nothing in this file names a system.
"""

import pytest
import torch

from quintet import registry

PRESETS = registry.all_presets()


def _id(preset):
    return f"{preset.system}:{preset.name}"


def test_every_system_has_tiny_and_demo_presets():
    for name, system in registry.systems().items():
        assert {"tiny", "demo"} <= set(system.presets()), name


@pytest.mark.parametrize("preset", PRESETS, ids=_id)
def test_preset_forward_backward_save_load_generate(preset, tmp_path):
    torch.manual_seed(0)
    system = registry.get_system(preset.system)
    model = system.build_model(preset)
    generator = torch.Generator().manual_seed(0)
    batch = system.example_batch(model, batch_size=2, generator=generator)

    model.train()
    loss, metrics = system.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(k, str) for k in metrics)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        loss_a, _ = system.loss(model, batch)
        loss_b, _ = system.loss(loaded, batch)
    assert torch.equal(loss_a, loss_b)

    with torch.no_grad():
        cached = system.generate(model, batch, use_cache=True)
        uncached = system.generate(model, batch, use_cache=False)
    if cached is None:
        assert uncached is None
    else:
        assert torch.equal(cached, uncached)
