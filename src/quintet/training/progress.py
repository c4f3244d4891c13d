"""What a run reports while it trains: the console, ``metrics.jsonl`` and TensorBoard.

On a terminal the console shows a live tqdm bar (step, loss, throughput, ETA); when stdout is not a
terminal (CI, a log file) it prints one plain line per log event instead. Only rank 0 reports.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_THROUGHPUT = ("steps_per_s", "samples_per_s", "tokens_per_s", "flops_per_s")


def _summary_writer(log_dir: Path):
    """A TensorBoard ``SummaryWriter`` when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_rate(value: float, unit: str) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix} {unit}/s"
    return f"{value:.1f} {unit}/s"


def _line(event: dict[str, Any], skip: tuple[str, ...]) -> str:
    parts = []
    for key, value in event.items():
        if key in skip:
            continue
        if key == "mfu":
            parts.append(f"mfu {value:.1%}")  # model FLOPs utilisation: a share of the device's peak
        else:
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


class RunLogger:
    """Writes every event to ``metrics.jsonl`` (and TensorBoard) and shows progress on the console."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool,
        live: bool | None = None,
        history: list[dict[str, Any]] | None = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.live = (sys.stdout.isatty() if live is None else live) and enabled
        self._bar = None
        self._jsonl = None
        self._tensorboard = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # rewrite the file from the checkpoint's history: events after the checkpoint were lost with the run
        self._jsonl = open(run_dir / METRICS_FILE, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        for event in history or []:
            self._jsonl.write(json.dumps(event) + "\n")
        self._jsonl.flush()
        self._tensorboard = _summary_writer(run_dir / TENSORBOARD_DIR)
        if self.live:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def record(self, event: dict[str, Any]) -> None:
        """Write one event (``kind`` train / eval, ``step``, ``time_s``, metrics) everywhere."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(event) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            prefix = event.get("kind", "train")
            for key, value in event.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"{prefix}/{key}", value, event["step"])

    def show_train(self, event: dict[str, Any], *, rate: str, eta_s: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {event['loss']:.4f} | {rate}", refresh=False)
            return
        text = _line(event, skip=("kind", "step", "time_s", *_THROUGHPUT))
        print(
            f"step {event['step']}/{self.total_steps} | {text} | {rate} | "
            f"elapsed {format_duration(event['time_s'])} | eta {format_duration(eta_s)}",
            flush=True,
        )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def show_eval(self, event: dict[str, Any]) -> None:
        self.message(f"eval @ step {event['step']} | {_line(event, skip=('kind', 'step', 'time_s', 'loss'))}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
