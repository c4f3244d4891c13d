import numpy as np
import torch

from quintet.qtransformer import QTransformer, ReplayDataset
from quintet.qtransformer.presets import RL_SETTINGS
from quintet.qtransformer.system import QTransformerSystem, greedy_policy, optimise, random_dataset
from quintet.registry import get_system


def test_presets_follow_the_registry_contract(tmp_path):
    system = QTransformerSystem()
    for name, preset in system.presets().items():
        model = system.build_model(preset)
        batch = system.example_batch(model, batch_size=2, generator=torch.Generator().manual_seed(0))
        loss, metrics = system.loss(model, batch)
        loss.backward()
        assert torch.isfinite(loss) and "td_loss" in metrics, name
        model.save_pretrained(tmp_path / name)
        loaded = QTransformer.from_pretrained(tmp_path / name)
        model.eval()
        assert torch.equal(
            system.generate(loaded, batch, use_cache=True), system.generate(model, batch, use_cache=False)
        )


def test_registered_on_import():
    assert isinstance(get_system("qtransformer"), QTransformerSystem)


def test_task_batches_are_deterministic_and_train(tmp_path, monkeypatch):
    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path))
    system = QTransformerSystem()
    preset = system.presets()["cartpole"]
    dataset = random_dataset(RL_SETTINGS["cartpole"], preset.model_config, tmp_path / "random", episodes=4)
    assert isinstance(dataset, ReplayDataset) and dataset.num_episodes == 4
    task = system.make_task(preset, data=str(tmp_path / "random"))
    first, again = task.train_batch(3), task.train_batch(3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["obs"], task.train_batch(4)["obs"])
    assert set(task.extra_state) == {"target"}
    target_before = [p.clone() for p in task.extra_state["target"].parameters()]
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-3)
    optimise(task, 3, optimizer=optimizer)
    moved = [not torch.equal(a, b) for a, b in zip(target_before, task.extra_state["target"].parameters())]
    assert any(moved)  # after_step updated the EMA target


def test_greedy_policy_acts_in_env_bins():
    system = QTransformerSystem()
    preset = system.presets()["lunarlander-offline"]
    model = system.build_model(preset).eval()
    bins = greedy_policy(model)(np.zeros((3, 8), dtype=np.float32))
    assert bins.shape == (3, 2) and bins.max() < preset.model_config.action_bins


def test_evaluation_unwraps_ema_and_compiled_models():
    from torch.optim.swa_utils import AveragedModel

    from quintet.qtransformer.system import unwrap

    system = QTransformerSystem()
    model = system.build_model(system.presets()["tiny"])
    averaged = AveragedModel(model)
    assert unwrap(averaged, model) is averaged.module
    assert unwrap(torch.nn.Identity(), model) is model
