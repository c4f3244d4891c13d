"""The ``quintet`` command in a subprocess: errors are one line and a non-zero exit, never a traceback.

``tests/training/toy_task.py`` run as a script is the same command with two tiny toy systems
registered, so the errors that need a system (unknown preset, wrong system's checkpoint, ...) are
checked in seconds. More command lines are checked in-process in tests/training/test_cli_commands.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quintet import registry
from quintet.registry import TaskRequest
from quintet.training import Trainer

TOY_CLI = Path(__file__).parent / "training" / "toy_task.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "QUINTET_DEBUG": ""}


def quintet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quintet", *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd
    )


def toy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOY_CLI), *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def toy_task_module():
    """tests/training/toy_task.py as a module (shared with the training tests when they loaded it)."""
    if "toy_task" not in sys.modules:
        spec = importlib.util.spec_from_file_location("toy_task", TOY_CLI)
        module = importlib.util.module_from_spec(spec)
        sys.modules["toy_task"] = module
        spec.loader.exec_module(module)
    return sys.modules["toy_task"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A 2-step run of the toy system, trained in this process as `quintet train toy` would."""
    toy_task = toy_task_module()
    preset = toy_task.ToySystem().presets()["tiny"]
    task = toy_task.ToySystem().make_task(TaskRequest.for_stage(preset))
    out = tmp_path_factory.mktemp("toy") / "run"
    run_config = {"system": "toy", "preset": "tiny", "stage": "train", "data": None}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(task, run_dir=out, device="cpu", run_config=run_config, live_progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    return out


def test_list_shows_every_registered_system_and_preset():
    done = quintet("list")
    assert done.returncode == 0, done.stderr
    registered = registry.systems()
    if not registered:
        assert "no systems" in done.stdout
    for name, system in registered.items():
        for preset in system.presets().values():
            assert any(line.split()[:2] == [name, preset.name] for line in done.stdout.splitlines())


def test_unknown_system():
    assert_one_line_error(quintet("train", "nosuch"), "system", "nosuch")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "toy", "--preset", "huge"], ["preset", "huge", "tiny"]),
        (["train", "toy", "--steps", "many"], ["--steps", "many"]),
        (["eval", "toy", "--checkpoint", "nowhere"], ["nowhere", "no such checkpoint"]),
    ],
)
def test_bad_command_lines(tmp_path, args, fragments):
    assert_one_line_error(toy(*args, cwd=tmp_path), *fragments)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    done = toy("train", "toy", "--preset", "tiny", "--steps", "1", "--out", str(blocker / "run"))
    assert_one_line_error(done, "out", "cannot write", str(blocker / "run"))


def test_checkpoint_of_another_system(toy_run):
    assert_one_line_error(toy("eval", "toy2", "--checkpoint", str(toy_run)), "system 'toy'", "not 'toy2'")


def test_corrupt_checkpoint(toy_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(toy_run, broken)
    latest = (broken / "checkpoints" / "latest").read_text().strip()
    (broken / "checkpoints" / latest / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_one_line_error(toy("eval", "toy", "--checkpoint", str(broken)), "model.safetensors", "corrupt")


def test_eval_reads_the_checkpoint(toy_run):
    done = toy("eval", "toy", "--checkpoint", str(toy_run / "checkpoints"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"val_loss"}


def test_hourglass_train_sample_eval(tmp_path):
    out = tmp_path / "run"
    done = quintet("train", "hourglass", "--preset", "tiny", "--steps", "3", "--out", str(out), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and "val_bpb" in summary["eval_metrics"]
    evaluated = quintet("eval", "hourglass", "--checkpoint", str(out), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["val_bpb"] == pytest.approx(summary["eval_metrics"]["val_bpb"], rel=1e-4)
    sampled = quintet("sample", "hourglass", "--checkpoint", str(out), "--device", "cpu")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.strip()


def test_record_writes_an_episode_store_of_frames_and_actions(tmp_path, capsys):
    from quintet.cli import main
    from quintet.data import EpisodeStore

    assert main(["record", "CartPole-v1", "--out", str(tmp_path / "rec"), "--episodes", "2", "--size", "16"]) == 0
    store = EpisodeStore(tmp_path / "rec")
    assert store.num_episodes == 2 and "recorded 2 episodes" in capsys.readouterr().out
    frames = store.episode(0).observations
    assert frames.dtype.name == "uint8" and frames.shape[1:] == (3, 16, 16)
    assert main(["record", "NoSuchEnv-v0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: env: NoSuchEnv-v0")
