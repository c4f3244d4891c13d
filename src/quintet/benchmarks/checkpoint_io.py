"""Time one checkpoint write and load of the hourglass demo model under DDP or FSDP (run by torchrun).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 -m quintet.benchmarks.checkpoint_io \
           {ddp,fsdp} RUN_DIR OUT.json

DDP writes a whole checkpoint from rank 0 (safetensors + the whole optimizer state); FSDP writes a
sharded one, every rank its own shard (``torch.distributed.checkpoint``). The same model, optimizer
state (after one step) and EMA; rank 0 writes the timings to OUT.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from quintet.hourglass import HourglassLM
from quintet.registry import get_preset
from quintet.training.checkpoint import dir_bytes, load_trainer_state
from quintet.training.distributed import barrier, setup_distributed, teardown_distributed
from quintet.training.ema import WeightEMA
from quintet.training.optim import build_optimizer, build_scheduler
from quintet.training.parallel import is_sharded, wrap
from quintet.training.state import RunState, restore_weights


def main(mode: str, run_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    context = setup_distributed("cpu")
    try:
        stage = get_preset("hourglass", "demo").stages[0]
        torch.manual_seed(0)
        model = HourglassLM(stage.model_config)
        parallel_model = wrap(model, context, mode, find_unused_parameters=False)
        settings = stage.settings
        optimizer = build_optimizer(parallel_model, settings, fused=False)
        scheduler = build_scheduler(optimizer, settings)
        ids = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(context.rank))
        parallel_model(ids).float().mean().backward()  # one step: the optimizer has its moments
        optimizer.step()
        ema = WeightEMA(model, 0.99, sharded=is_sharded(context, mode))
        ema.update(model)
        state = RunState(
            model=model,
            parallel_model=parallel_model,
            ema=ema,
            optimizer=optimizer,
            scheduler=scheduler,
            extra_state={},
            context=context,
            parallel=mode,
            settings=settings,
            run_config={},
        )
        barrier(context)
        started = time.perf_counter()
        checkpoint = state.save(run_dir, step=1, elapsed_s=0.0, history=[])
        barrier(context)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        saved = load_trainer_state(checkpoint)
        restore_weights(model, {}, checkpoint, saved, device=context.device)  # whole weights; sharded: next line
        state.restore_progress(checkpoint, saved)
        barrier(context)
        load_s = time.perf_counter() - started
        if context.is_main:
            params = sum(p.numel() for p in HourglassLM(stage.model_config).parameters())
            result = {
                "mode": mode,
                "processes": context.world_size,
                "parameters": params,
                "write_s": write_s,
                "load_s": load_s,
                "checkpoint_bytes": dir_bytes(checkpoint),
            }
            out.write_text(json.dumps(result) + "\n")
    finally:
        teardown_distributed(context)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
