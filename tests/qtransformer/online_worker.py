"""Run a small online-offline CartPole task under torchrun; each rank saves its final weights to OUT/rankN.pt."""

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


def main(out: Path) -> None:
    settings = TrainSettings(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, eval_every=0, checkpoint_every=2)
    torch.manual_seed(0)
    model = QTransformer(CARTPOLE)
    task = build_task(model, OnlineReplay(model, ONLINE), ONLINE, settings)
    Trainer(task, run_dir=out / "run", device="cpu", live_progress=False).fit()
    torch.save(model.state_dict(), out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
