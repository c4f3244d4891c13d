"""What a run trains: a preset's stages, the request a system builds a task from, a demo's runs.

Plain data, below the registry and the pipeline (both import it; it imports neither): a
:class:`Preset` is one or several :class:`Stage` s trained in order, each with its own model config
and optimisation settings, plus the system's own typed settings in ``Preset.recipe``;
:class:`TaskRequest` is what ``System.make_task`` receives; :class:`DemoRun` is one run of a system's
demo section. ``quintet.registry`` re-exports them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from quintet.core.validation import check_number
from quintet.training.task import TrainSettings

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
    model: nn.Module | None = None
    """the model the task trains or evaluates when it exists already (a loaded checkpoint for
    ``sample`` / ``eval``); None: the system builds one from ``stage.model_config``"""

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
