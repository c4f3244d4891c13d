"""Run a small online-offline CartPole task under torchrun (``ddp`` or ``fsdp``); each rank saves its
target network (whole, before and after) and, with DDP, its final weights to OUT/rankN.pt."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from quintet.qtransformer import QTransformer
from quintet.qtransformer.online import OnlineReplay
from quintet.qtransformer.presets import CARTPOLE, CARTPOLE_RL
from quintet.qtransformer.system import build_task
from quintet.training import Trainer, TrainSettings

ONLINE = replace(
    CARTPOLE_RL,
    steps_per_round=2,
    initial_episodes=2,
    episodes_per_round=2,
    collect_envs=2,
    eval_episodes=2,
    target_return=None,
)


def main(out: Path, parallel: str) -> None:
    settings = TrainSettings(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, eval_every=0, checkpoint_every=2)
    torch.manual_seed(0)
    model = QTransformer(CARTPOLE)
    task = build_task(model, OnlineReplay(model, ONLINE), ONLINE, settings)
    target = task.extra_state["target"]
    before = {f"start.{key}": value.clone() for key, value in target.state_dict().items()}
    Trainer(task, run_dir=out / "run", device="cpu", live_progress=False, parallel=parallel).fit()
    # the process group is gone after fit: FSDP's shards differ by rank, their gathered target does not
    weights = dict(model.state_dict()) if parallel == "ddp" else {}
    weights |= {f"target.{key}": value for key, value in target.state_dict().items()} | before
    torch.save(weights, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
