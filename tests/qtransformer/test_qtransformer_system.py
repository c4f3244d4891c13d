import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from online_worker import ONLINE

from quintet.qtransformer import QTransformer, ReplayDataset
from quintet.qtransformer.datasets import random_dataset
from quintet.qtransformer.envs import greedy_policy
from quintet.qtransformer.online import OnlineReplay
from quintet.qtransformer.presets import CARTPOLE, CARTPOLE_RL
from quintet.qtransformer.system import QTransformerSystem, build_task
from quintet.registry import TaskRequest, get_system
from quintet.training import Trainer, TrainSettings


def task_of(system, preset, **changes):
    return system.make_task(TaskRequest.for_stage(preset, **changes))


def test_presets_follow_the_registry_contract(tmp_path):
    system = QTransformerSystem()
    for name, preset in system.presets().items():
        task = task_of(system, preset)
        model = task.model
        batch = system.example_batch(model, batch_size=2, generator=torch.Generator().manual_seed(0))
        loss, metrics = task.loss(model, batch)
        loss.backward()
        assert torch.isfinite(loss) and "td_loss" in metrics, name
        model.save_pretrained(tmp_path / name)
        loaded = QTransformer.from_pretrained(tmp_path / name)
        model.eval()
        assert torch.equal(
            system.generate(loaded, batch, use_cache=True), system.generate(model, batch, use_cache=False)
        )


def test_make_task_generates_no_data_until_training_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path))
    system = QTransformerSystem()
    for name in ("tiny", "lunarlander-offline", "babyai-tiny"):
        task = task_of(system, system.presets()[name])
        assert task.evaluate is not None and not any(tmp_path.iterdir()), name


def test_cached_datasets_are_named_by_seed_and_written_atomically_by_one_of_racing_processes(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path))
    rl = replace(CARTPOLE_RL, initial_episodes=2, collect_envs=1)
    config = CARTPOLE
    paths = {seed: random_dataset(rl, config, "race", seed=seed).path for seed in (0, 1)}
    assert paths[0] != paths[1] and "seed0" in paths[0].name and "seed1" in paths[1].name
    first = np.load(paths[0] / "observations.npy")
    shutil.rmtree(paths[0])
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:  # two processes generate the same dataset at once
        raced = pool.starmap(_race, [(str(tmp_path), seed) for seed in (0, 0)])
    assert raced == [str(paths[0])] * 2 and np.array_equal(np.load(paths[0] / "observations.npy"), first)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def _race(cache: str, seed: int) -> str:
    import os

    os.environ["QUINTET_CACHE"] = cache
    rl = replace(CARTPOLE_RL, initial_episodes=2, collect_envs=1)
    return str(random_dataset(rl, CARTPOLE, "race", seed=seed).path)


def test_registered_on_import():
    assert isinstance(get_system("qtransformer"), QTransformerSystem)


def test_task_batches_are_deterministic_and_train(tmp_path, monkeypatch):
    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path))
    system = QTransformerSystem()
    preset = system.presets()["cartpole"]
    rl = replace(CARTPOLE_RL, initial_episodes=4)
    dataset = random_dataset(rl, preset.stages[0].model_config, "cartpole")
    assert isinstance(dataset, ReplayDataset) and dataset.num_episodes == 4
    assert random_dataset(rl, preset.stages[0].model_config, "cartpole").path == dataset.path  # cached
    task = task_of(system, preset, data=str(dataset.path))
    first, again = task.train_batch(3), task.train_batch(3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["obs"], task.train_batch(4)["obs"])
    half = {key: value[: len(value) // 2] for key, value in first.items()}
    assert task.batch_flops(first) == pytest.approx(2 * task.batch_flops(half))  # MFU: linear in the batch
    assert set(task.extra_state) == {"target"}
    target_before = [p.clone() for p in task.extra_state["target"].parameters()]
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-3)
    for step in range(3):
        loss, _ = task.loss(task.model, task.train_batch(step))
        loss.backward()
        optimizer.step()
        task.after_step(step + 1)
    moved = [not torch.equal(a, b) for a, b in zip(target_before, task.extra_state["target"].parameters())]
    assert any(moved)  # after_step updated the EMA target


def test_greedy_policy_acts_in_env_bins():
    system = QTransformerSystem()
    preset = system.presets()["lunarlander-offline"]
    model = system.build_model(preset.stages[0]).eval()
    bins = greedy_policy(model)(np.zeros((3, 8), dtype=np.float32))
    assert bins.shape == (3, 2) and bins.max() < preset.stages[0].model_config.action_bins


def test_evaluation_unwraps_ema_and_compiled_models():
    from torch.optim.swa_utils import AveragedModel

    from quintet.qtransformer.system import unwrap

    system = QTransformerSystem()
    model = system.build_model(system.presets()["tiny"].stages[0])
    averaged = AveragedModel(model)
    assert unwrap(averaged, model) is averaged.module
    assert unwrap(torch.nn.Identity(), model) is model


def online_task(steps: int = 6, *, kill_at_step: int | None = None):
    settings = TrainSettings(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, eval_every=0, checkpoint_every=2)
    torch.manual_seed(0)
    model = QTransformer(CARTPOLE)
    task = build_task(model, OnlineReplay(model, ONLINE), ONLINE, settings)
    if kill_at_step is not None:
        update_target = task.after_step

        def after_step(step):
            update_target(step)
            if step == kill_at_step:
                raise KeyboardInterrupt("killed")

        task.after_step = after_step
    return task


def test_online_rounds_grow_the_replay_in_the_run_folder(tmp_path):
    task = online_task()
    result = Trainer(task, run_dir=tmp_path, device="cpu", live_progress=False).fit()
    rounds = sorted(path.name for path in (tmp_path / "replay").glob("round-*"))
    assert rounds == ["round-0000", "round-0001", "round-0002"]
    everything = ReplayDataset(tmp_path / "replay" / "all")
    assert everything.num_episodes == 6 and result.step == 6
    assert "eval_return_mean" in result.eval_metrics


def test_online_run_resumes_exactly_and_collects_the_later_rounds_as_before(tmp_path):
    reference = online_task()
    Trainer(reference, run_dir=tmp_path / "whole", device="cpu", live_progress=False).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(online_task(kill_at_step=3), run_dir=tmp_path / "killed", device="cpu", live_progress=False).fit()
    assert not (tmp_path / "killed" / "replay" / "round-0002").exists()  # collected after the resume
    resumed = online_task()
    Trainer(resumed, run_dir=tmp_path / "killed", resume=True, device="cpu", live_progress=False).fit()
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for name in ("observations", "actions"):
        whole = np.load(tmp_path / "whole" / "replay" / "round-0002" / f"{name}.npy")
        again = np.load(tmp_path / "killed" / "replay" / "round-0002" / f"{name}.npy")
        assert np.array_equal(whole, again)


def test_online_task_outside_a_trainer_says_what_it_needs():
    with pytest.raises(RuntimeError, match="inside a Trainer"):
        online_task().train_batch(0)


def test_online_replay_rejects_a_model_it_cannot_act_with():
    with pytest.raises(ValueError, match="bins"):
        OnlineReplay(QTransformer(replace(CARTPOLE, action_bins=3)), ONLINE)
    with pytest.raises(ValueError, match="condition_on_text"):
        OnlineReplay(QTransformer(replace(CARTPOLE, condition_on_text=True, text_embed_dim=4)), ONLINE)


def test_exploration_decays_over_a_fixed_number_of_rounds():
    replay = OnlineReplay(QTransformer(CARTPOLE), replace(ONLINE, epsilon=(0.5, 0.1), epsilon_rounds=5))
    assert [round(replay.epsilon(r), 6) for r in (1, 3, 5, 9)] == [0.5, 0.3, 0.1, 0.1]


def test_a_fresh_online_run_replaces_the_replay_an_earlier_run_left(tmp_path):
    Trainer(online_task(), run_dir=tmp_path, device="cpu", live_progress=False).fit()
    stale = tmp_path / "replay" / "rank-3" / "round-0000"
    stale.mkdir(parents=True)
    Trainer(online_task(steps=2), run_dir=tmp_path, device="cpu", live_progress=False).fit()
    assert not stale.exists() and sorted(p.name for p in (tmp_path / "replay").iterdir()) == ["all", "round-0000"]


def test_cartpole_preset_trains_online_and_stops_at_its_target():
    task = task_of(QTransformerSystem(), QTransformerSystem().presets()["cartpole"])
    assert task.start is not None
    assert task.stop_when({"eval_return_mean": 480.0}) and task.stop_when({"eval_return_mean": 300.0}) is None


def test_greedy_policy_takes_stacked_states_and_images_as_dataset_batches_give_them():
    from quintet.qtransformer import MaxViTConfig

    states = QTransformer(replace(CARTPOLE, frames=3)).eval()
    stacked = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    expected = states.get_optimal_actions(torch.from_numpy(stacked))
    assert np.array_equal(greedy_policy(states)(stacked), expected.reshape(2, -1).numpy())
    with pytest.raises(ValueError, match="observations"):
        greedy_policy(states)(np.zeros((2, 1, 3, 4), dtype=np.float32))

    encoder = MaxViTConfig(channels=3, dim=32, depth=(1,), window_size=2, heads=2, dim_head=8)
    images = QTransformer(replace(CARTPOLE, encoder=encoder, frames=2)).eval()
    pixels = np.random.default_rng(1).integers(0, 256, (2, 2, 3, 8, 8), dtype=np.uint8)  # (k, f, c, h, w)
    as_batch = torch.from_numpy(pixels).float().div(255).permute(0, 2, 1, 3, 4)
    expected = images.get_optimal_actions(as_batch)
    assert np.array_equal(greedy_policy(images)(pixels), expected.reshape(2, -1).numpy())


def test_tiny_preset_trains_end_to_end_with_stacked_frames(tmp_path, monkeypatch):
    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path / "cache"))
    system = QTransformerSystem()
    preset = system.presets()["tiny"]
    task = task_of(system, preset)
    result = Trainer(task, run_dir=tmp_path / "run", device="cpu", live_progress=False).fit()
    stage = preset.stages[0]
    assert result.step == stage.settings.steps and "eval_return_mean" in result.eval_metrics
    assert task.train_batch(0)["obs"].shape[1] == stage.model_config.frames == 2


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_online_rounds_under_two_processes_collect_the_same_data_and_stay_in_lockstep(tmp_path, parallel):
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("online_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, str(tmp_path), parallel], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)  # weights and (whole) target networks
    # the target network moved towards the online weights (under FSDP: from the gathered shards)
    moved = [k for k in rank0 if k.startswith("target.") and not torch.equal(rank0[k], rank0[f"start.{k[7:]}"])]
    assert moved
    replay = tmp_path / "run" / "replay"
    for name in ("round-0000", "round-0001", "round-0002"):
        a, b = (np.load(replay / rank / name / "observations.npy") for rank in ("rank-0", "rank-1"))
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "field, value",
    [
        ("gamma", 1.0),
        ("epsilon", (0.5,)),
        ("epsilon", (0.5, 1.5)),
        ("epsilon_rounds", 0),
        ("steps_per_round", -1),
        ("reward_high", -20.0),
        ("collect_envs", 0),
    ],
)
def test_rl_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        replace(ONLINE, **{field: value})
