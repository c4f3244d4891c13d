"""FSDP checkpoints are sharded (every rank writes its shard) and resume on another number of processes;
the EMA is sharded too and equals the EMA of the same run under DDP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_task import ToyLM

from quintet.training.checkpoint import (
    LATEST_FILE,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint_model,
)

WORKER = Path(__file__).with_name("sharded_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, str(WORKER), *args] if processes > 1 else [sys.executable, str(WORKER), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def final(run_dir: Path, *, ema: bool) -> dict[str, torch.Tensor]:
    model, _, which = load_checkpoint_model(ToyLM, run_dir, ema=ema)
    assert which == ("ema" if ema else "model")
    return model.state_dict()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    run(str(out), "4", "fsdp", processes=2)
    return out


def test_fsdp_writes_sharded_checkpoints_every_rank_its_shard(fsdp_run):
    checkpoint = latest_checkpoint(fsdp_run / "checkpoints")
    assert checkpoint.name == "step_00000004" and is_sharded_checkpoint(checkpoint)
    shards = sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp"))
    assert len(shards) == 2  # one file per rank, no whole copy of the weights anywhere
    assert not (checkpoint / "model" / "model.safetensors").exists()


def test_a_sharded_checkpoint_restores_the_same_state_on_one_and_two_processes(fsdp_run, tmp_path):
    at_step_2 = tmp_path / "run"
    shutil.copytree(fsdp_run, at_step_2)
    shutil.rmtree(at_step_2 / "checkpoints" / "step_00000004")
    (at_step_2 / "checkpoints" / LATEST_FILE).write_text("step_00000002\n")
    run(str(at_step_2), "2", "fsdp", "--resume", "--dump", str(tmp_path / "two.pt"), processes=2)
    run(str(at_step_2), "2", "fsdp", "--resume", "--dump", str(tmp_path / "one.pt"), processes=1)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    for part in ("model", "ema"):
        assert two[part].keys() == one[part].keys()
        for key in two[part]:
            assert torch.equal(two[part][key], one[part][key]), f"{part}/{key}"
    assert two["optimizer"].keys() == one["optimizer"].keys()
    for key, moments in two["optimizer"].items():
        for name, value in moments.items():
            assert torch.equal(value, one["optimizer"][key][name]), f"optimizer/{key}/{name}"

    # continued on two processes, the run ends where the uninterrupted one did, bit for bit
    run(str(at_step_2), "4", "fsdp", "--resume", processes=2)
    for ema in (False, True):
        a, b = final(fsdp_run, ema=ema), final(at_step_2, ema=ema)
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_sharded_ema_equals_the_ema_of_the_same_run_under_ddp(fsdp_run, tmp_path):
    ddp = tmp_path / "ddp"
    run(str(ddp), "4", "ddp", processes=2)
    assert not is_sharded_checkpoint(latest_checkpoint(ddp / "checkpoints"))
    for ema in (False, True):
        sharded, replicated = final(fsdp_run, ema=ema), final(ddp, ema=ema)
        for key in sharded:
            torch.testing.assert_close(sharded[key], replicated[key], rtol=1e-5, atol=1e-6)
    # and the EMA is not just the weights
    assert any(not torch.equal(final(ddp, ema=True)[k], final(ddp, ema=False)[k]) for k in final(ddp, ema=False))


def test_export_writes_a_sharded_checkpoint_as_one_pretrained_folder(fsdp_run, toy_systems, tmp_path, capsys):
    from quintet.cli import main

    assert main(["export", "toy", "--checkpoint", str(fsdp_run), "--out", str(tmp_path / "export")]) == 0
    assert "wrote the ema weights" in capsys.readouterr().out
    exported = ToyLM.from_pretrained(tmp_path / "export").state_dict()
    expected = final(fsdp_run, ema=True)
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert main(["eval", "toy", "--checkpoint", str(fsdp_run), "--device", "cpu"]) == 0  # sample / eval read it too
