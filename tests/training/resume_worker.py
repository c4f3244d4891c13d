"""Train the toy task into RUN_DIR; with --kill-at-step K, SIGKILL this process after step K's update.

Usage: python resume_worker.py RUN_DIR STEPS [--kill-at-step K]
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from toy_task import make_toy_task

from quintet.training import Trainer, TrainSettings


def resume_settings(steps: int) -> TrainSettings:
    """Dropout, an EMA, accumulation and mid-run evaluation: every kind of state a resume must restore."""
    return TrainSettings(
        steps=steps,
        batch_size=4,
        grad_accum=2,
        warmup_steps=2,
        eval_every=2,
        checkpoint_every=3,
        log_every=1,
        ema_decay=0.8,
        lr=3e-3,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--kill-at-step", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = make_toy_task(resume_settings(args.steps))
    if args.kill_at_step is not None:
        task.after_step = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == args.kill_at_step else None
    Trainer(task, run_dir=args.run_dir, device="cpu", live_progress=False).fit()


if __name__ == "__main__":
    main()
