"""Train quantizers for a few steps in 2 processes (gloo, CPU); each rank saves its state to OUT/rankN.pt.

Also imported by ``test_quantize.py`` for the single-process reference on the concatenated inputs.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quintet.core.quantize import ResidualQuantizer, VectorQuantizer

WORLD = 2
STEPS = 4
ROWS = (48, 40)  # uneven on purpose: sampling across ranks must not assume equal batches


def build() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "rq": ResidualQuantizer(8, 16, 3, ema_decay=0.9, dead_code_threshold=1),
        "vq": VectorQuantizer(8, 16, codebook_dim=4, distance="cosine", ema_decay=0.8, dead_code_threshold=2),
    }


def inputs(step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s batch at ``step``: a few tight clusters, so some codes go unused and restart."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    centres = torch.randn(3, 8, generator=generator) * 3
    pick = torch.randint(0, 3, (ROWS[rank],), generator=generator)
    return centres[pick] + 0.3 * torch.randn(ROWS[rank], 8, generator=generator)


def train(models: dict[str, torch.nn.Module], batch_for_step) -> dict[str, list[float]]:
    """Run STEPS training forwards; returns the ``dead_codes`` metric of every step per model."""
    dead = {name: [] for name in models}
    for step in range(STEPS):
        for name, model in models.items():
            model.train()
            out = model(batch_for_step(step))
            dead[name].append(float(out.metrics["dead_codes"]))
    return dead


def state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": v.clone() for name, model in models.items() for key, v in model.state_dict().items()}


def _rank(rank: int, out: Path) -> None:
    torch.set_num_threads(1)
    store = f"file://{out / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        models = build()
        dead = train(models, lambda step: inputs(step, rank))
        torch.save({"state": state(models), "dead": dead}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    # fork, not spawn: the ranks inherit the imported torch instead of importing it again (seconds each);
    # nothing has started a thread pool yet
    mp.start_processes(_rank, args=(target,), nprocs=WORLD, start_method="fork")
