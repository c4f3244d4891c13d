"""The hourglass system for the registry: presets, task, and the demo that races it against a flat LM."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from quintet.hourglass.config import HourglassConfig
from quintet.hourglass.data import bits_per_byte, lm_loss, load_corpus, sample_text, train_batches
from quintet.hourglass.model import FlatLM, HourglassLM, count_parameters, flat_baseline
from quintet.registry import DemoRun, Preset, Stage, System, TaskRequest
from quintet.training.pipeline import RunResult
from quintet.training.report import plot_series
from quintet.training.task import ReportSection, Task, TrainSettings

STDLIB = "the Python standard library source of the running interpreter (embedded, no download)"


@dataclass(frozen=True, kw_only=True)
class HourglassRecipe:
    """The hourglass presets' own settings."""

    corpus: Literal["stdlib", "enwik8"] = "stdlib"
    """the embedded stdlib corpus (``--data`` may name any text file or folder), or a user's enwik8 file"""
    eval_windows: int = 64
    """validation windows of ``max_seq_len`` bytes per evaluation"""


class HourglassSystem(System):
    name = "hourglass"
    description = "hierarchical byte-level LM (Nawrot et al. 2021) with an equal-size flat transformer baseline"
    model_classes = (HourglassLM, FlatLM)
    demo_budget_share = 1.5  # ~170 s: the hourglass and its flat baseline race for half of it each
    metric_meanings = {
        "val_loss": "mean next-byte cross-entropy on held-out text, in nats per byte (lower is better)",
        "val_bpb": "bits per byte on held-out text (lower is better; 8 is a uniform guess over bytes)",
        "bpb": "the training loss in bits per byte",
    }

    def presets(self) -> dict[str, Preset]:
        byte_lm = dict(num_tokens=256)
        tiny = HourglassConfig(
            **byte_lm, dim=32, depth=(1, (1, 1, 1), 1), shorten_factor=(2, 3), heads=2, dim_head=16, max_seq_len=64
        )
        demo = HourglassConfig(
            **byte_lm, dim=128, depth=(2, 4, 2), shorten_factor=3, heads=4, dim_head=32, max_seq_len=256
        )
        enwik8 = HourglassConfig(
            **byte_lm,
            dim=512,
            depth=(4, 8, 4),
            shorten_factor=3,
            heads=8,
            dim_head=64,
            max_seq_len=2048,
            dropout=0.1,
        )
        return {
            "tiny": Preset(
                system=self.name,
                name="tiny",
                description="smallest hourglass (nested two levels), for tests",
                data=STDLIB,
                expected_minutes=0.1,
                recipe=HourglassRecipe(eval_windows=4),
                stages=(
                    Stage(
                        model_config=tiny,
                        settings=TrainSettings(
                            steps=40, batch_size=4, lr=3e-3, warmup_steps=5, eval_every=20, log_every=5
                        ),
                    ),
                ),
            ),
            "demo": Preset(
                system=self.name,
                name="demo",
                description="2@1 4@3 2@1 hourglass vs its equal-parameter flat LM, bits per byte on stdlib source",
                data=STDLIB,
                expected_minutes=3.0,
                recipe=HourglassRecipe(eval_windows=32),
                stages=(
                    Stage(
                        model_config=demo,
                        settings=TrainSettings(
                            steps=1500,
                            batch_size=8,
                            lr=2e-3,
                            warmup_steps=30,
                            eval_every=25,
                            checkpoint_every=500,
                            log_every=10,
                        ),
                    ),
                ),
            ),
            "enwik8": Preset(
                system=self.name,
                name="enwik8",
                description="the paper's small enwik8 setting (4@1 8@3 4@1, d=512, context 2048), for a GPU",
                data="a user-supplied enwik8 file (--data PATH), split 90M / 5M / 5M",
                expected_minutes=24 * 60.0,
                # 512 x 2048 bytes: a fifth of the validation split per evaluation
                recipe=HourglassRecipe(corpus="enwik8", eval_windows=512),
                stages=(
                    Stage(
                        model_config=enwik8,
                        settings=TrainSettings(
                            steps=100_000,
                            batch_size=8,
                            lr=4e-4,
                            warmup_steps=2000,
                            eval_every=2000,
                            checkpoint_every=5000,
                            log_every=100,
                        ),
                    ),
                ),
            ),
        }

    def example_batch(self, model: HourglassLM | FlatLM, *, batch_size: int, generator: torch.Generator):
        # 17 input tokens: not a multiple of any shorten factor in the presets
        return torch.randint(0, model.config.num_tokens, (batch_size, 18), generator=generator)

    def generate(self, model: HourglassLM | FlatLM, batch: torch.Tensor, *, use_cache: bool) -> torch.Tensor:
        return model.generate(batch[:, :9], 8, temperature=0.0, use_cache=use_cache)

    def make_task(self, request: TaskRequest) -> Task:
        settings, config = request.settings, request.stage.model_config
        recipe = request.preset.recipe or HourglassRecipe()
        # the corpus is read when a batch, an evaluation or a sample first needs it
        corpus = functools.cache(lambda: load_corpus(request.data, enwik8=recipe.corpus == "enwik8"))
        seq_len = config.max_seq_len
        batches = functools.cache(
            lambda: train_batches(corpus(), batch_size=settings.batch_size, seq_len=seq_len, seed=settings.seed)
        )
        model = self.task_model(request)
        return Task(
            model=model,
            loss=lm_loss,
            train_batch=lambda index: batches()(index),
            settings=settings,
            evaluate=lambda model: bits_per_byte(model, corpus(), seq_len=seq_len, max_windows=recipe.eval_windows),
            sample=lambda model: sample_text(model, corpus(), seed=settings.seed),
            batch_tokens=lambda batch: batch.shape[0] * (batch.shape[1] - 1),
            batch_flops=lambda batch: batch.shape[0] * model.training_flops(batch.shape[1] - 1),
        )

    def demo_runs(self, *, quick: bool) -> list[DemoRun]:
        """The demo hourglass and its equal-parameter flat LM, half the budget each."""
        preset = self.presets()["demo"].with_settings(eval_every=10 if quick else 25)
        flat = preset.replace_stage("train", model_config=flat_baseline(preset.stages[0].model_config))
        return [DemoRun(label="hourglass", preset=preset), DemoRun(label="flat", preset=flat)]

    def demo_section(self, runs: list[RunResult], *, out_dir: Path, quick: bool) -> ReportSection:
        out_dir = Path(out_dir)
        found = {}
        for run in runs:
            stage = run.last
            found[run.label] = {
                "result": stage.result,
                "config": stage.stage.model_config,
                "val_bpb": stage.result.eval_metrics["val_bpb"],
                "params": count_parameters(stage.model),
                "sample": stage.task.sample(stage.model)["text"],
                "curve": [(e["time_s"], e["val_bpb"]) for e in stage.result.history if "val_bpb" in e],
            }
        figure = out_dir / "hourglass_val_bpb.png"
        plot_series(
            figure,
            {f"{label} ({run['params'] / 1e6:.2f}M params)": run["curve"] for label, run in found.items()},
            xlabel="training wall-clock (s)",
            ylabel="validation bits per byte",
            title="Hourglass vs equal-size flat transformer",
        )
        hourglass, flat = found["hourglass"], found["flat"]
        rows = [
            {
                "model": label,
                "parameters": run["params"],
                "steps": run["result"].step,
                "train seconds": round(run["result"].seconds, 1),
                "steps / s": round(run["result"].step / max(run["result"].seconds, 1e-9), 3),
                "val bpb": round(run["val_bpb"], 4),
            }
            for label, run in found.items()
        ]
        winner = "hourglass" if hourglass["val_bpb"] < flat["val_bpb"] else "flat"
        device = next(runs[0].last.model.parameters()).device
        summary = (
            f"A byte-level hourglass transformer ({_shape(hourglass['config'])}) and a flat transformer with the "
            f"same width and nearly the same parameter count ({flat['config'].depth} layers; "
            f"{hourglass['params']:,} vs {flat['params']:,} parameters) each trained for the same wall-clock "
            f"budget on {STDLIB}: hourglass {hourglass['result'].seconds:.0f} s ({hourglass['result'].step} steps), "
            f"flat {flat['result'].seconds:.0f} s ({flat['result'].step} steps), on {device}. The metric is bits per "
            f"byte (bpb) on held-out standard-library files: the average number of bits the model needs to encode "
            f"each next byte (8 = knowing nothing about bytes, lower is better). After the same time the {winner} "
            f"model reached the lower bpb ({hourglass['val_bpb']:.3f} hourglass vs {flat['val_bpb']:.3f} flat)."
        )
        return ReportSection(
            title="Hourglass: hierarchical transformer vs flat transformer",
            summary=summary,
            train_seconds=hourglass["result"].seconds + flat["result"].seconds,
            metrics={
                "hourglass_val_bpb": hourglass["val_bpb"],
                "flat_val_bpb": flat["val_bpb"],
                "hourglass_params": float(hourglass["params"]),
                "flat_params": float(flat["params"]),
                "hourglass_steps": float(hourglass["result"].step),
                "flat_steps": float(flat["result"].step),
            },
            figures=[str(figure)],
            samples={f"{label} sample (temperature 0.8)": run["sample"] for label, run in found.items()},
            tables={"same wall-clock, hourglass vs flat": rows},
        )


def _layout(depth: tuple, factors: tuple[int, ...], scale: int = 1) -> list[str]:
    pre, valley, post = depth
    inner = scale * factors[0]
    middle = _layout(valley, factors[1:], inner) if isinstance(valley, tuple) else [f"{valley}@{inner}"]
    return [f"{pre}@{scale}", *middle, f"{post}@{scale}"]


def _shape(config: HourglassConfig) -> str:
    """The paper's notation, e.g. ``2@1 4@3 2@1, d=128`` (layers @ shortening)."""
    return " ".join(_layout(config.depth, config.shorten_factors)) + f", d={config.dim}"
