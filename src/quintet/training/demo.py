"""``quintet demo``: train every registered system for a fixed time, report the results.

Each system gets a fixed training-time budget (not a step count), so the demo ends on time on a
slow machine too: :data:`TRAIN_BUDGET_S` times the system's ``demo_budget_share`` (a system that
needs longer, e.g. reinforcement learning that must collect its data, takes a larger share). The
system's :meth:`~quintet.registry.System.demo_runs` split that budget over one or several runs (the
hourglass races a flat baseline; the Q-Transformer learns CartPole, then LunarLander), each trained
with all its stages through :func:`~quintet.training.pipeline.train_preset`; the system turns the
trained runs into its report section (:meth:`~quintet.registry.System.demo_section`). The report
(``runs/demo/report.html``) is one self-contained HTML file with a section per system, next to a
``summary.json`` for scripts.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from quintet import registry
from quintet.core.io import atomic_write_text, ensure_writable_dir
from quintet.registry import System
from quintet.training.pipeline import RunResult, TrainerOptions, split_budget, train_preset
from quintet.training.report import write_report
from quintet.training.task import ReportSection

TRAIN_BUDGET_S = {False: 115.0, True: 22.0}
"""training seconds per unit of ``demo_budget_share`` (full demo, ``--quick``)"""


def run_system_demo(system: System, out_dir: Path, *, budget_s: float, quick: bool = False) -> ReportSection:
    """Train ``system``'s demo runs within ``budget_s`` seconds in ``out_dir``; its report section."""
    runs = system.demo_runs(quick=quick)
    if not runs:
        raise ValueError(f"demo_runs: {system.name} returned no runs")
    results: list[RunResult] = []
    remaining = budget_s
    for position, run in enumerate(runs):
        budget = split_budget(remaining, [r.budget_share for r in runs[position:]])
        results.append(
            train_preset(
                system,
                run.preset,
                run_dir=out_dir / run.label,
                budget_s=budget,
                label=run.label,
                options=TrainerOptions(device=run.device),
            )
        )
        trained = sum(stage.result.seconds for stage in results[-1].stages.values() if stage.result is not None)
        remaining = max(0.0, remaining - trained)
    return system.demo_section(results, out_dir=out_dir, quick=quick)


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
    out_dir = ensure_writable_dir(Path(out_dir), "out")
    available = registry.systems()
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
        print(f"[demo] {name}: training for {budgets[name]:.0f} s", flush=True)
        system_start = time.perf_counter()
        try:
            section = run_system_demo(available[name], out_dir / name, budget_s=budgets[name], quick=quick)
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
        f"{'Quick demo' if quick else 'Demo'}: each system trained on embedded data (no download) for a fixed "
        f"time budget ({', '.join(f'{n} {b:.0f} s' for n, b in budgets.items())}), then was evaluated and "
        f"sampled. Total {total:.0f} s on {torch.get_num_threads()} CPU thread(s)"
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
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"[demo] wrote {report} and {out_dir / 'summary.json'} ({total:.0f} s)", flush=True)
    return summary
