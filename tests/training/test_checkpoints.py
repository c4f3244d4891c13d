"""Checkpoints: atomic writes, what they hold, how a path resolves to one, clear errors when broken."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from toy_task import ToyLM, make_toy_task

import quintet.training.checkpoint as checkpoint_module
from quintet.core import CheckpointError
from quintet.training import Trainer, TrainSettings
from quintet.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint_model,
    load_trainer_state,
    read_run_config,
    resolve_checkpoint,
    write_checkpoint,
)

SETTINGS = TrainSettings(steps=4, batch_size=4, warmup_steps=1, eval_every=0, checkpoint_every=2, log_every=2)


def train(run_dir, **changes):
    task = make_toy_task(replace(SETTINGS, **changes))
    Trainer(task, run_dir=run_dir, device="cpu", live_progress=False, run_config={"system": "toy"}).fit()
    return task


def test_crash_while_saving_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    task = train(tmp_path, steps=2)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}

    def crash(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_checkpoint(
            tmp_path / "checkpoints", 3, models={"model": task.model}, state={}, run_config={"system": "toy"}
        )
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    model, _, _ = load_checkpoint_model(ToyLM, tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert load_trainer_state(resolve_checkpoint(tmp_path))["step"] == 2


def test_crash_before_the_pointer_moves_keeps_the_old_latest_and_is_recovered(tmp_path, monkeypatch):
    task = train(tmp_path, steps=2)
    real_write = checkpoint_module.atomic_write_text

    def crash_on_pointer(path, text):
        if path.name == "latest":
            raise OSError("killed")
        real_write(path, text)

    monkeypatch.setattr(checkpoint_module, "atomic_write_text", crash_on_pointer)
    with pytest.raises(OSError, match="killed"):
        write_checkpoint(tmp_path / "checkpoints", 3, models={"model": task.model}, state={}, run_config={})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    # the orphan step 3 is complete but not the latest: a resumed run may write step 3 over it
    path = write_checkpoint(tmp_path / "checkpoints", 3, models={"model": task.model}, state={}, run_config={})
    assert latest_checkpoint(tmp_path / "checkpoints") == path


def test_trainer_state_is_plain_data_with_everything_to_resume(tmp_path):
    train(tmp_path, ema_decay=0.9)
    checkpoint = resolve_checkpoint(tmp_path)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4
    assert {"optimizer", "scheduler", "rng", "data_position", "run_config", "settings", "history"} <= state.keys()
    assert state["optimizer"]["state"] and state["ema_n_averaged"] == 4
    assert state["data_position"] == {"step": 4, "grad_accum": 1, "world_size": 1, "next_index": 4}
    assert state["run_config"] == {"system": "toy"}
    assert {"model", "ema"} <= {p.name for p in checkpoint.iterdir()}
    run_config = read_run_config(checkpoint)
    assert run_config["system"] == "toy" and run_config["settings"]["steps"] == 4


def test_old_checkpoints_are_pruned(tmp_path):
    train(tmp_path, steps=8, checkpoint_every=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000008"]


def test_a_path_resolves_from_run_folder_checkpoints_folder_or_checkpoint(tmp_path):
    train(tmp_path)
    latest = tmp_path / "checkpoints" / "step_00000004"
    assert resolve_checkpoint(tmp_path) == latest
    assert resolve_checkpoint(tmp_path / "checkpoints") == latest
    assert resolve_checkpoint(tmp_path / "checkpoints" / "step_00000002") == tmp_path / "checkpoints" / "step_00000002"


def test_missing_and_broken_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)
    train(tmp_path / "run")
    checkpoint = resolve_checkpoint(tmp_path / "run")
    (checkpoint / "trainer_state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="trainer_state.pt: corrupt"):
        load_trainer_state(checkpoint)
    (checkpoint / "model" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint_model(ToyLM, checkpoint)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("../../etc")
    with pytest.raises(CheckpointError, match="does not name a checkpoint"):
        resolve_checkpoint(tmp_path / "run")
    (checkpoint / "run_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="run_config.json: not valid JSON"):
        read_run_config(checkpoint)


def test_run_config_json_matches_the_trainer_state(tmp_path):
    train(tmp_path)
    checkpoint = resolve_checkpoint(tmp_path)
    on_disk = json.loads((checkpoint / "run_config.json").read_text())
    assert on_disk["step"] == load_trainer_state(checkpoint)["step"]
