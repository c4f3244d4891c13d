"""Train, or restore, the toy task under FSDP / DDP; run by torchrun (or alone, as one process).

Usage: python sharded_worker.py RUN_DIR STEPS PARALLEL [--resume] [--dump FILE]

With ``--dump`` the restored state (whole model weights, whole optimizer state, whole EMA) is written
to FILE by rank 0 before training continues, so the test can compare what 1 and 2 processes restore.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from toy_task import ToyConfig, make_toy_task

from quintet.training import Trainer, TrainSettings
from quintet.training.parallel import full_tensor


def settings(steps: int) -> TrainSettings:
    return TrainSettings(
        steps=steps,
        batch_size=4,
        grad_accum=2,
        warmup_steps=2,
        eval_every=0,
        checkpoint_every=2,
        keep_last=5,
        log_every=1,
        ema_decay=0.8,
        lr=3e-3,
    )


def dump_restored(trainer: Trainer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(trainer.parallel_model, trainer.optimizer, options=options)
    ema = {name: full_tensor(t).detach().cpu() for name, t in trainer.ema.state_dict().items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"model": model_state, "optimizer": optimizer_state["state"], "ema": ema}, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("parallel")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--dump", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = make_toy_task(settings(args.steps), config=ToyConfig(dropout=0.0))
    trainer = Trainer(
        task, run_dir=args.run_dir, resume=args.resume, device="cpu", parallel=args.parallel, live_progress=False
    )
    if args.dump is not None:
        task.start = lambda run: dump_restored(trainer, args.dump)
    trainer.fit()


if __name__ == "__main__":
    main()
