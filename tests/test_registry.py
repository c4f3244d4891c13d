"""Every stage of every registered preset: the training loss, backward, save/load, cached == uncached.

A system is covered here the day it registers; nothing in this file names a system. The loss is the
one training uses: the stage's task (built as ``quintet train`` builds it, with untrained models of
the stages it needs) on the system's example batch.
"""

import pytest
import torch

from quintet import registry
from quintet.registry import TaskRequest

STAGES = [(preset, stage) for preset in registry.all_presets() for stage in preset.stages]


def _id(item):
    preset, stage = item
    return f"{preset.system}:{preset.name}:{stage.name}"


def test_every_system_has_tiny_and_demo_presets():
    for name, system in registry.systems().items():
        assert {"tiny", "demo"} <= set(system.presets()), name


def test_every_system_builds_each_preset_model_with_a_known_class():
    for system in registry.systems().values():
        for preset in system.presets().values():
            assert preset.system == system.name
            for stage in preset.stages:
                assert system.model_class(stage.model_config).config_class is type(stage.model_config)


@pytest.mark.parametrize("item", STAGES, ids=[_id(item) for item in STAGES])
def test_stage_loss_backward_save_load_generate(item, tmp_path):
    preset, stage = item
    torch.manual_seed(0)
    system = registry.get_system(preset.system)
    if (reason := system.unavailable(preset)) is not None:
        pytest.skip(reason)  # its base weights are user-supplied; tests/<system> covers it on tiny local ones
    inputs = {}
    for need in stage.needs:
        earlier = system.build_model(preset.stage(need)).eval()
        inputs[need] = earlier.requires_grad_(False)
    task = system.make_task(TaskRequest.for_stage(preset, stage, inputs=inputs))
    model = task.model
    assert type(model) is system.model_class(stage.model_config)
    generator = torch.Generator().manual_seed(0)
    batch = system.example_batch(model, batch_size=2, generator=generator)

    model.train()
    loss, metrics = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(k, str) for k in metrics)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = system.load_model(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    torch.manual_seed(1)
    with torch.no_grad():
        loss_a, _ = task.loss(model, batch)
    torch.manual_seed(1)
    with torch.no_grad():
        loss_b, _ = task.loss(loaded, batch)
    assert torch.equal(loss_a, loss_b)

    with torch.no_grad():
        cached = system.generate(model, batch, use_cache=True)
        uncached = system.generate(model, batch, use_cache=False)
    if cached is None:
        assert uncached is None
    else:
        assert torch.equal(cached, uncached)
