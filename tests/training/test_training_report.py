"""Figures and the self-contained demo report."""

from __future__ import annotations

import json
import math
import re

import pytest

from quintet import registry
from quintet.training import ReportSection, plot_series, write_report
from quintet.training.demo import run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_series_writes_a_png_and_skips_non_finite_points(tmp_path):
    path = plot_series(
        tmp_path / "sub" / "curves.png",
        {"train": [(0, 3.0), (1, 2.0), (2, math.nan)], "empty": [], "val": [(1, 2.5)]},
        "step",
        "loss",
        "title",
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(TypeError, match="series"):
        plot_series(tmp_path / "x.png", [(0, 1)], "x", "y", "t")


def test_report_is_self_contained(tmp_path):
    figure = plot_series(tmp_path / "f.png", {"a": [(0, 1), (1, 0)]}, "x", "y", "t")
    section = ReportSection(
        title="toy <b>",
        summary="what it means",
        train_seconds=1.5,
        metrics={"val_loss": 1.25},
        figures=[str(figure)],
        samples={"text": "a < b"},
        tables={"runs": [{"model": "flat", "bpb": 2.0}, {"model": "hourglass", "bpb": 1.9}]},
    )
    html = write_report(tmp_path / "report.html", [section], title="demo", intro="intro").read_text()
    assert "data:image/png;base64," in html and "toy &lt;b&gt;" in html and "a &lt; b" in html
    assert "hourglass" in html and "1.25" in html
    # nothing is fetched from elsewhere: every src is a data URI
    assert all(src.startswith("data:") for src in re.findall(r"src='([^']*)'", html))
    assert "<link" not in html and "<script" not in html


def test_demo_without_systems_still_writes_a_report(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_SYSTEMS", {})
    monkeypatch.setattr(registry, "_entry_points_loaded", True)
    summary = run_demo(tmp_path, quick=True)
    assert summary["systems"] == {}
    assert "No systems have landed yet" in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["quick"] is True


def test_a_failing_system_gets_a_failed_section(toy_systems, tmp_path, monkeypatch):
    def broken_task(*args, **kwargs):
        raise RuntimeError("no data today")

    monkeypatch.setattr(toy_systems["toy"], "make_task", broken_task)
    summary = run_demo(tmp_path, systems=["toy"], budget_s=1)
    assert summary["systems"]["toy"]["status"] == "failed"
    assert "no data today" in (tmp_path / "report.html").read_text()


def test_a_system_with_a_larger_share_gets_a_longer_demo_budget(toy_systems, tmp_path, monkeypatch):
    import quintet.training.demo as demo

    budgets = {}

    def record(system, out_dir, *, budget_s, quick=False):
        budgets[system.name] = budget_s
        return ReportSection(title=system.name, summary="", train_seconds=0.0)

    monkeypatch.setattr(demo, "run_system_demo", record)
    monkeypatch.setattr(toy_systems["toy2"], "demo_budget_share", 2.5)
    summary = run_demo(tmp_path, systems=["toy", "toy2"], budget_s=4)
    assert budgets == {"toy": 4, "toy2": 10} and summary["budget_s"] == budgets
