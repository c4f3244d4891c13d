"""Preemption: SIGTERM / SIGUSR1 finish the step, checkpoint and exit with a line saying how to resume;
checkpoints by the clock bound the work a hard kill loses; ``keep_last`` prunes only behind a
complete newer checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_task import make_toy_task

import quintet.training.checkpoint as checkpoint_module
from quintet.cli import main
from quintet.training import Trainer, TrainSettings
from quintet.training.checkpoint import latest_checkpoint
from quintet.training.state import RunState

TOY_CLI = Path(__file__).with_name("toy_task.py")
QUIET = dict(device="cpu", live_progress=False)
SETTINGS = TrainSettings(steps=6, batch_size=4, warmup_steps=2, eval_every=0, checkpoint_every=0, log_every=1)


def toy(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUINTET_DEBUG": ""}
    if kill_at:
        env["QUINTET_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(TOY_CLI), *args], capture_output=True, text=True, timeout=300, env=env)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run / "checkpoints") / "model" / "model.safetensors")


def test_sigterm_checkpoints_says_how_to_resume_and_resumes_exactly(tmp_path, toy_systems, capsys):
    train = ["train", "toy", "--preset", "tiny", "--device", "cpu", "--checkpoint-every", "0", "--steps", "6"]
    assert main([*train, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "preempted"
    stopped = toy(*train, "--out", str(out), kill_at="train:3:SIGTERM")  # a real process gets the signal
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr  # a script's `&&` sees the run is unfinished
    assert "interrupted by SIGTERM" in stopped.stdout
    assert f"train toy --out {out} --resume" in stopped.stdout.strip().splitlines()[-1]
    assert latest_checkpoint(out / "checkpoints").name == "step_00000003"  # no checkpoint_every step: the signal's

    capsys.readouterr()
    assert main(["train", "toy", "--out", str(out), "--resume", "--device", "cpu"]) == 0
    assert "done: step 6" in capsys.readouterr().out
    a, b = weights(tmp_path / "whole"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigusr1_stops_like_sigterm(tmp_path):
    task = make_toy_task(replace(SETTINGS, steps=50))
    task.after_step = lambda step: os.kill(os.getpid(), signal.SIGUSR1) if step == 2 else None
    result = Trainer(task, run_dir=tmp_path, **QUIET).fit()
    assert result.stopped_early == "interrupted" and result.step == 2
    assert result.checkpoint.name == "step_00000002"


def test_a_second_signal_aborts_and_handlers_are_restored(tmp_path):
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    task = make_toy_task(replace(SETTINGS, steps=50))

    def after_step(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # asks for a stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # does not wait for it

    task.after_step = after_step
    with pytest.raises(KeyboardInterrupt):
        Trainer(task, run_dir=tmp_path, **QUIET).fit()
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_checkpoints_by_the_clock_fall_between_step_checkpoints(tmp_path, monkeypatch):
    saved = []
    original = RunState.save

    def save(self, run_dir, *, step, **kwargs):
        saved.append(step)
        return original(self, run_dir, step=step, **kwargs)

    monkeypatch.setattr(RunState, "save", save)
    task = make_toy_task(replace(SETTINGS, steps=12, checkpoint_every=6, checkpoint_every_s=0.12, keep_last=20))
    loss = task.loss

    def slow_loss(module, batch):
        time.sleep(0.05)
        return loss(module, batch)

    task.loss = slow_loss
    Trainer(task, run_dir=tmp_path, **QUIET).fit()
    by_clock = [step for step in saved if step % 6]
    assert 6 in saved and 12 in saved and len(by_clock) >= 2, saved
    assert sorted(saved) == saved and len(set(saved)) == len(saved)


def test_keep_last_deletes_only_behind_a_complete_newer_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(make_toy_task(replace(SETTINGS, checkpoint_every=1, keep_last=3)), run_dir=run, **QUIET).fit()
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000004", "step_00000005", "step_00000006"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        Trainer(
            make_toy_task(replace(SETTINGS, steps=8, checkpoint_every=1, keep_last=3)),
            run_dir=run,
            resume=True,
            **QUIET,
        ).fit()
    monkeypatch.undo()
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000004", "step_00000005", "step_00000006"]
    assert latest_checkpoint(run / "checkpoints").name == "step_00000006"


def test_a_signal_in_a_stage_s_last_step_starts_no_further_stage(tmp_path):
    out = tmp_path / "run"
    stopped = toy(
        "train", "toy-staged", "--preset", "tiny", "--out", str(out), "--device", "cpu", kill_at="first:6:SIGTERM"
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert latest_checkpoint(out / "first" / "checkpoints").name == "step_00000006"
    assert not (out / "second").exists()
    resumed = toy("train", "toy-staged", "--out", str(out), "--resume", "--device", "cpu")
    assert resumed.returncode == 0 and "done: second: step 5" in resumed.stdout, resumed.stderr
