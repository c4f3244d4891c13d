"""The ``quintet`` command: train, sample, eval, play, export, record, list, bench, demo.

Flags come from dataclasses (tyro), ``--help`` from their field docstrings. ``quintet train``'s
optimisation flags are :class:`~quintet.training.task.TrainSettings` itself, with the chosen preset's
values (or, with ``--resume``, the checkpoint's) as defaults. Every error is one line on stderr and a
non-zero exit (2: bad input, 1: training diverged); set QUINTET_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro

from quintet.training.task import TrainSettings

SYSTEM = tyro.conf.arg(metavar="SYSTEM")
DEFAULT_PRESET = "demo"


class UsageError(ValueError):
    """A command line tyro could not parse (already condensed to one line)."""


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------- train


@dataclass(kw_only=True)
class TrainCommand:
    """Train a system's preset (every stage in turn). The run folder gets checkpoints/, metrics.jsonl,
    loss_curve.png and summary.json (a multi-stage preset: one such folder per stage, and run.json)."""

    system: Annotated[tyro.conf.Positional[str], SYSTEM]
    """the system to train (see `quintet list`)"""
    preset: str | None = None
    """preset name (unset: demo, or the checkpoint's preset when resuming)"""
    out: Path | None = None
    """run folder (unset: runs/SYSTEM-PRESET)"""
    resume: bool = False
    """continue from the run folder's latest checkpoint (inside whichever stage was running)"""
    auto_resume: bool = False
    """resume when the run folder holds a checkpoint, else start fresh (one command for a job's first
    launch and its requeues)"""
    stage: str | None = None
    """train this stage of a multi-stage preset alone (its settings become the flags' defaults)"""
    init_from: Path | None = None
    """with --stage: a run folder holding the trained stages the chosen stage needs"""
    device: str = "auto"
    """auto (the GPU if there is one), cpu, cuda or cuda:N"""
    data: str | None = None
    """train on this file or folder instead of the preset's embedded data (systems that support it)"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """how several processes (torchrun) share the model: replicated (ddp) or sharded (fsdp)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, float32 elsewhere"""
    compile: bool = False
    """torch.compile the model"""
    settings: Annotated[TrainSettings, tyro.conf.arg(name=""), tyro.conf.OmitArgPrefixes] = field(
        default_factory=TrainSettings
    )
    """the optimisation settings; flags you set apply to every stage the command trains"""
    typed: Annotated[tuple[str, ...], tyro.conf.Suppress] = ()
    """the settings flags given on the command line (set by the parser): they override every stage"""

    def run(self) -> int:
        from quintet.core.io import ensure_writable_dir
        from quintet.registry import get_preset, get_system
        from quintet.training.pipeline import TrainerOptions, has_checkpoint, train_preset

        system = get_system(self.system)
        preset_name = self.preset or DEFAULT_PRESET
        preset = get_preset(system.name, preset_name)
        if self.init_from is not None and self.stage is None:
            raise ValueError("init_from: only with --stage (the stage trained alone takes its needs from there)")
        if self.stage is not None and not preset.multi_stage:
            raise ValueError(f"stage: {system.name} preset {preset_name!r} has a single stage; drop --stage")
        out = self.out or Path("runs") / f"{system.name}-{preset_name}"
        if _is_main_process():
            ensure_writable_dir(out, "out")
        resume = self.resume or (self.auto_resume and has_checkpoint(out, preset))
        overrides = {name: getattr(self.settings, name) for name in self.typed}
        result = train_preset(
            system,
            preset,
            run_dir=out,
            data=self.data,
            overrides=overrides,
            resume=resume,
            only_stage=self.stage,
            init_from=self.init_from,
            options=TrainerOptions(
                device=self.device, parallel=self.parallel, precision=self.precision, compile=self.compile
            ),
        )
        if not _is_main_process():
            return 0
        for name, stage in result.stages.items():
            if stage.result is None:
                continue
            trained = stage.result
            metrics = {"loss": trained.train_metrics["loss"]} if "loss" in trained.train_metrics else {}
            metrics.update(trained.eval_metrics)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            prefix = f"{name}: " if preset.multi_stage else ""
            print(
                f"done: {prefix}step {trained.step} in {trained.seconds:.1f} s; {shown}; "
                f"wrote {stage.run_dir / 'summary.json'}"
            )
        if result.stopped_by:
            launcher = "torchrun ... -m quintet" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "quintet"
            print(f"stopped by {result.stopped_by}: resume with `{launcher} train {system.name} --out {out} --resume`")
            return 128 + signal.Signals[result.stopped_by].value  # the shell's code for "ended by this signal"
        return 0


def _stage_defaults(command: TrainCommand) -> tuple[str, TrainSettings]:
    """The preset name and the settings the flags default to: the stage's (or, resuming, its checkpoint's)."""
    from quintet.registry import get_preset, get_system
    from quintet.training.checkpoint import CHECKPOINTS_DIR, latest_checkpoint, read_run_config
    from quintet.training.pipeline import (
        apply_overrides,
        check_owner,
        checkpoint_settings,
        has_checkpoint,
        read_run_file,
    )

    system = get_system(command.system)
    preset_name = command.preset or DEFAULT_PRESET
    out = command.out or Path("runs") / f"{system.name}-{preset_name}"
    preset = get_preset(system.name, preset_name)
    if not (command.resume or (command.auto_resume and has_checkpoint(out, preset))):
        return preset_name, (preset.stage(command.stage) if command.stage else preset.stages[0]).settings
    record = read_run_file(out) if out.is_dir() else None
    if record is not None:  # a multi-stage run: the stage to continue is the first one not finished
        check_owner(record, system, out / "run.json")
        preset_name = command.preset or record["preset"]
        preset = get_preset(system.name, preset_name)
        pending = [s for s in preset.stages if s.name not in record["completed"]] or [preset.stages[-1]]
        stage = preset.stage(command.stage) if command.stage else pending[0]
        checkpoint = latest_checkpoint(out / stage.name / CHECKPOINTS_DIR)
        if checkpoint is not None:
            return preset_name, checkpoint_settings(checkpoint)
        return preset_name, apply_overrides(stage.settings, record.get("overrides", {}))
    checkpoint = latest_checkpoint(out / CHECKPOINTS_DIR)
    if checkpoint is None:
        raise ValueError(f"resume: {out} holds no checkpoint to resume from")
    run_config = read_run_config(checkpoint)
    check_owner(run_config, system, checkpoint)
    preset_name = command.preset or run_config.get("preset", DEFAULT_PRESET)
    get_preset(system.name, preset_name)
    return preset_name, checkpoint_settings(checkpoint)


def _train_defaults(command: TrainCommand) -> TrainCommand:
    """``command`` with the preset's (or, resuming, the checkpoint's) settings as defaults."""
    preset_name, settings = _stage_defaults(command)
    return dataclasses.replace(command, preset=preset_name, settings=settings)


# ---------------------------------------------------------------------------------------------- sample / eval / play


@dataclass(kw_only=True)
class _CheckpointCommand:
    system: Annotated[tyro.conf.Positional[str], SYSTEM]
    """the system the checkpoint belongs to"""
    checkpoint: Path
    """a run folder (its last stage's latest checkpoint), a stage's folder, or a checkpoint folder"""
    preset: str | None = None
    """the preset whose sampler / evaluation to use (unset: the checkpoint's)"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    ema: bool = True
    """use the EMA weights when the checkpoint has them"""

    def load(self):
        from quintet.registry import get_system
        from quintet.training.pipeline import load_for_inference

        system = get_system(self.system)
        task, model, _ = load_for_inference(
            system, self.checkpoint, preset=self.preset, device=self.device, ema=self.ema
        )
        return task, model


@dataclass(kw_only=True)
class SampleCommand(_CheckpointCommand):
    """Sample from a trained checkpoint (text is printed, image paths are listed)."""

    seed: int = 0
    """seeds the sampler's random state"""

    def run(self) -> int:
        task, model = self.load()
        if task.sample is None:
            raise ValueError(f"system: {self.system} has no sampler")
        torch.manual_seed(self.seed)
        with torch.no_grad():
            samples = task.sample(model)
        for key, value in samples.items():
            if key == "images":
                for path in value:
                    print(f"image: {path}")
            elif isinstance(value, str):
                print(value if key == "text" else f"{key}: {value}")
            else:
                print(f"{key}: {json.dumps(value, default=str)}")
        return 0


@dataclass(kw_only=True)
class EvalCommand(_CheckpointCommand):
    """Evaluate a trained checkpoint; prints the metrics as one JSON object."""

    def run(self) -> int:
        task, model = self.load()
        if task.evaluate is None:
            raise ValueError(f"system: {self.system} has no evaluation")
        with torch.no_grad():
            metrics = {key: float(value) for key, value in task.evaluate(model).items()}
        print(json.dumps(metrics))
        return 0


@dataclass(kw_only=True)
class ExportCommand:
    """Write a checkpoint's weights (whole or FSDP-sharded) as one save_pretrained folder."""

    system: Annotated[tyro.conf.Positional[str], SYSTEM]
    """the system the checkpoint belongs to"""
    checkpoint: Path
    """a run folder (its last stage's latest checkpoint), a stage's folder, or a checkpoint folder"""
    out: Path
    """the folder to write (config.json + model.safetensors; load it with the model's from_pretrained)"""
    ema: bool = True
    """export the EMA weights when the checkpoint has them"""

    def run(self) -> int:
        from quintet.registry import get_system
        from quintet.training.checkpoint import load_checkpoint_model, read_run_config
        from quintet.training.pipeline import check_owner, resolve_run_checkpoint

        system = get_system(self.system)
        checkpoint = resolve_run_checkpoint(self.checkpoint)
        check_owner(read_run_config(checkpoint), system, checkpoint)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out: {self.out} exists and is not a folder")
        model, checkpoint, which = load_checkpoint_model(system, checkpoint, ema=self.ema)
        model.save_pretrained(self.out)
        print(f"wrote the {which} weights of {checkpoint} ({type(model).__name__}) to {self.out}")
        return 0


@dataclass(kw_only=True)
class PlayCommand(_CheckpointCommand):
    """Play a trained model (e.g. act inside a world model): a window, or --headless into a file."""

    headless: bool = False
    """no window: run --actions and write the rollout to --out"""
    actions: str | None = None
    """comma-separated actions for a headless rollout, e.g. 1,1,3,0"""
    out: Path | None = None
    """where a headless rollout is written (e.g. play.gif)"""
    fps: float = 10.0
    """frames per second shown or written"""
    steps: int = 0
    """steps to play (0: as many as --actions, or until the window closes)"""
    seed: int = 0
    """seeds the model's sampling"""

    def run(self) -> int:
        from quintet.training.task import PlayOptions

        actions = None
        if self.actions is not None:
            try:
                actions = tuple(int(a) for a in self.actions.split(",") if a.strip())
            except ValueError:
                raise ValueError(f"actions: expected comma-separated integers, got {self.actions!r}") from None
        if self.headless and (not actions and not self.steps):
            raise ValueError("actions: a headless rollout needs --actions (or --steps)")
        if self.headless and self.out is None:
            raise ValueError("out: a headless rollout is written to a file; give --out (e.g. play.gif)")
        if not self.fps > 0:
            raise ValueError(f"fps: expected a number > 0, got {self.fps}")
        if self.steps < 0:
            raise ValueError(f"steps: expected an integer >= 0, got {self.steps}")
        options = PlayOptions(
            headless=self.headless, actions=actions, out=self.out, fps=self.fps, steps=self.steps, seed=self.seed
        )
        task, model = self.load()
        if task.play is None:
            raise ValueError(f"system: {self.system} has nothing to play")
        torch.manual_seed(self.seed)
        with torch.no_grad():
            written = task.play(model, options)
        for key, value in (written or {}).items():
            print(f"{key}: {value}")
        return 0


@dataclass(kw_only=True)
class RecordCommand:
    """Play a gymnasium environment and record its frames, actions and episode boundaries as an episode
    store (memory-mapped; what a world model trains on, e.g. `quintet train genie --data DIR`)."""

    env: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="ENV")]
    """a gymnasium env id, e.g. ALE/Breakout-v5 (Atari ROMs ship with ale-py) or CartPole-v1"""
    out: Path
    """the store's folder"""
    episodes: int = 20
    """episodes to record"""
    size: int = 64
    """frames are resized to size x size RGB"""
    max_steps: int | None = None
    """cut an episode after this many steps (unset: the env's own limit)"""
    envs: int = 1
    """environments stepped side by side"""
    seed: int = 0
    """env seeds start here; seeds the random policy too"""

    def run(self) -> int:
        from quintet.core.validation import check_int
        from quintet.data import record

        check_int(self.episodes, "episodes", minimum=1)
        check_int(self.size, "size", minimum=8)
        check_int(self.envs, "envs", minimum=1)
        if self.max_steps is not None:
            check_int(self.max_steps, "max_steps", minimum=1)
        try:
            store = record(
                self.env,
                self.out,
                self.episodes,
                size=self.size,
                seed=self.seed,
                max_steps=self.max_steps,
                num_envs=self.envs,
            )
        except Exception as error:
            if type(error).__module__.startswith("gymnasium"):  # an unknown id, a missing extra, ...
                raise ValueError(f"env: {self.env}: {error}") from error
            raise
        print(f"recorded {store.num_episodes} episodes ({len(store)} steps) of {self.env} into {self.out}")
        return 0


# ---------------------------------------------------------------------------------------------- list / bench / demo


@dataclass(kw_only=True)
class ListCommand:
    """List the systems and their presets (data and expected training minutes)."""

    def run(self) -> int:
        from quintet.registry import systems

        registered = systems()
        if not registered:
            print("no systems are registered yet")
            return 0
        rows = [("system", "preset", "minutes", "data", "description")]
        for system in registered.values():
            for preset in system.presets().values():
                minutes = f"{preset.expected_minutes:g}"
                stages = f" [stages: {', '.join(preset.stage_names)}]" if preset.multi_stage else ""
                rows.append((system.name, preset.name, minutes, preset.data, preset.description + stages))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        return 0


@dataclass(kw_only=True)
class BenchCommand:
    """Run benchmark suites (quintet/benchmarks/bench_NAME.py); JSON goes to --out, a table to the console."""

    suites: tyro.conf.Positional[tuple[str, ...]] = ()
    """suites to run (default: all)"""
    quick: bool = False
    """smaller sizes, for a smoke run"""
    out: Path = Path("bench-results")
    """folder for the JSON results"""

    def run(self) -> int:
        from quintet.bench import run_suites

        run_suites(self.suites, quick=self.quick, out_dir=self.out)
        return 0


@dataclass(kw_only=True)
class DemoCommand:
    """Train every landed system's demo preset for a fixed time; write report.html and summary.json."""

    out: Path = Path("runs/demo")
    """folder for the report, the summary and each system's run"""
    quick: bool = False
    """a shorter demo (about 5 minutes with all systems, instead of 20)"""
    systems: str | None = None
    """comma-separated systems to include (unset: all registered)"""
    budget_s: float | None = None
    """training seconds per unit of a system's demo share (unset: 115, or 22 with --quick)"""

    def run(self) -> int:
        from quintet.training.demo import run_demo

        names = None
        if self.systems is not None:
            names = [name.strip() for name in self.systems.split(",") if name.strip()]
            if not names:
                raise ValueError("systems: expected a comma-separated list of system names")
        summary = run_demo(self.out, quick=self.quick, systems=names, budget_s=self.budget_s)
        failed = [name for name, result in summary["systems"].items() if result["status"] != "ok"]
        if failed:
            print(f"error: the demo of {', '.join(failed)} failed (see {summary['report']})", file=sys.stderr)
            return 1
        return 0


COMMANDS: dict[str, type] = {
    "train": TrainCommand,
    "sample": SampleCommand,
    "eval": EvalCommand,
    "play": PlayCommand,
    "export": ExportCommand,
    "record": RecordCommand,
    "list": ListCommand,
    "bench": BenchCommand,
    "demo": DemoCommand,
}


# ---------------------------------------------------------------------------------------------- parsing


def _condense(text: str) -> str:
    """tyro's boxed error message as one line."""
    lines = [re.sub(r"[│╭╮╰╯]", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    separator = re.compile(r"^[-─━]{3,}$")
    title = ""
    block: list[str] = []
    seen_separator = False
    for line in lines:
        if separator.match(line):
            if seen_separator:
                break
            seen_separator = True
        elif not title:
            title = line.strip("─- ")
        elif seen_separator:
            block.append(line)
    message = " ".join(block) or title or "invalid command line"
    if title and not message.startswith(title):
        message = f"{title.lower()}: {message}"
    return f"{message} (see quintet --help)"


def _wants_help(args: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in args)


def _tyro(parse: Any, args: Sequence[str]) -> Any:
    """Run a tyro parse; a parse error becomes a one-line :class:`UsageError` (help prints as usual)."""
    if _wants_help(args):
        return parse(list(args))
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            return parse(list(args))
    except SystemExit as exit_:
        if exit_.code in (0, None):
            sys.stdout.write(captured.getvalue())
            raise
        raise UsageError(_condense(captured.getvalue())) from None


def parse_command(argv: Sequence[str]) -> Any:
    def parse_top(args):
        return tyro.extras.subcommand_cli_from_dict(
            COMMANDS, prog="quintet", description="quintet: five transformer systems on one core.", args=args
        )

    def parse_train(default: TrainCommand):
        return lambda args: tyro.cli(TrainCommand, prog="quintet train", args=args, default=default)

    argv = list(argv)
    if argv[:1] == ["train"] and _wants_help(argv):
        # show the chosen preset's values as defaults when the system can be read from the line
        without_help = [arg for arg in argv if arg not in ("-h", "--help")]
        try:
            command = _tyro(parse_top, without_help)
            default = _train_defaults(command)
        except (UsageError, ValueError):
            return parse_top(argv)
        return parse_train(default)(argv[1:])
    command = _tyro(parse_top, argv)
    if isinstance(command, TrainCommand):
        command = _tyro(parse_train(_train_defaults(command)), argv[1:])
        command = dataclasses.replace(command, typed=_typed_settings(argv[1:]))
    return command


def _typed_settings(args: Sequence[str]) -> tuple[str, ...]:
    """The ``TrainSettings`` fields whose flags appear on the command line (``--batch-size 8``,
    ``--batch-size=8``): those override every stage, whatever value they give."""
    flags = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
    return tuple(f.name for f in dataclasses.fields(TrainSettings) if "--" + f.name.replace("_", "-") in flags)


def _one_line(error: BaseException) -> str:
    text = " ".join(part.strip() for part in str(error).strip().splitlines() if part.strip())
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from quintet.training.trainer import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("QUINTET_DEBUG"))
    try:
        command = parse_command(argv)
        return command.run()
    except NonFiniteLossError as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
