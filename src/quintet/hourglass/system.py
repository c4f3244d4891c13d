"""The hourglass system for the registry: presets, task, and the demo that races it against a flat LM."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from quintet.core.config import config_to_dict
from quintet.hourglass.config import FlatConfig, HourglassConfig
from quintet.hourglass.data import bits_per_byte, lm_loss, load_corpus, sample_text, train_batches
from quintet.hourglass.model import FlatLM, HourglassLM, count_parameters, flat_baseline
from quintet.registry import Preset, System, register
from quintet.training.task import ReportSection, Task, TrainSettings

EVAL_WINDOWS = {"tiny": 4, "demo": 32, "enwik8": 512}
"""validation windows per evaluation (enwik8: 512 x 2048 bytes, a fifth of its validation split)"""

STDLIB = "the Python standard library source of the running interpreter (embedded, no download)"


def _build(config: HourglassConfig | FlatConfig) -> HourglassLM | FlatLM:
    return HourglassLM(config) if isinstance(config, HourglassConfig) else FlatLM(config)


class HourglassSystem(System):
    name = "hourglass"
    description = "hierarchical byte-level LM (Nawrot et al. 2021) with an equal-size flat transformer baseline"
    model_class = HourglassLM

    def presets(self) -> dict[str, Preset]:
        byte_lm = dict(num_tokens=256)
        return {
            "tiny": Preset(
                system=self.name,
                name="tiny",
                description="smallest hourglass (nested two levels), for tests",
                data=STDLIB,
                expected_minutes=0.1,
                model_config=HourglassConfig(
                    **byte_lm,
                    dim=32,
                    depth=(1, (1, 1, 1), 1),
                    shorten_factor=(2, 3),
                    heads=2,
                    dim_head=16,
                    max_seq_len=64,
                ),
                settings=TrainSettings(steps=40, batch_size=4, lr=3e-3, warmup_steps=5, eval_every=20, log_every=5),
            ),
            "demo": Preset(
                system=self.name,
                name="demo",
                description="2@1 4@3 2@1 hourglass vs its equal-parameter flat LM, bits per byte on stdlib source",
                data=STDLIB,
                expected_minutes=3.0,
                model_config=HourglassConfig(
                    **byte_lm, dim=128, depth=(2, 4, 2), shorten_factor=3, heads=4, dim_head=32, max_seq_len=256
                ),
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
            "enwik8": Preset(
                system=self.name,
                name="enwik8",
                description="the paper's small enwik8 setting (4@1 8@3 4@1, d=512, context 2048), for a GPU",
                data="a user-supplied enwik8 file (--data PATH), split 90M / 5M / 5M",
                expected_minutes=24 * 60.0,
                model_config=HourglassConfig(
                    **byte_lm,
                    dim=512,
                    depth=(4, 8, 4),
                    shorten_factor=3,
                    heads=8,
                    dim_head=64,
                    max_seq_len=2048,
                    dropout=0.1,
                ),
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
        }

    def build_model(self, preset: Preset) -> HourglassLM | FlatLM:
        return _build(preset.model_config)

    def example_batch(self, model: HourglassLM, *, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        # 17 input tokens: not a multiple of any shorten factor in the presets
        return torch.randint(0, model.config.num_tokens, (batch_size, 18), generator=generator)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return lm_loss(model, batch)

    def generate(self, model: HourglassLM, batch: torch.Tensor, *, use_cache: bool) -> torch.Tensor:
        return model.generate(batch[:, :9], 8, temperature=0.0, use_cache=use_cache)

    def make_task(self, preset: Preset, *, data: str | None = None, settings: TrainSettings | None = None) -> Task:
        settings = settings or preset.settings
        config = preset.model_config
        corpus = load_corpus(data, enwik8=preset.name == "enwik8")
        seq_len = config.max_seq_len
        windows = EVAL_WINDOWS.get(preset.name, 64)
        return Task(
            model=_build(config),
            loss=lm_loss,
            train_batch=train_batches(corpus, batch_size=settings.batch_size, seq_len=seq_len, seed=settings.seed),
            settings=settings,
            evaluate=lambda model: bits_per_byte(model, corpus, seq_len=seq_len, max_windows=windows),
            sample=lambda model: sample_text(model, corpus, seed=settings.seed),
            batch_tokens=lambda batch: batch.shape[0] * (batch.shape[1] - 1),
        )

    def demo(self, out_dir: Path, *, budget_s: float, quick: bool = False) -> ReportSection:
        """Train the demo hourglass and its equal-parameter flat LM for ``budget_s / 2`` seconds each."""
        from quintet.training import Trainer
        from quintet.training.report import plot_series

        out_dir = Path(out_dir)
        preset = self.presets()["demo"]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        settings = replace(preset.settings, time_budget_s=budget_s / 2, eval_every=10 if quick else 25)
        variants = {"hourglass": preset.model_config, "flat": flat_baseline(preset.model_config)}
        runs: dict[str, dict[str, Any]] = {}
        for label, config in variants.items():
            task = self.make_task(replace(preset, model_config=config), settings=settings)
            run_config = {"system": self.name, "preset": preset.name, "variant": label, "model": config_to_dict(config)}
            result = Trainer(task, run_dir=out_dir / label, resume=False, device=device, run_config=run_config).fit()
            runs[label] = {
                "result": result,
                "val_bpb": result.eval_metrics["val_bpb"],
                "params": count_parameters(task.model),
                "sample": task.sample(task.model)["text"],
                "curve": [(e["time_s"], e["val_bpb"]) for e in result.history if "val_bpb" in e],
            }

        figure = out_dir / "hourglass_val_bpb.png"
        plot_series(
            figure,
            {f"{label} ({run['params'] / 1e6:.2f}M params)": run["curve"] for label, run in runs.items()},
            xlabel="training wall-clock (s)",
            ylabel="validation bits per byte",
            title="Hourglass vs equal-size flat transformer",
        )
        hourglass, flat = runs["hourglass"], runs["flat"]
        rows = [
            {
                "model": label,
                "parameters": run["params"],
                "steps": run["result"].step,
                "train seconds": round(run["result"].seconds, 1),
                "steps / s": round(run["result"].step / max(run["result"].seconds, 1e-9), 3),
                "val bpb": round(run["val_bpb"], 4),
            }
            for label, run in runs.items()
        ]
        winner = "hourglass" if hourglass["val_bpb"] < flat["val_bpb"] else "flat"
        summary = (
            f"A byte-level hourglass transformer ({_shape(preset.model_config)}) and a flat transformer with the "
            f"same width and nearly the same parameter count ({variants['flat'].depth} layers; "
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
            samples={f"{label} sample (temperature 0.8)": run["sample"] for label, run in runs.items()},
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


register(HourglassSystem())
