"""RQ-Transformer benchmarks (issue 10), float32, every compared pair measured side by side in this process.

- sampling time per image: the RQ-Transformer with its two KV caches vs recomputing both stacks every
  step (target >= 5x at 8 x 8 x 4 codes), and vs the equal-parameter ``FlatCodeLM`` over all
  h * w * D codes, cached both (target RQ >= 2.5x faster at 16 x 16 x 4);
- train step (forward + backward) of the prior at batch 32 and of the demo RQ-VAE: images/s, peak
  memory, and the ratio of the measured time to the time the step's FLOPs need at this machine's
  measured matmul rate (target <= 1.5);
- quality per compute: val loss per code of the demo RQ-Transformer and its flat baseline after the
  same training time on the codes of the demo tokenizer (reported whichever wins).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from quintet import registry
from quintet.bench import count_flops, matmul_flops_per_s, peak_memory, time_fn
from quintet.rqtransformer import RQVAE, FlatCodeLM, RQTransformer, RQTransformerConfig, count_parameters, flat_baseline
from quintet.rqtransformer.prior import code_cross_entropy
from quintet.rqtransformer.system import RQTransformerSystem
from quintet.training.pipeline import TrainerOptions, train_preset

CODEBOOK, CLASSES = 256, 10
PRIORS = {
    False: dict(dim=256, heads=4, dim_head=64, spatial_layers=8, depth_layers=2),
    True: dict(dim=128, heads=4, dim_head=32, spatial_layers=4, depth_layers=1),
}
"""the prior of the sampling race and the train step: 8 spatial + 2 depth layers of width 256 (~8M
parameters); --quick: the demo's size (4 + 1 layers of width 128)"""


def _prior(code_shape: tuple[int, int, int], quick: bool) -> RQTransformerConfig:
    return RQTransformerConfig(codebook_size=CODEBOOK, code_shape=code_shape, num_classes=CLASSES, **PRIORS[quick])


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sampling(code_shape: tuple[int, int, int], *, batch: int, rounds: int, uncached: bool, quick: bool) -> dict:
    """Seconds per image of sampling ``batch`` images (one class each), rounds alternating the contenders so a
    slow spell of a shared machine hits all; the median round of each."""
    torch.manual_seed(0)
    rq = RQTransformer(_prior(code_shape, quick)).eval()
    flat = FlatCodeLM(flat_baseline(rq.config)).eval()
    class_ids = torch.arange(batch) % CLASSES

    def draw(model, use_cache):
        return lambda: model.generate(class_ids, generator=torch.Generator().manual_seed(0), use_cache=use_cache)

    contenders = {"rq_cached": draw(rq, True), "flat_cached": draw(flat, True)}
    if uncached:
        contenders["rq_uncached"] = draw(rq, False)
    for fn in contenders.values():  # warm-up
        fn()
    seconds = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            seconds[name].append(_seconds(fn) / batch)
    per_image = {name: statistics.median(values) for name, values in seconds.items()}
    row = {
        "code_shape": list(code_shape),
        "batch": batch,
        "rq_params": count_parameters(rq),
        "flat_params": count_parameters(flat),
        "flat_layers": flat.config.layers,
        **{f"{name}_ms_per_image": value * 1e3 for name, value in per_image.items()},
        "rq_vs_flat_speedup": per_image["flat_cached"] / per_image["rq_cached"],
    }
    if uncached:
        row["cache_speedup"] = per_image["rq_uncached"] / per_image["rq_cached"]
        greedy = [rq.generate(class_ids[:2], temperature=0.0, use_cache=c) for c in (True, False)]
        row["greedy_cached_equals_uncached"] = torch.equal(*greedy)
    print(f"  sampling {code_shape}: {row}", flush=True)
    return row


def _step_row(name: str, model: torch.nn.Module, step, flops: float, batch: int, min_time: float) -> dict:
    peak = peak_memory(step)
    counted = count_flops(step)
    seconds = time_fn(step, min_run_time=min_time)
    rate = matmul_flops_per_s()
    row = {
        "model": name,
        "params": count_parameters(model),
        "batch": batch,
        "seconds_per_step": seconds,
        "images_per_s": batch / seconds,
        "peak_memory_mb": peak / 2**20 if peak is not None else None,
        "flops_per_step": flops,
        "flops_counted": counted,
        "matmul_flops_per_s": rate,
        "time_over_flops_time": seconds / (flops / rate),
    }
    print(f"  train step {name}: {row}", flush=True)
    return row


def train_steps(*, batch: int, min_time: float, quick: bool) -> list[dict]:
    """Forward + backward (no optimizer) of the 8 x 8 x 4 prior and of the demo RQ-VAE at ``batch``."""
    rows = []
    torch.manual_seed(0)
    prior = RQTransformer(_prior((8, 8, 4), quick)).train()
    codes = torch.randint(0, CODEBOOK, (batch, 8, 8, 4))
    labels = torch.arange(batch) % CLASSES

    def prior_step():
        prior.zero_grad(set_to_none=True)
        code_cross_entropy(prior(codes, labels), codes).backward()

    rows.append(_step_row("rq_transformer_8x8x4", prior, prior_step, batch * prior.flops_per_sample(), batch, min_time))

    tokenizer_config = RQTransformerSystem().presets()["demo"].stage("tokenizer").model_config
    tokenizer = RQVAE(tokenizer_config).train()
    images = torch.rand(batch, 3, tokenizer_config.image_size, tokenizer_config.image_size)
    tokenizer(images)  # the first training call initialises the codebook from data

    def tokenizer_step():
        tokenizer.zero_grad(set_to_none=True)
        loss, _ = RQVAE.loss(tokenizer(images), images)
        loss.backward()

    flops = batch * tokenizer.flops_per_sample(tokenizer_config.image_size)
    rows.append(_step_row("rq_vae_demo", tokenizer, tokenizer_step, flops, batch, min_time))
    return rows


def quality_per_compute(tokenizer_s: float, prior_s: float, out: Path) -> dict:
    """The demo tokenizer for ``tokenizer_s``, then the demo RQ-Transformer and its flat baseline for ``prior_s``
    each on its codes (the pipeline's own stages; the final evaluation is not charged)."""
    system = registry.register(RQTransformerSystem())
    presets = system.presets()
    options = TrainerOptions(device="cpu", live_progress=False)
    demo = presets["demo"].with_settings(eval_every=0, checkpoint_every=0)
    torch.manual_seed(0)
    tokenizer = demo.with_settings(time_budget_s=tokenizer_s)
    train_preset(system, tokenizer, run_dir=out / "rq", only_stage="tokenizer", options=options)
    result = {"tokenizer_seconds": tokenizer_s, "prior_seconds_each": prior_s}
    for label, preset in (("rq", demo), ("flat", presets["demo-flat"].with_settings(eval_every=0, checkpoint_every=0))):
        torch.manual_seed(0)
        run = train_preset(
            system,
            preset.with_settings(time_budget_s=prior_s),
            run_dir=out / label,
            only_stage="prior",
            init_from=out / "rq",
            options=options,
        )
        stage = run.stages["prior"]
        result[label] = {
            "params": count_parameters(stage.model),
            "steps": stage.result.step,
            "seconds": stage.result.seconds,
            **stage.result.eval_metrics,
        }
        print(f"  {label} prior: {result[label]}", flush=True)
    result["val_loss_flat_minus_rq"] = result["flat"]["val_loss"] - result["rq"]["val_loss"]
    result["winner"] = "rq" if result["val_loss_flat_minus_rq"] > 0 else "flat"
    return result


def run(quick: bool = False) -> dict:
    small = sampling((8, 8, 4), batch=8 if quick else 32, rounds=1 if quick else 3, uncached=True, quick=quick)
    large = sampling((16, 16, 4), batch=1 if quick else 8, rounds=1 if quick else 2, uncached=False, quick=quick)
    steps = train_steps(batch=32, min_time=0.3 if quick else 2.0, quick=quick)
    with tempfile.TemporaryDirectory(prefix="quintet-bench-rq-") as folder:
        quality = quality_per_compute(4.0 if quick else 60.0, 4.0 if quick else 60.0, Path(folder))
    ratios = {
        "sampling_cache_speedup_8x8x4": small["cache_speedup"],
        "rq_vs_flat_sampling_speedup_8x8x4": small["rq_vs_flat_speedup"],
        "rq_vs_flat_sampling_speedup_16x16x4": large["rq_vs_flat_speedup"],
        "val_loss_flat_minus_rq": quality["val_loss_flat_minus_rq"],
    }
    for row in steps:
        ratios[f"{row['model']}_time_over_flops_time"] = row["time_over_flops_time"]
    return {
        "prior": PRIORS[quick],
        "sampling": [small, large],
        "train_step": steps,
        "quality_per_compute": quality,
        "ratios": ratios,
    }
