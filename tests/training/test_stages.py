"""Multi-stage presets through ``quintet train``: stage folders, handing trained models on, exact resume
after a kill inside stage 2, one stage alone with ``--init-from``, and sample / eval of either stage.

The ``toy-staged`` system (tests/training/toy_task.py) has two stages of two model classes: ``first``
(a ToyLM) learns a pattern, ``second`` (an OtherToyLM) distils the trained first model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quintet.cli import main
from quintet.training.checkpoint import latest_checkpoint, load_trainer_state

TOY_CLI = Path(__file__).with_name("toy_task.py")
TRAIN = ["train", "toy-staged", "--preset", "tiny", "--device", "cpu"]


def toy(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUINTET_DEBUG": ""}
    if kill_at:
        env["QUINTET_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(TOY_CLI), *args], capture_output=True, text=True, timeout=300, env=env)


def final_weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run / stage / "checkpoints") / "model" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("staged") / "run"
    done = toy(*TRAIN, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "done: first: step 6" in done.stdout and "done: second: step 5" in done.stdout
    return out


def test_stages_train_in_their_own_folders_and_the_run_records_them(uninterrupted):
    for stage, steps in (("first", 6), ("second", 5)):
        folder = uninterrupted / stage
        assert latest_checkpoint(folder / "checkpoints").name == f"step_{steps:08d}"
        assert (folder / "metrics.jsonl").is_file() and (folder / "loss_curve.png").is_file()
        assert json.loads((folder / "summary.json").read_text())["step"] == steps
        run_config = json.loads((latest_checkpoint(folder / "checkpoints") / "run_config.json").read_text())
        assert run_config["stage"] == stage
    record = json.loads((uninterrupted / "run.json").read_text())
    assert record["stages"] == ["first", "second"] and set(record["completed"]) == {"first", "second"}
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert set(summary["stages"]) == {"first", "second"}
    # the second stage received the trained first model: its checkpoint says where it came from
    config = json.loads((latest_checkpoint(uninterrupted / "second" / "checkpoints") / "run_config.json").read_text())
    assert Path(config["inputs"]["first"]) == latest_checkpoint(uninterrupted / "first" / "checkpoints").resolve()


def test_killed_in_stage_two_and_resumed_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    crashed = toy(*TRAIN, "--out", str(out), kill_at="second:3")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert latest_checkpoint(out / "second" / "checkpoints").name == "step_00000002"
    assert set(json.loads((out / "run.json").read_text())["completed"]) == {"first"}

    resumed = toy("train", "toy-staged", "--out", str(out), "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert "done: first" not in resumed.stdout and "done: second: step 5" in resumed.stdout
    for stage in ("first", "second"):
        assert_same_weights(final_weights(out, stage), final_weights(uninterrupted, stage))
    state_a = load_trainer_state(latest_checkpoint(out / "second" / "checkpoints"))
    state_b = load_trainer_state(latest_checkpoint(uninterrupted / "second" / "checkpoints"))
    assert [e["loss"] for e in state_a["history"]] == [e["loss"] for e in state_b["history"]]


def test_sample_and_eval_read_either_stage(uninterrupted, toy_systems, capsys):
    for checkpoint in (uninterrupted / "first", uninterrupted / "second", uninterrupted):
        assert main(["sample", "toy-staged", "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
        assert len(capsys.readouterr().out.split()) == 12
    assert main(["eval", "toy-staged", "--checkpoint", str(uninterrupted), "--device", "cpu"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"val_loss"}


def test_one_stage_alone_takes_its_needs_from_init_from(uninterrupted, toy_systems, tmp_path, capsys):
    out = tmp_path / "second-only"
    code = main([*TRAIN, "--out", str(out), "--stage", "second", "--init-from", str(uninterrupted), "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    assert "done: second: step 2" in capsys.readouterr().out
    assert not (out / "first").exists() and latest_checkpoint(out / "second" / "checkpoints").name == "step_00000002"


def test_one_stage_alone_without_its_needs_is_a_clear_error(toy_systems, tmp_path, capsys):
    code = main([*TRAIN, "--out", str(tmp_path / "run"), "--stage", "second"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "init_from" in err[0] and "'first'" in err[0]
    code = main([*TRAIN, "--out", str(tmp_path / "run"), "--stage", "third"])
    assert code == 2 and "no stage 'third'" in capsys.readouterr().err


def test_a_typed_flag_overrides_every_stage_even_at_a_stage_s_default(toy_systems, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out), "--steps", "6"]) == 0  # 6 is the first stage's own default
    assert "done: first: step 6" in capsys.readouterr().out
    assert latest_checkpoint(out / "second" / "checkpoints").name == "step_00000006"
    assert json.loads((out / "run.json").read_text())["overrides"] == {"steps": 6}


def test_auto_resume_starts_fresh_then_continues(toy_systems, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "toy", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--auto-resume"]) == 0
    assert "resumed from" not in capsys.readouterr().out
    assert main(["train", "toy", "--device", "cpu", "--out", str(out), "--auto-resume", "--steps", "8"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "done: step 8" in printed
