"""quintet.training: one Trainer for every system, its checkpoints, logs and the demo report."""

from quintet.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint_model,
    load_trainer_state,
    read_run_config,
    resolve_checkpoint,
)
from quintet.training.report import plot_series, write_report
from quintet.training.task import ReportSection, RunInfo, Task, TrainSettings
from quintet.training.trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = [
    "NonFiniteLossError",
    "ReportSection",
    "RunInfo",
    "Task",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "latest_checkpoint",
    "load_checkpoint_model",
    "load_trainer_state",
    "plot_series",
    "read_run_config",
    "resolve_checkpoint",
    "write_report",
]
