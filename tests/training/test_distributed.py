"""Two processes under torchrun (CPU, gloo): both ranks end with the same weights, only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOY_CLI = Path(__file__).with_name("toy_task.py")


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUINTET_TEST_SPY": str(tmp_path / "spy"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TOY_CLI)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_in_lockstep_and_only_rank_0_writes(tmp_path, parallel):
    out = tmp_path / "run"
    steps = ["--steps", "4", "--grad-accum", "2", "--checkpoint-every", "2", "--log-every", "1"]
    done = torchrun(
        tmp_path,
        "train",
        "toy",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--parallel",
        parallel,
        *steps,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    spy = tmp_path / "spy"
    rank0, rank1 = torch.load(spy / "rank0.pt"), torch.load(spy / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert not (spy / "rank1-writes.txt").exists()
    writes = (spy / "rank0-writes.txt").read_text().split()
    assert writes.count("checkpoint") == 2

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "train"] == [1, 2, 3, 4]
    # the checkpoint (whole with DDP, sharded with FSDP) holds the weights both ranks ended with
    from toy_task import ToyLM

    from quintet.training.checkpoint import is_sharded_checkpoint, load_checkpoint_model

    model, checkpoint, _ = load_checkpoint_model(ToyLM, out)
    assert checkpoint.name == "step_00000004" and is_sharded_checkpoint(checkpoint) == (parallel == "fsdp")
    for key, value in model.state_dict().items():
        assert torch.equal(value, rank0[key]), key
