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

import importlib.metadata
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from quintet.core.config import CheckpointError, PretrainedModel, config_class_tag
from quintet.training.plan import DEMO_PRESET, MAIN_STAGE, DemoRun, Preset, Stage, TaskRequest
from quintet.training.task import ReportSection, Task

if TYPE_CHECKING:
    from quintet.training.pipeline import RunResult

ENTRY_POINT_GROUP = "quintet.systems"


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

    def task_model(self, request: TaskRequest) -> PretrainedModel:
        """The model a task is built around: ``request.model`` when given (a loaded checkpoint), else a new one."""
        return request.model if request.model is not None else self.build_model(request.stage)

    def load_model(self, folder: str | Path, *, map_location: str | torch.device = "cpu") -> PretrainedModel:
        """Load a ``save_pretrained`` folder of any of this system's model classes (picked by the config tag)."""
        tag = config_class_tag(Path(folder))
        try:
            model_class = self.model_class(tag)
        except ValueError as error:
            raise CheckpointError(f"{folder}: {error}") from None
        return model_class.from_pretrained(folder, map_location=map_location)

    def unavailable(self, preset: Preset) -> str | None:
        """Why ``preset`` cannot be built on this machine (e.g. user-supplied base weights absent), else None.

        Nothing downloads at run time, so a preset built on someone's pre-trained weights names them here;
        ``quintet train`` refuses it with this reason and the registry test skips it."""
        return None

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


__all__ = [
    "DEMO_PRESET",
    "ENTRY_POINT_GROUP",
    "MAIN_STAGE",
    "DemoRun",
    "Preset",
    "Stage",
    "System",
    "TaskRequest",
    "all_presets",
    "get_preset",
    "get_system",
    "register",
    "systems",
]

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
    _entry_points_loaded = True  # only once every entry point loaded: a failure is raised again next time


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
