"""Every system's named presets, in one place.

A system registers one :class:`System` object. ``tests/test_registry.py`` runs every preset of
every registered system through forward, backward, save/load and cached-vs-uncached generation,
so a system is covered the day it registers. ``quintet list`` / ``train`` / ``demo`` read this too.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from quintet.core.config import PretrainedModel
from quintet.training.task import ReportSection, Task, TrainSettings

# Modules that register a system when imported; a system appends itself here when it lands.
SYSTEM_MODULES: tuple[str, ...] = ("quintet.hourglass", "quintet.qtransformer")


@dataclass(frozen=True, kw_only=True)
class Preset:
    system: str
    name: str
    description: str
    """one line: what this preset is for"""
    data: str
    """what it trains on (embedded corpus, environment, user-supplied file)"""
    expected_minutes: float
    """expected training time on the machine it targets (2 CPU cores unless it says GPU)"""
    model_config: Any
    settings: TrainSettings


class System(ABC):
    """The hooks a system gives the registry, the Trainer, the CLI and the test suite."""

    name: ClassVar[str]
    description: ClassVar[str]
    model_class: ClassVar[type[PretrainedModel]]
    demo_budget_share: ClassVar[float] = 1.0
    """this system's demo training time in units of the demo's per-system budget; the shares of all
    five systems must keep ``quintet demo`` within its 20 minutes"""

    @abstractmethod
    def presets(self) -> dict[str, Preset]: ...

    def build_model(self, preset: Preset) -> PretrainedModel:
        return self.model_class(preset.model_config)

    @abstractmethod
    def example_batch(self, model: PretrainedModel, *, batch_size: int, generator: torch.Generator) -> Any:
        """A small random batch the loss accepts (for tests and benchmarks)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def generate(self, model: PretrainedModel, batch: Any, *, use_cache: bool) -> torch.Tensor | None:
        """Deterministic (greedy) generation from ``batch``; None for systems that do not generate."""
        return None

    @abstractmethod
    def make_task(self, preset: Preset, *, data: str | None = None, settings: TrainSettings | None = None) -> Task:
        """Everything the Trainer needs to train ``preset`` (on ``data`` when the user gives a path)."""

    def demo(self, out_dir: Path, *, budget_s: float, quick: bool = False) -> ReportSection:
        """Train the ``demo`` preset for ``budget_s`` seconds, evaluate, sample; the report's section."""
        from quintet.training.demo import run_default_demo

        return run_default_demo(self, out_dir, budget_s=budget_s, quick=quick)


_SYSTEMS: dict[str, System] = {}


def register(system: System) -> System:
    if system.name in _SYSTEMS and type(_SYSTEMS[system.name]) is not type(system):
        raise ValueError(f"system {system.name!r} is already registered")
    _SYSTEMS[system.name] = system
    return system


def _load_all() -> None:
    for module in SYSTEM_MODULES:
        importlib.import_module(module)


def systems() -> dict[str, System]:
    _load_all()
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


def with_settings(preset: Preset, **changes: Any) -> Preset:
    return replace(preset, settings=replace(preset.settings, **changes))
