"""Two processes under torchrun (CPU, gloo): both ranks end with the same weights, only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def fake_thread(task_dir: Path, tid: int, name: str, state: str) -> None:
    (task_dir / str(tid)).mkdir(parents=True)
    (task_dir / str(tid) / "comm").write_text(name + "\n")
    # the name in /proc's stat may itself hold ") " : the state is the field after the last ')'
    (task_dir / str(tid) / "stat").write_text(f"{tid} ({name}) x) {state} 1 {tid} {tid} 0 -1\n")


def test_teardown_waits_only_for_a_busy_gloo_worker_and_never_forever(tmp_path):
    from quintet.training.distributed import GLOO_WORKER_THREAD, _gloo_workers_busy, wait_for_gloo_workers

    tasks = tmp_path / "task"
    fake_thread(tasks, 1, "python", "R")  # the main thread runs: not a reason to wait
    fake_thread(tasks, 2, GLOO_WORKER_THREAD, "S")  # idle on its queue
    assert not _gloo_workers_busy(str(tasks))
    started = time.monotonic()
    wait_for_gloo_workers(task_dir=str(tasks), timeout_s=10.0)
    assert time.monotonic() - started < 5.0  # a few quiet polls, not the timeout

    fake_thread(tasks, 3, GLOO_WORKER_THREAD, "R")  # still dropping a finished collective's tensors
    assert _gloo_workers_busy(str(tasks))
    started = time.monotonic()
    wait_for_gloo_workers(task_dir=str(tasks), timeout_s=0.2)
    assert 0.2 <= time.monotonic() - started < 5.0
