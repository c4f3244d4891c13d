"""A run killed with SIGKILL and resumed reaches bit-for-bit the weights of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch
from resume_worker import resume_settings
from safetensors.torch import load_file
from toy_task import make_toy_task

from quintet.training import Trainer
from quintet.training.checkpoint import latest_checkpoint, load_trainer_state

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS = 8


def run_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=120)


def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    Trainer(make_toy_task(resume_settings(STEPS)), run_dir=uninterrupted, device="cpu", live_progress=False).fit()

    killed = tmp_path / "killed"
    crashed = run_worker(str(killed), str(STEPS), "--kill-at-step", "5")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert latest_checkpoint(killed / "checkpoints").name == "step_00000003"

    # the resumed run is a fresh process too: this one, which never saw the killed run's state
    resumed = Trainer(
        make_toy_task(resume_settings(STEPS)), run_dir=killed, resume=True, device="cpu", live_progress=False
    ).fit()
    assert resumed.step == STEPS

    final_a = latest_checkpoint(uninterrupted / "checkpoints")
    final_b = latest_checkpoint(killed / "checkpoints")
    assert final_a.name == final_b.name == f"step_{STEPS:08d}"
    for folder in ("model", "ema"):
        weights_a = load_file(final_a / folder / "model.safetensors")
        weights_b = load_file(final_b / folder / "model.safetensors")
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            assert torch.equal(weights_a[key], weights_b[key]), f"{folder}/{key}"
    state_a, state_b = load_trainer_state(final_a), load_trainer_state(final_b)
    for index, moments in state_a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, state_b["optimizer"]["state"][index][name]), f"{index}/{name}"
    assert [e["loss"] for e in state_a["history"]] == [e["loss"] for e in state_b["history"]]
