"""Run a preset's stages in order, each with its own Trainer, folder, checkpoints and metrics.

``quintet train`` and ``quintet demo`` both train through :func:`train_preset`. A one-stage preset
keeps the flat layout (``RUN/checkpoints``, ``RUN/metrics.jsonl``, ``RUN/summary.json``); a multi-stage
one gets a folder per stage (``RUN/tokenizer/checkpoints``, ``RUN/prior/...``) and ``RUN/run.json``,
which records the run (system, preset, data, the user's setting overrides) and every finished stage.

A stage receives the trained models of ``stage.needs`` loaded from their latest checkpoints (the
EMA weights when the run kept them), so a stage trains the same whether the stages before it ran in
this process, in an earlier one (``--resume``) or in another run (``--init-from``). Resuming skips the
finished stages and continues the one that was running from its latest checkpoint.
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
from quintet.core.io import atomic_write_text, ensure_writable_dir
from quintet.training.checkpoint import (
    CHECKPOINTS_DIR,
    latest_checkpoint,
    load_checkpoint_model,
    read_run_config,
    resolve_checkpoint,
)
from quintet.training.distributed import resolve_device, setup_distributed, teardown_distributed
from quintet.training.task import Task, TrainSettings
from quintet.training.trainer import Trainer, TrainResult

if TYPE_CHECKING:
    from quintet.registry import Preset, Stage, System

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
UNFINISHED = ("interrupted",)
"""a stage that stopped for one of these reasons is not finished: the next stages wait for a resume"""


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
    """the trained weights (the EMA when the run kept one), in eval mode"""
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
    stopped: str | None = None
    """why the run ended before its last stage finished ("interrupted"), else None"""

    @property
    def last(self) -> StageResult:
        return list(self.stages.values())[-1]


def stage_dir(run_dir: Path, preset: Preset, stage: str) -> Path:
    return Path(run_dir) / stage if preset.multi_stage else Path(run_dir)


def apply_overrides(settings: TrainSettings, overrides: dict[str, Any]) -> TrainSettings:
    known = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"overrides: {unknown} are not TrainSettings fields")
    return replace(settings, **overrides)


def checkpoint_settings(checkpoint: Path) -> TrainSettings:
    """The settings a checkpoint's stage trained with."""
    run_config = read_run_config(checkpoint)
    return config_from_dict(TrainSettings, run_config["settings"], source=f"{checkpoint}/run_config.json")


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
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("completed"), dict):
        raise CheckpointError(f"{path}: not a quintet run file")
    return data


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
    stage are not charged).
    """
    run_dir = Path(run_dir)
    overrides = dict(overrides or {})
    context = setup_distributed(options.device)  # one process group for every stage of the run
    try:
        return _train_stages(
            system, preset, run_dir, context, data, overrides, resume, only_stage, init_from, budget_s, label, options
        )
    finally:
        teardown_distributed(context)


def _train_stages(
    system, preset, run_dir, context, data, overrides, resume, only_stage, init_from, budget_s, label, options
):
    started = time.perf_counter()
    device = resolve_device(options.device, local_rank=context.local_rank)
    record = None
    if preset.multi_stage:
        # a resumed run, or one stage trained alone, keeps what the run file says was finished before
        record = read_run_file(run_dir) if (resume or only_stage is not None) else None
        if record is not None and (record.get("system"), record.get("preset")) != (system.name, preset.name):
            raise CheckpointError(
                f"{run_dir / RUN_FILE}: is a run of {record.get('system')}/{record.get('preset')}, "
                f"not {system.name}/{preset.name}"
            )
        if record is None:
            record = {
                "system": system.name,
                "preset": preset.name,
                "data": data,
                "overrides": overrides,
                "stages": list(preset.stage_names),
                "completed": {},
            }
        else:
            data = data if data is not None else record.get("data")
            overrides = {**record.get("overrides", {}), **overrides}
            record.update(data=data, overrides=overrides)
        if context.is_main:
            ensure_writable_dir(run_dir, "out")
            _write_json(run_dir / RUN_FILE, record)
    to_run = [preset.stage(only_stage)] if only_stage is not None else list(preset.stages)
    completed: dict[str, str] = dict(record["completed"]) if record is not None else {}
    if (
        resume
        and not (set(completed) & {s.name for s in to_run})
        and not any(latest_checkpoint(stage_dir(run_dir, preset, s.name) / CHECKPOINTS_DIR) for s in to_run)
    ):
        raise ValueError(f"resume: {run_dir} holds no checkpoint to resume from")

    results: dict[str, StageResult] = {}
    remaining_budget = budget_s
    for position, stage in enumerate(to_run):
        folder = stage_dir(run_dir, preset, stage.name)
        inputs, input_paths = {}, {}
        for need in stage.needs:
            if init_from is not None:
                path = find_stage_checkpoint(Path(init_from), need, only_need=len(stage.needs) == 1)
            elif need in completed:
                path = resolve_checkpoint(run_dir / completed[need])
            else:
                raise ValueError(
                    f"init_from: stage {stage.name!r} needs the trained {need!r} stage; train the whole preset, "
                    f"or give --init-from RUN (a run folder holding {need}/)"
                )
            inputs[need], input_paths[need] = load_trained(system, path, device), str(path.resolve())

        if stage.name in completed and resume and only_stage is None:
            checkpoint = resolve_checkpoint(run_dir / completed[stage.name])
            settings = checkpoint_settings(checkpoint)
            task = _make_task(system, preset, stage, settings, data, inputs)
            model = load_trained(system, checkpoint, device)
            results[stage.name] = StageResult(stage=stage, task=task, model=model, run_dir=folder, result=None)
            continue

        latest = latest_checkpoint(folder / CHECKPOINTS_DIR) if resume else None
        settings = checkpoint_settings(latest) if latest is not None else stage.settings
        settings = apply_overrides(settings, overrides)
        if remaining_budget is not None:
            shares = [s.budget_share for s in to_run[position:]]
            settings = replace(settings, time_budget_s=max(1.0, remaining_budget * shares[0] / sum(shares)))
        task = _make_task(system, preset, stage, settings, data, inputs)
        run_config = {
            "system": system.name,
            "preset": preset.name,
            "stage": stage.name,
            "data": data,
            "inputs": input_paths,
        }
        if label is not None:
            run_config["label"] = label
        trainer = Trainer(
            task,
            run_dir=folder,
            resume=latest is not None,
            device=options.device,
            run_config=run_config,
            parallel=options.parallel,
            precision=options.precision,
            compile=options.compile,
            live_progress=options.live_progress,
        )
        result = trainer.fit()
        if remaining_budget is not None:
            remaining_budget = max(0.0, remaining_budget - result.seconds)
        model = trainer.eval_model
        model.eval()
        results[stage.name] = StageResult(stage=stage, task=task, model=model, run_dir=folder, result=result)
        if context.is_main:
            _write_json(folder / SUMMARY_FILE, _stage_summary(system, preset, stage, result, trainer))
        if result.stopped_early in UNFINISHED:
            return RunResult(
                label=label or preset.name,
                preset=preset,
                run_dir=run_dir,
                seconds=time.perf_counter() - started,
                stages=results,
                stopped=result.stopped_early,
            )
        if record is not None:
            # relative to the run folder, so a run moved elsewhere still resumes
            completed[stage.name] = os.path.relpath(result.checkpoint, run_dir)
            record["completed"] = completed
            if context.is_main:
                _write_json(run_dir / RUN_FILE, record)
    if preset.multi_stage and context.is_main and only_stage is None:
        summaries = {name: _read_summary(r.run_dir) for name, r in results.items()}
        _write_json(run_dir / SUMMARY_FILE, {"system": system.name, "preset": preset.name, "stages": summaries})
    return RunResult(
        label=label or preset.name,
        preset=preset,
        run_dir=run_dir,
        seconds=time.perf_counter() - started,
        stages=results,
    )


def _make_task(system, preset, stage, settings, data, inputs) -> Task:
    from quintet.registry import TaskRequest

    torch.manual_seed(settings.seed)  # the initial weights: one seed reproduces the whole run
    task = system.make_task(TaskRequest(preset=preset, stage=stage, settings=settings, data=data, inputs=inputs))
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
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def resolve_run_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint, a stage's run folder, or a multi-stage run folder (its
    last stage that has a checkpoint)."""
    path = Path(path)
    record = read_run_file(path) if path.is_dir() else None
    if record is not None:
        for stage in reversed(record.get("stages", [])):
            found = latest_checkpoint(path / stage / CHECKPOINTS_DIR)
            if found is not None:
                return found
        raise CheckpointError(f"{path}: no stage of this run has a checkpoint yet")
    return resolve_checkpoint(path)


def load_for_inference(
    system: System, checkpoint: str | Path, *, preset: str | None = None, device: str = "auto", ema: bool = True
) -> tuple[Task, nn.Module, dict[str, Any]]:
    """The task and trained model of a checkpoint, for ``quintet sample`` / ``eval`` / ``play``.

    The checkpoint's config tag picks the model class, the task is rebuilt around that config (so a
    hourglass run's flat baseline samples like the hourglass), and the stage's needs are loaded from
    the run it belongs to. No training data is built (``make_task`` is lazy). Returns the task, the
    model (eval mode, on ``device``) and the checkpoint's run config.
    """
    from quintet.registry import DEMO_PRESET

    resolved = resolve_device(device)
    checkpoint_dir = resolve_run_checkpoint(checkpoint)
    run_config = read_run_config(checkpoint_dir)
    owner = run_config.get("system")
    if owner is not None and owner != system.name:
        raise CheckpointError(f"{checkpoint_dir}: is a checkpoint of system {owner!r}, not {system.name!r}")
    model, checkpoint_dir, which = load_checkpoint_model(system, checkpoint_dir, ema=ema, map_location=resolved)
    presets = system.presets()
    preset_name = preset or run_config.get("preset") or DEMO_PRESET
    if preset_name not in presets:
        raise ValueError(f"preset: {system.name} has no preset {preset_name!r}; available: {', '.join(presets)}")
    chosen = presets[preset_name]
    stage = chosen.stage(run_config["stage"]) if "stage" in run_config else chosen.stages[0]
    stage = replace(stage, model_config=model.config)
    settings = checkpoint_settings(checkpoint_dir) if "settings" in run_config else stage.settings
    inputs = {}
    recorded = run_config.get("inputs", {})
    run_root = checkpoint_dir.parents[2] if len(checkpoint_dir.parents) > 2 else None
    for need in stage.needs:
        if need in recorded and Path(recorded[need]).is_dir():
            path = Path(recorded[need])
        elif run_root is not None and (run_root / need).is_dir():
            path = resolve_checkpoint(run_root / need)
        else:
            raise CheckpointError(
                f"{checkpoint_dir}: stage {stage.name!r} needs the trained {need!r} stage, which is neither where "
                f"the run recorded it ({recorded.get(need, 'not recorded')}) nor beside it"
            )
        inputs[need] = load_trained(system, path, resolved)
    task = _make_task(system, chosen, stage, settings, run_config.get("data"), inputs)
    print(f"loaded {which} weights of {checkpoint_dir} (step {run_config.get('step', '?')})", file=sys.stderr)
    return task, model.to(resolved).eval(), run_config
