"""Shared fixtures of the training tests: one CPU thread each, and the toy systems registered."""

from __future__ import annotations

import pytest
import torch
from toy_task import OtherToySystem, StagedToySystem, ToySystem

from quintet import registry


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run side by side (pytest -n auto); one thread each also keeps float32 results repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy_systems(monkeypatch):
    """Register the toy systems for this test only (the registry's own tests never see them)."""
    toys = {system.name: system for system in (ToySystem(), OtherToySystem(), StagedToySystem())}
    monkeypatch.setattr(registry, "_SYSTEMS", toys)
    monkeypatch.setattr(registry, "_entry_points_loaded", True)
    return registry.systems()
