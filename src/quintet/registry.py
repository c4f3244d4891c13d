"""Every system's named presets and hooks, in one place.

A system is a :class:`System` subclass found through the ``quintet.systems`` entry-point group
(``pyproject.toml``), so a third-party package registers one the same way. Its presets are
:class:`Preset` objects: one or several :class:`Stage` s trained in order (a tokenizer, then a prior),
each with its own model config and optimisation settings, plus the system's own typed settings in
``Preset.recipe``. ``tests/test_registry.py`` runs every stage of every preset of every registered
system through the very loss training uses, save/load and cached-vs-uncached generation, so a
system is covered the day it registers. ``quintet list`` / ``train`` / ``sample`` / ``demo`` read this.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from quintet.core.config import CheckpointError, PretrainedModel, config_class_tag
from quintet.core.validation import check_number
from quintet.training.task import ReportSection, Task, TrainSettings

if TYPE_CHECKING:
    from quintet.training.pipeline import RunResult

ENTRY_POINT_GROUP = "quintet.systems"
MAIN_STAGE = "train"
"""the name of the one stage of a single-stage preset (its run keeps the flat folder layout)"""
DEMO_PRESET = "demo"
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One training run of a preset: a model config, its optimisation settings, what it builds on."""

    name: str = MAIN_STAGE
    """the stage's sub-folder of a multi-stage run (``tokenizer``, ``prior``)"""
    model_config: Any
    """a frozen config dataclass; its class picks the model class among ``System.model_classes``"""
    settings: TrainSettings
    description: str = ""
    needs: tuple[str, ...] = ()
    """earlier stages whose trained models this stage receives (``TaskRequest.inputs``)"""
    budget_share: float = 1.0
    """this stage's relative share of a demo run's time budget"""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _STAGE_NAME.match(self.name):
            raise ValueError(f"name: a stage name is lower-case letters, digits, '-' and '_', got {self.name!r}")
        if not dataclasses.is_dataclass(self.model_config) or isinstance(self.model_config, type):
            raise TypeError(f"model_config: expected a config dataclass instance, got {self.model_config!r}")
        if not isinstance(self.settings, TrainSettings):
            raise TypeError(f"settings: expected TrainSettings, got {type(self.settings).__name__}")
        if not isinstance(self.needs, tuple) or not all(isinstance(n, str) for n in self.needs):
            raise TypeError(f"needs: expected a tuple of stage names, got {self.needs!r}")
        check_number(self.budget_share, "budget_share", low=0.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named way to train a system: its stages, its data and the system's own settings."""

    system: str
    name: str
    description: str
    """one line: what this preset is for"""
    data: str
    """what it trains on (embedded corpus, environment, user-supplied file)"""
    expected_minutes: float
    """expected training time on the machine it targets (2 CPU cores unless it says GPU)"""
    stages: tuple[Stage, ...]
    recipe: Any = None
    """the system's own settings for this preset (a frozen dataclass: data, evaluation, sampling, ...)"""

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple) or not self.stages or not all(isinstance(s, Stage) for s in self.stages):
            raise TypeError(f"stages: expected a non-empty tuple of Stage, got {self.stages!r}")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: stage names must be unique, got {names}")
        for index, stage in enumerate(self.stages):
            unknown = [need for need in stage.needs if need not in names[:index]]
            if unknown:
                raise ValueError(f"stages: stage {stage.name!r} needs {unknown}, which are not earlier stages")
        if self.recipe is not None and (not dataclasses.is_dataclass(self.recipe) or isinstance(self.recipe, type)):
            raise TypeError(f"recipe: expected a settings dataclass instance or None, got {self.recipe!r}")

    @property
    def multi_stage(self) -> bool:
        return len(self.stages) > 1

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"stage: {self.system} preset {self.name!r} has no stage {name!r}; stages: {self.stage_names}")

    def replace_stage(self, name: str, **changes: Any) -> Preset:
        """This preset with stage ``name``'s fields changed (``model_config=...``, ``settings=...``)."""
        self.stage(name)
        stages = tuple(replace(s, **changes) if s.name == name else s for s in self.stages)
        return replace(self, stages=stages)

    def with_settings(self, **changes: Any) -> Preset:
        """This preset with the same ``TrainSettings`` changes applied to every stage."""
        return replace(self, stages=tuple(replace(s, settings=replace(s.settings, **changes)) for s in self.stages))


@dataclass(frozen=True, kw_only=True)
class TaskRequest:
    """What :meth:`System.make_task` builds a task from."""

    preset: Preset
    stage: Stage
    """the stage to train (its ``model_config`` may come from a checkpoint being evaluated)"""
    settings: TrainSettings
    """the stage's settings with the user's overrides"""
    data: str | None = None
    """a user-supplied data path (``--data``); the system decides what it accepts"""
    inputs: Mapping[str, nn.Module] = field(default_factory=dict)
    """the trained models of ``stage.needs``, by stage name (eval mode, parameters frozen)"""

    @classmethod
    def for_stage(cls, preset: Preset, stage: str | Stage | None = None, **changes: Any) -> TaskRequest:
        """A request for ``stage`` (default: the first) of ``preset`` with its own settings."""
        stage = preset.stages[0] if stage is None else stage if isinstance(stage, Stage) else preset.stage(stage)
        return cls(preset=preset, stage=stage, settings=changes.pop("settings", stage.settings), **changes)


@dataclass(frozen=True, kw_only=True)
class DemoRun:
    """One training run of a system's demo section (all stages of ``preset``)."""

    label: str
    """the run's sub-folder of the system's demo folder, and its name in the report"""
    preset: Preset
    budget_share: float = 1.0
    """share of the system's demo time; the time an earlier run leaves unused passes on to later ones"""
    device: str = "auto"

    def __post_init__(self) -> None:
        if not _STAGE_NAME.match(self.label):
            raise ValueError(f"label: lower-case letters, digits, '-' and '_', got {self.label!r}")
        check_number(self.budget_share, "budget_share", low=0.0, low_open=True)


class System(ABC):
    """The hooks a system gives the registry, the Trainer, the CLI, the demo and the test suite."""

    name: ClassVar[str]
    description: ClassVar[str]
    model_classes: ClassVar[tuple[type[PretrainedModel], ...]]
    """every model class the system trains; a checkpoint's config tag picks one when loading"""
    demo_budget_share: ClassVar[float] = 1.0
    """this system's demo training time in units of the demo's per-system budget; the shares of all
    systems keep ``quintet demo`` within its 20 minutes"""
    metric_meanings: ClassVar[dict[str, str]] = {}
    """metric name -> one sentence saying what the number means (the demo report shows them)"""

    @abstractmethod
    def presets(self) -> dict[str, Preset]:
        """Named presets; every system has ``tiny`` (tests) and ``demo``."""

    def model_class(self, config: Any) -> type[PretrainedModel]:
        """The model class built from ``config`` (an instance, a config class, or a checkpoint's class tag)."""
        tag = config if isinstance(config, str) else (config if isinstance(config, type) else type(config)).__name__
        for model_class in self.model_classes:
            if model_class.config_class.__name__ == tag:
                return model_class
        known = ", ".join(c.config_class.__name__ for c in self.model_classes)
        raise ValueError(f"model_config: {self.name} builds no model from a {tag} (known: {known})")

    def build_model(self, stage: Stage) -> PretrainedModel:
        return self.model_class(stage.model_config)(stage.model_config)

    def load_model(self, folder: str | Path, *, map_location: str | torch.device = "cpu") -> PretrainedModel:
        """Load a ``save_pretrained`` folder of any of this system's model classes (picked by the config tag)."""
        tag = config_class_tag(Path(folder))
        try:
            model_class = self.model_class(tag)
        except ValueError as error:
            raise CheckpointError(f"{folder}: {error}") from None
        return model_class.from_pretrained(folder, map_location=map_location)

    @abstractmethod
    def example_batch(self, model: PretrainedModel, *, batch_size: int, generator: torch.Generator) -> Any:
        """A small random batch that ``model``'s task loss accepts (for tests and benchmarks)."""

    def generate(self, model: PretrainedModel, batch: Any, *, use_cache: bool) -> torch.Tensor | None:
        """Deterministic (greedy) generation from ``batch``; None for models that do not generate."""
        return None

    @abstractmethod
    def make_task(self, request: TaskRequest) -> Task:
        """Everything the Trainer needs to train ``request.stage``.

        Cheap: it builds the model and closures; training data is created lazily, when the first batch
        or evaluation asks for it, so ``quintet sample`` / ``eval`` build no training data.
        """

    def demo_runs(self, *, quick: bool) -> list[DemoRun]:
        """The runs of this system's demo section (default: the ``demo`` preset once)."""
        presets = self.presets()
        if DEMO_PRESET not in presets:
            raise ValueError(f"preset: {self.name} has no {DEMO_PRESET!r} preset; available: {', '.join(presets)}")
        return [DemoRun(label=DEMO_PRESET, preset=presets[DEMO_PRESET])]

    def demo_section(self, runs: list[RunResult], *, out_dir: Path, quick: bool) -> ReportSection:
        """The report's section from the trained demo runs (default: metrics, loss curves, samples)."""
        from quintet.training.report import default_section

        return default_section(self, runs)


_SYSTEMS: dict[str, System] = {}
_entry_points_loaded = False


def register(system: System) -> System:
    """Add ``system`` (entry points do this; tests and scripts may call it directly)."""
    if not isinstance(system, System):
        raise TypeError(f"system: expected a quintet.registry.System, got {type(system).__name__}")
    if system.name in _SYSTEMS and type(_SYSTEMS[system.name]) is not type(system):
        raise ValueError(f"system {system.name!r} is already registered")
    _SYSTEMS[system.name] = system
    return system


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if entry.name in _SYSTEMS:
            continue
        try:
            loaded = entry.load()
            system = loaded() if isinstance(loaded, type) else loaded
        except Exception as error:
            raise ValueError(
                f"system: the {ENTRY_POINT_GROUP} entry point {entry.name} = {entry.value} failed to "
                f"load ({type(error).__name__}: {error})"
            ) from error
        if not isinstance(system, System) or system.name != entry.name:
            raise ValueError(
                f"system: the {ENTRY_POINT_GROUP} entry point {entry.name} = {entry.value} must name a System "
                f"subclass whose name is {entry.name!r}"
            )
        register(system)


def systems() -> dict[str, System]:
    _load_entry_points()
    return dict(_SYSTEMS)


def get_system(name: str) -> System:
    available = systems()
    if name not in available:
        raise ValueError(f"system: unknown system {name!r}; available: {', '.join(sorted(available)) or 'none'}")
    return available[name]


def get_preset(system: str, preset: str) -> Preset:
    presets = get_system(system).presets()
    if preset not in presets:
        raise ValueError(f"preset: {system} has no preset {preset!r}; available: {', '.join(presets)}")
    return presets[preset]


def all_presets() -> list[Preset]:
    return [preset for system in systems().values() for preset in system.presets().values()]
