"""``quintet demo``: train every landed system's ``demo`` preset for a fixed time, report the results.

Each system gets a fixed training-time budget (not a step count), so the demo ends on time on a
slow machine too: :data:`TRAIN_BUDGET_S` times the system's ``demo_budget_share`` (a system that
needs longer, e.g. reinforcement learning that must collect its data, takes a larger share); with all
five systems, training plus evaluation and sampling stays within 20 minutes on 2 CPU cores
(``--quick``: 5 minutes). The report
(``runs/demo/report.html``) is one self-contained HTML file with a section per system, next to a
``summary.json`` for scripts.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quintet.training.report import write_report
from quintet.training.task import ReportSection
from quintet.training.trainer import Trainer, ensure_writable_dir

if TYPE_CHECKING:
    from quintet.registry import System

DEMO_PRESET = "demo"
TRAIN_BUDGET_S = {False: 180.0, True: 40.0}
"""training seconds per system (full demo, ``--quick``): 5 systems x (budget + eval) fit 20 / 5 minutes"""

METRIC_MEANINGS = {
    "train_loss": "the training loss over the last logged steps",
    "val_loss": "mean cross-entropy on held-out data, in nats per token (lower is better)",
    "val_bpb": "bits per byte on held-out text (lower is better; 8 is a uniform guess over bytes)",
    "eval_return_mean": "mean episode return of the learned policy in evaluation rollouts (higher is better)",
    "eval_success_rate": "share of evaluation episodes that reached the goal (higher is better)",
}


def describe_metrics(metrics: dict[str, float]) -> str:
    """One sentence per known metric name saying what the number means."""
    known = [f"{name}: {METRIC_MEANINGS[name]}." for name in metrics if name in METRIC_MEANINGS]
    return " ".join(known)


def sample_outputs(samples: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Split a ``task.sample`` result into titled text samples and PNG figure paths."""
    texts: dict[str, str] = {}
    figures: list[str] = []
    for key, value in samples.items():
        if key == "images":
            figures.extend(str(path) for path in value)
        elif isinstance(value, str):
            texts[key] = value
        else:
            texts[key] = json.dumps(value, indent=2, default=str)
    return texts, figures


def run_default_demo(system: System, out_dir: Path, *, budget_s: float, quick: bool = False) -> ReportSection:
    """Train ``system``'s ``demo`` preset for ``budget_s`` seconds in ``out_dir``, evaluate, sample."""
    presets = system.presets()
    if DEMO_PRESET not in presets:
        raise ValueError(f"preset: {system.name} has no {DEMO_PRESET!r} preset; available: {', '.join(presets)}")
    preset = presets[DEMO_PRESET]
    settings = replace(preset.settings, time_budget_s=budget_s)
    torch.manual_seed(settings.seed)
    task = system.make_task(preset, settings=settings)
    run_config = {"system": system.name, "preset": preset.name, "data": None, "demo": True, "quick": quick}
    trainer = Trainer(task, run_dir=out_dir, device="auto", run_config=run_config)
    result = trainer.fit()

    texts: dict[str, str] = {}
    figures = [str(result.loss_curve)] if result.loss_curve is not None else []
    if task.sample is not None:
        model = trainer.eval_model
        model.eval()
        with torch.no_grad():
            sample_texts, sample_figures = sample_outputs(task.sample(model))
        texts.update(sample_texts)
        figures.extend(sample_figures)

    metrics = dict(result.eval_metrics)
    if "loss" in result.train_metrics:
        metrics["train_loss"] = result.train_metrics["loss"]
    samples_per_step = settings.batch_size * settings.grad_accum
    summary = (
        f"{system.description} Trained the {preset.name!r} preset ({preset.description}) on {preset.data} "
        f"for {result.seconds:.0f} s (a {budget_s:.0f} s budget): {result.step} optimizer steps of "
        f"{samples_per_step} samples on {trainer.device}. {describe_metrics(metrics)}"
    ).strip()
    return ReportSection(
        title=f"{system.name}: {preset.description}",
        summary=summary,
        train_seconds=result.seconds,
        metrics=metrics,
        figures=figures,
        samples=texts,
    )


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    quick: bool = False,
    systems: list[str] | None = None,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Run the demo of ``systems`` (default: every registered one); write report.html and summary.json.

    Returns the summary; a system whose demo raises gets a section saying so and ``"status": "failed"``.
    """
    from quintet.registry import systems as registered_systems

    out_dir = ensure_writable_dir(Path(out_dir), "out")
    available = registered_systems()
    names = list(available) if systems is None else list(systems)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"systems: unknown system(s) {', '.join(unknown)}; available: {', '.join(sorted(available)) or 'none'}"
        )
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s: expected seconds > 0, got {budget_s}")
    per_system = budget_s if budget_s is not None else TRAIN_BUDGET_S[quick]
    budgets = {name: per_system * available[name].demo_budget_share for name in names}

    started = time.perf_counter()
    sections: list[ReportSection] = []
    results: dict[str, Any] = {}
    for name in names:
        print(f"[demo] {name}: training its {DEMO_PRESET!r} preset for {budgets[name]:.0f} s", flush=True)
        system_start = time.perf_counter()
        try:
            section = available[name].demo(out_dir / name, budget_s=budgets[name], quick=quick)
        except Exception as error:  # one failing system still leaves a report of the others
            message = f"{type(error).__name__}: {error}"
            print(f"[demo] {name} failed: {message}", flush=True)
            section = ReportSection(
                title=f"{name}: failed",
                summary=f"The demo of {name} failed: {message}",
                train_seconds=0.0,
                samples={"traceback": traceback.format_exc()},
            )
            results[name] = {"status": "failed", "error": message}
        else:
            results[name] = {"status": "ok", "train_seconds": section.train_seconds, "metrics": section.metrics}
        results[name]["seconds"] = time.perf_counter() - system_start
        sections.append(section)

    total = time.perf_counter() - started
    intro = (
        f"{'Quick demo' if quick else 'Demo'}: each system trained its {DEMO_PRESET!r} preset on embedded data "
        f"(no download) for a fixed time budget ({', '.join(f'{n} {b:.0f} s' for n, b in budgets.items())}), "
        "then was evaluated and sampled. "
        f"Total {total:.0f} s on {torch.get_num_threads()} CPU thread(s)"
        f"{' and ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}."
    )
    report = write_report(out_dir / "report.html", sections, title="quintet demo", intro=intro)
    summary = {
        "quick": quick,
        "budget_s": budgets,
        "total_seconds": total,
        "report": str(report),
        "systems": results,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"[demo] wrote {report} and {out_dir / 'summary.json'} ({total:.0f} s)", flush=True)
    return summary
