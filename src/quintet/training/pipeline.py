"""Run a preset's stages in order, each with its own Trainer, folder, checkpoints and metrics.

``quintet train`` and ``quintet demo`` both train through :func:`train_preset`. A one-stage preset
keeps the flat layout (``RUN/checkpoints``, ``RUN/metrics.jsonl``, ``RUN/summary.json``); a multi-stage
one gets a folder per stage (``RUN/tokenizer/checkpoints``, ``RUN/prior/...``) and ``RUN/run.json``,
which records the run (system, preset, data, the user's setting overrides) and every finished stage.

A stage receives the trained models of ``stage.needs`` loaded from their latest checkpoints (the
EMA weights when the run kept them), so a stage trains the same whether the stages before it ran in
this process, in an earlier one (``--resume``) or in another run (``--init-from``). Resuming skips the
finished stages and continues the one that was running from its latest checkpoint. A stop signal
(Ctrl-C, SIGTERM, SIGUSR1) ends the stage that is training with a checkpoint and starts no other.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quintet.core.config import CheckpointError, config_from_dict
from quintet.core.io import atomic_write_text, ensure_writable_dir, read_json
from quintet.training.checkpoint import (
    CHECKPOINTS_DIR,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint_model,
    read_run_config,
    resolve_checkpoint,
)
from quintet.training.distributed import resolve_device, setup_distributed, teardown_distributed
from quintet.training.plan import DEMO_PRESET, Preset, Stage, TaskRequest
from quintet.training.signals import StopSignals
from quintet.training.task import Task, TrainSettings
from quintet.training.trainer import Trainer, TrainResult

if TYPE_CHECKING:
    from quintet.registry import System

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True, kw_only=True)
class TrainerOptions:
    """How the stages' Trainers run (the same for every stage of a run)."""

    device: str = "auto"
    parallel: str = "ddp"
    precision: str = "auto"
    compile: bool = False
    live_progress: bool | None = None


@dataclass
class StageResult:
    stage: Stage
    task: Task
    model: nn.Module
    """the trained weights (the EMA when the run kept one), whole, in eval mode"""
    run_dir: Path
    result: TrainResult | None
    """None when an earlier invocation of the run finished this stage (``--resume``)"""


@dataclass
class RunResult:
    label: str
    preset: Preset
    run_dir: Path
    seconds: float
    stages: dict[str, StageResult]
    stopped_by: str | None = None
    """the signal that ended the run before its last stage finished ("SIGTERM", ...), else None"""

    @property
    def last(self) -> StageResult:
        return list(self.stages.values())[-1]


def stage_dir(run_dir: Path, preset: Preset, stage: str) -> Path:
    return Path(run_dir) / stage if preset.multi_stage else Path(run_dir)


def split_budget(remaining: float, shares: list[float]) -> float:
    """The first of ``shares``' part of a ``remaining`` time budget (at least a second)."""
    return max(1.0, remaining * shares[0] / sum(shares))


def apply_overrides(settings: TrainSettings, overrides: dict[str, Any]) -> TrainSettings:
    known = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"overrides: {unknown} are not TrainSettings fields")
    return replace(settings, **overrides)


def check_owner(run_config: dict[str, Any], system: System, where: Path) -> None:
    """A checkpoint (or run) of another system is a clear error, not a confusing load failure."""
    owner = run_config.get("system")
    if owner is not None and owner != system.name:
        raise CheckpointError(f"{where}: is a checkpoint of system {owner!r}, not {system.name!r}")


def checkpoint_settings(checkpoint: Path) -> TrainSettings:
    """The settings a checkpoint's stage trained with."""
    run_config = read_run_config(checkpoint)
    source = f"{checkpoint}/run_config.json"
    if not isinstance(run_config.get("settings"), dict):
        raise CheckpointError(f"{source}: has no training settings")
    return config_from_dict(TrainSettings, run_config["settings"], source=source)


def load_trained(system: System, checkpoint: Path, device: torch.device) -> nn.Module:
    """An earlier stage's trained model (EMA weights when kept), frozen and in eval mode, for a later stage."""
    model, _, _ = load_checkpoint_model(system, checkpoint, ema=True, map_location=device)
    model.requires_grad_(False)
    return model.eval()


def find_stage_checkpoint(folder: Path, stage: str, *, only_need: bool) -> Path:
    """Stage ``stage``'s latest checkpoint in ``folder``: a run folder holding ``stage/``, or (when it is
    the only stage needed) a stage's run or checkpoint folder itself."""
    folder = Path(folder)
    if (folder / stage).is_dir():
        return resolve_checkpoint(folder / stage)
    if only_need:
        return resolve_checkpoint(folder)
    raise CheckpointError(f"{folder}: holds no {stage}/ stage folder")


def read_run_file(run_dir: Path) -> dict[str, Any] | None:
    """A multi-stage run's ``run.json`` (None when the folder has none), checked field by field."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    data = read_json(path, CheckpointError)
    expected = {"system": str, "preset": str, "stages": list, "completed": dict, "overrides": dict}
    for key, kind in expected.items():
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if not all(isinstance(v, str) for v in data["completed"].values()) or not isinstance(
        data.get("data"), (str, type(None))
    ):
        raise CheckpointError(f"{path}: 'completed' must map stages to checkpoint paths, 'data' a path or null")
    return data


def has_checkpoint(run_dir: Path, preset: Preset) -> bool:
    """Whether ``run_dir`` holds a checkpoint of any of ``preset``'s stages (a run to resume)."""
    return any(latest_checkpoint(stage_dir(run_dir, preset, s.name) / CHECKPOINTS_DIR) for s in preset.stages)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def train_preset(
    system: System,
    preset: Preset,
    *,
    run_dir: str | Path,
    data: str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    only_stage: str | None = None,
    init_from: str | Path | None = None,
    budget_s: float | None = None,
    label: str | None = None,
    options: TrainerOptions = TrainerOptions(),
) -> RunResult:
    """Train ``preset``'s stages (or ``only_stage``) into ``run_dir``; see the module docstring.

    ``overrides`` are ``TrainSettings`` fields set for every stage (the command line's flags);
    ``budget_s`` splits a training-time budget over the stages by ``Stage.budget_share`` (training
    time a stage leaves unused passes on to the next; evaluation and checkpoints at the end of a
    stage are not charged). ``data``: resuming, the run's own data when None, an error when another.
    """
    if (reason := system.unavailable(preset)) is not None:
        raise ValueError(f"preset: {reason}")
    run = _Run(
        system=system,
        preset=preset,
        run_dir=Path(run_dir),
        data=data,
        overrides=dict(overrides or {}),
        resume=resume,
        only_stage=only_stage,
        init_from=Path(init_from) if init_from is not None else None,
        label=label or preset.name,
        options=options,
    )
    context = setup_distributed(options.device)  # one process group for every stage of the run
    finished = False
    try:
        with StopSignals() as signals:  # one stop request for every stage of the run
            result = run.train(context, signals, budget_s)
        finished = True
        return result
    finally:
        teardown_distributed(context, finished=finished)


@dataclass(kw_only=True)
class _Run:
    """One invocation of :func:`train_preset`: what it trains, and the run file it keeps."""

    system: System
    preset: Preset
    run_dir: Path
    data: str | None
    overrides: dict[str, Any]
    resume: bool
    only_stage: str | None
    init_from: Path | None
    label: str
    options: TrainerOptions

    def train(self, context, signals: StopSignals, budget_s: float | None) -> RunResult:
        started = time.perf_counter()
        self.context, self.signals = context, signals
        record = self._open_record()
        to_run = [self.preset.stage(self.only_stage)] if self.only_stage is not None else list(self.preset.stages)
        self.completed: dict[str, str] = dict(record["completed"]) if record is not None else {}
        if (
            self.resume
            and not (set(self.completed) & {s.name for s in to_run})
            and not has_checkpoint(self.run_dir, self.preset)
        ):
            raise ValueError(f"resume: {self.run_dir} holds no checkpoint to resume from")

        results: dict[str, StageResult] = {}
        remaining = budget_s
        for position, stage in enumerate(to_run):
            budget = None if remaining is None else split_budget(remaining, [s.budget_share for s in to_run[position:]])
            results[stage.name] = self._stage(stage, budget)
            trained = results[stage.name].result
            if remaining is not None and trained is not None:
                remaining = max(0.0, remaining - trained.seconds)
            if trained is not None and trained.stopped_early != "interrupted" and record is not None:
                # relative to the run folder, so a run moved elsewhere still resumes
                self.completed[stage.name] = os.path.relpath(trained.checkpoint, self.run_dir)
                record["completed"] = self.completed
                if context.is_main:
                    _write_json(self.run_dir / RUN_FILE, record)
            if signals.received:
                break
        if self.preset.multi_stage and context.is_main and self.only_stage is None and not signals.received:
            summaries = {name: _read_summary(r.run_dir) for name, r in results.items()}
            summary = {"system": self.system.name, "preset": self.preset.name, "stages": summaries}
            _write_json(self.run_dir / SUMMARY_FILE, summary)
        return RunResult(
            label=self.label,
            preset=self.preset,
            run_dir=self.run_dir,
            seconds=time.perf_counter() - started,
            stages=results,
            stopped_by=signals.received,
        )

    def _open_record(self) -> dict[str, Any] | None:
        """The run file of a multi-stage run: kept when resuming or training one stage alone, else new.
        Also settles the data: a resumed run trains on what it started with."""
        recorded_data = self._recorded_data()
        if self.resume and recorded_data is not None and self.data is not None and self.data != recorded_data:
            raise ValueError(f"data: the run trained on {recorded_data}; resume it with that --data (or none)")
        if self.resume and self.data is None:
            self.data = recorded_data
        if not self.preset.multi_stage:
            return None
        record = read_run_file(self.run_dir) if (self.resume or self.only_stage is not None) else None
        if record is not None:
            check_owner(record, self.system, self.run_dir / RUN_FILE)
            if record["preset"] != self.preset.name:
                raise CheckpointError(f"{self.run_dir / RUN_FILE}: is a run of preset {record['preset']!r}")
            self.data = self.data if self.data is not None else record.get("data")
            self.overrides = {**record["overrides"], **self.overrides}
            record.update(data=self.data, overrides=self.overrides)
        else:
            stages = list(self.preset.stage_names)
            record = {"system": self.system.name, "preset": self.preset.name, "data": self.data}
            record.update(overrides=self.overrides, stages=stages, completed={})
        if self.context.is_main:
            ensure_writable_dir(self.run_dir, "out")
            _write_json(self.run_dir / RUN_FILE, record)
        return record

    def _recorded_data(self) -> str | None:
        """The data path the run being resumed trained on (from its run file or latest checkpoint)."""
        if not self.resume:
            return None
        record = read_run_file(self.run_dir) if self.preset.multi_stage else None
        if record is not None:
            return record.get("data")
        for stage in self.preset.stages:
            checkpoint = latest_checkpoint(stage_dir(self.run_dir, self.preset, stage.name) / CHECKPOINTS_DIR)
            if checkpoint is not None:
                return read_run_config(checkpoint).get("data")
        return None

    def _inputs(self, stage: Stage) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """The trained models ``stage`` needs, and where each came from."""
        inputs, paths = {}, {}
        for need in stage.needs:
            if self.init_from is not None:
                path = find_stage_checkpoint(self.init_from, need, only_need=len(stage.needs) == 1)
            elif need in self.completed:
                path = resolve_checkpoint(self.run_dir / self.completed[need])
            else:
                raise ValueError(
                    f"init_from: stage {stage.name!r} needs the trained {need!r} stage; train the whole preset, "
                    f"or give --init-from RUN (a run folder holding {need}/)"
                )
            inputs[need], paths[need] = load_trained(self.system, path, self.context.device), str(path.resolve())
        return inputs, paths

    def _stage(self, stage: Stage, budget_s: float | None) -> StageResult:
        folder = stage_dir(self.run_dir, self.preset, stage.name)
        inputs, input_paths = self._inputs(stage)
        device = self.context.device
        if stage.name in self.completed and self.resume and self.only_stage is None:
            checkpoint = resolve_checkpoint(self.run_dir / self.completed[stage.name])
            model = load_trained(self.system, checkpoint, device)
            task = make_task(self.system, self.preset, stage, checkpoint_settings(checkpoint), self.data, inputs)
            return StageResult(stage=stage, task=task, model=model, run_dir=folder, result=None)

        latest = latest_checkpoint(folder / CHECKPOINTS_DIR) if self.resume else None
        settings = checkpoint_settings(latest) if latest is not None else stage.settings
        settings = apply_overrides(settings, self.overrides)
        if budget_s is not None:
            settings = replace(settings, time_budget_s=budget_s)
        task = make_task(self.system, self.preset, stage, settings, self.data, inputs)
        run_config = {"system": self.system.name, "preset": self.preset.name, "stage": stage.name}
        run_config.update(data=self.data, inputs=input_paths, label=self.label)
        trainer = Trainer(
            task,
            run_dir=folder,
            resume=latest is not None,
            device=self.options.device,
            run_config=run_config,
            parallel=self.options.parallel,
            precision=self.options.precision,
            compile=self.options.compile,
            live_progress=self.options.live_progress,
            stop_signals=self.signals,
        )
        result = trainer.fit()
        if is_sharded_checkpoint(result.checkpoint):  # the sharded model is gone with the process group
            model = load_trained(self.system, result.checkpoint, device)
        else:
            model = trainer.eval_model.eval()
        if self.context.is_main:
            _write_json(folder / SUMMARY_FILE, _stage_summary(self.system, self.preset, stage, result, trainer))
        return StageResult(stage=stage, task=task, model=model, run_dir=folder, result=result)


def make_task(system, preset, stage, settings, data, inputs, model: nn.Module | None = None) -> Task:
    """``system.make_task`` for one stage, seeded so that one seed reproduces the initial weights."""
    torch.manual_seed(settings.seed)
    request = TaskRequest(preset=preset, stage=stage, settings=settings, data=data, inputs=inputs, model=model)
    task = system.make_task(request)
    if not isinstance(task, Task):
        raise TypeError(f"make_task: {system.name} returned {type(task).__name__}, not a Task")
    return task


def _stage_summary(system, preset, stage, result: TrainResult, trainer: Trainer) -> dict[str, Any]:
    return {
        "system": system.name,
        "preset": preset.name,
        "stage": stage.name,
        "step": result.step,
        "seconds": result.seconds,
        "train_metrics": result.train_metrics,
        "eval_metrics": result.eval_metrics,
        "stopped_early": result.stopped_early,
        "mfu": result.train_metrics.get("mfu"),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "device": str(trainer.device),
        "world_size": trainer.context.world_size,
    }


def _read_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / SUMMARY_FILE
    try:
        return read_json(path, CheckpointError) if path.is_file() else None
    except CheckpointError:
        return None  # a summary is a report, not state: a damaged one is left out


def resolve_run_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint, a stage's run folder, or a multi-stage run folder (its
    last stage that has a checkpoint)."""
    path = Path(path)
    record = read_run_file(path) if path.is_dir() else None
    if record is not None:
        for stage in reversed(record["stages"]):
            found = latest_checkpoint(path / str(stage) / CHECKPOINTS_DIR)
            if found is not None:
                return found
        raise CheckpointError(f"{path}: no stage of this run has a checkpoint yet")
    return resolve_checkpoint(path)


def load_for_inference(
    system: System, checkpoint: str | Path, *, preset: str | None = None, device: str = "auto", ema: bool = True
) -> tuple[Task, nn.Module, dict[str, Any]]:
    """The task and trained model of a checkpoint, for ``quintet sample`` / ``eval`` / ``play``.

    The checkpoint's config tag picks the model class, the task is built around the loaded model (so a
    hourglass run's flat baseline samples like the hourglass), and the stage's needs are loaded from
    the run it belongs to. No training data is built (``make_task`` is lazy). Returns the task, the
    model (eval mode, on ``device``) and the checkpoint's run config.
    """
    resolved = resolve_device(device)
    checkpoint_dir = resolve_run_checkpoint(checkpoint)
    run_config = read_run_config(checkpoint_dir)
    check_owner(run_config, system, checkpoint_dir)
    model, checkpoint_dir, which = load_checkpoint_model(system, checkpoint_dir, ema=ema, map_location=resolved)
    model.eval()
    presets = system.presets()
    preset_name = preset or run_config.get("preset") or DEMO_PRESET
    if preset_name not in presets:
        raise ValueError(f"preset: {system.name} has no preset {preset_name!r}; available: {', '.join(presets)}")
    chosen = presets[preset_name]
    stage = chosen.stage(run_config["stage"]) if "stage" in run_config else chosen.stages[0]
    stage = replace(stage, model_config=model.config)
    settings = checkpoint_settings(checkpoint_dir) if "settings" in run_config else stage.settings
    inputs = {}
    recorded = run_config.get("inputs") or {}
    run_root = checkpoint_dir.parents[2] if len(checkpoint_dir.parents) > 2 else None
    for need in stage.needs:
        if isinstance(recorded.get(need), str) and Path(recorded[need]).is_dir():
            path = Path(recorded[need])
        elif run_root is not None and (run_root / need).is_dir():
            path = resolve_checkpoint(run_root / need)
        else:
            raise CheckpointError(
                f"{checkpoint_dir}: stage {stage.name!r} needs the trained {need!r} stage, which is neither where "
                f"the run recorded it ({recorded.get(need, 'not recorded')}) nor beside it"
            )
        inputs[need] = load_trained(system, path, resolved)
    task = make_task(system, chosen, stage, settings, run_config.get("data"), inputs, model=model)
    print(f"loaded {which} weights of {checkpoint_dir} (step {run_config.get('step', '?')})", file=sys.stderr)
    return task, model, run_config
