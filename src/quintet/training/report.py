"""Figures and the self-contained HTML report (``runs/demo/report.html``).

PNGs are drawn with matplotlib's Agg backend (no display needed) and embedded in the HTML as
base64 data URIs, so the report is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quintet.core.io import atomic_write_text
from quintet.training.task import ReportSection

if TYPE_CHECKING:
    from quintet.registry import System
    from quintet.training.pipeline import RunResult

TRAINER_METRIC_MEANINGS = {"train_loss": "the training loss over the last logged steps"}


def plot_series(
    path: str | os.PathLike,
    series: dict[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    *,
    logy: bool = False,
) -> Path:
    """Draw one line per ``series`` entry (name -> ``[(x, y), ...]``) into the PNG ``path``.

    Non-finite points are left out; a series with no points is skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(series, dict):
        raise TypeError(f"series: expected a dict of name -> [(x, y), ...], got {type(series).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    try:
        for name, points in series.items():
            finite = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
            if not finite:
                continue
            xs, ys = zip(*finite)
            axes.plot(xs, ys, label=name, marker="o" if len(finite) < 20 else None, markersize=3)
        if logy:
            axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path


def plot_loss_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "loss") -> Path:
    """Train loss and every eval metric named ``*loss`` against the step, from a Trainer history."""
    series: dict[str, list[tuple[float, float]]] = {"train loss": []}
    for event in history:
        if event.get("kind") == "train" and "loss" in event:
            series["train loss"].append((event["step"], event["loss"]))
        elif event.get("kind") == "eval":
            for key, value in event.items():
                if key.endswith("loss") and key != "loss" and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((event["step"], value))
    return plot_series(path, series, "step", "loss", title)


def png_data_uri(path: str | os.PathLike) -> str:
    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 0.8rem 0; } td, th { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4rem 0; } .muted { color: #666; }
"""


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p class='muted'>(empty)</p>"
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(f"<td{' class=num' if numeric else ''}>{html.escape(_format(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_section(section: ReportSection) -> str:
    parts = [f"<section><h2>{html.escape(section.title)}</h2>"]
    parts.append(f"<p>{html.escape(section.summary)}</p>")
    parts.append(f"<p class='muted'>trained for {section.train_seconds:.1f} s</p>")
    if section.metrics:
        rows = [{"metric": key, "value": value} for key, value in section.metrics.items()]
        parts.append(_table(rows))
    for title, rows in section.tables.items():
        parts.append(f"<h3>{html.escape(title)}</h3>{_table(rows)}")
    for figure in section.figures:
        path = Path(figure)
        if path.is_file():
            parts.append(f"<img alt='{html.escape(path.stem)}' src='{png_data_uri(path)}'>")
        else:
            parts.append(f"<p class='muted'>(figure {html.escape(str(path))} is missing)</p>")
    for title, text in section.samples.items():
        parts.append(f"<h3>{html.escape(title)}</h3><pre>{html.escape(text)}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, sections: Sequence[ReportSection], *, title: str, intro: str = "") -> Path:
    """Write a self-contained HTML report: the intro, then one section per system."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>{html.escape(title)}</h1>"]
    if intro:
        body.append(f"<p>{html.escape(intro)}</p>")
    if sections:
        body.extend(render_section(section) for section in sections)
    else:
        body.append(
            "<p><strong>No systems have landed yet</strong>: the registry lists none, so there is nothing to "
            "train. Each system adds its section here when its package registers.</p>"
        )
    document = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    atomic_write_text(path, document)
    return path


def describe_metrics(metrics: dict[str, float], meanings: dict[str, str]) -> str:
    """One sentence per metric that ``meanings`` (or the Trainer's own) explains: what the number means."""
    meanings = {**TRAINER_METRIC_MEANINGS, **meanings}
    return " ".join(f"{name}: {meanings[name]}." for name in metrics if name in meanings)


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


def default_section(system: System, runs: list[RunResult]) -> ReportSection:
    """A system's demo section from its trained runs: each run's final metrics (named by the run when
    there are several), every stage's loss curve, and the last stage's samples."""
    metrics: dict[str, float] = {}
    last_metrics: dict[str, float] = {}
    figures: list[str] = []
    texts: dict[str, str] = {}
    parts, seconds = [], 0.0
    for run in runs:
        prefix = f"{run.label}_" if len(runs) > 1 else ""
        for stage in run.stages.values():
            result = stage.result
            if result is None:
                continue
            seconds += result.seconds
            parts.append(
                f"{run.preset.name}/{stage.stage.name}: {result.step} steps in {result.seconds:.0f} s"
                + (f" ({result.stopped_early})" if result.stopped_early else "")
            )
            if result.loss_curve is not None:
                figures.append(str(result.loss_curve))
        last = run.last
        if last.result is not None:
            last_metrics = dict(last.result.eval_metrics)
            if "loss" in last.result.train_metrics:
                last_metrics["train_loss"] = last.result.train_metrics["loss"]
            metrics.update({prefix + k: v for k, v in last_metrics.items()})
        if last.task.sample is not None:
            with torch.no_grad():
                sample_texts, sample_figures = sample_outputs(last.task.sample(last.model))
            texts.update({f"{prefix}{k}": v for k, v in sample_texts.items()})
            figures.extend(sample_figures)
    presets = ", ".join(f"{run.preset.name!r} ({run.preset.description}) on {run.preset.data}" for run in runs)
    summary = (
        f"{system.description} Trained {presets}: {'; '.join(parts)}. "
        f"{describe_metrics(last_metrics, system.metric_meanings)}"
    ).strip()
    title = f"{system.name}: {runs[0].preset.description}" if len(runs) == 1 else system.name
    return ReportSection(
        title=title, summary=summary, train_seconds=seconds, metrics=metrics, figures=figures, samples=texts
    )
