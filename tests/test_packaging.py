"""quintet as a package: systems are found through entry points (a third party's too), and an installed
wheel (not the checkout) runs its own benchmarks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "QUINTET_DEBUG": ""}

PLUGIN = """
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quintet.core import PretrainedModel
from quintet.registry import Preset, Stage, System
from quintet.training import Task, TrainSettings


@dataclass(frozen=True, kw_only=True)
class CounterConfig:
    vocab: int = 8


class Counter(PretrainedModel):
    config_class = CounterConfig

    def __init__(self, config):
        super().__init__(config)
        self.table = nn.Embedding(config.vocab, config.vocab)

    def forward(self, tokens):
        return self.table(tokens)


class CounterSystem(System):
    name = "counter"
    description = "a third-party system registered through an entry point"
    model_classes = (Counter,)

    def presets(self):
        stage = Stage(model_config=CounterConfig(), settings=TrainSettings(steps=2, batch_size=2, warmup_steps=1))
        common = dict(system=self.name, data="counting", expected_minutes=0.01, stages=(stage,))
        return {"tiny": Preset(name="tiny", description="count", **common),
                "demo": Preset(name="demo", description="count more", **common)}

    def example_batch(self, model, *, batch_size, generator):
        return torch.randint(0, 7, (batch_size, 4), generator=generator)

    def make_task(self, request):
        model = self.build_model(request.stage)

        def loss(module, tokens):
            return F.cross_entropy(module(tokens).flatten(0, 1), (tokens + 1).flatten()), {}

        batch = lambda index: torch.randint(0, 7, (2, 4))
        return Task(model=model, loss=loss, train_batch=batch, settings=request.settings)
"""


def test_a_system_registered_through_an_entry_point_is_listed(tmp_path):
    package = tmp_path / "counter_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(PLUGIN)
    dist_info = tmp_path / "counter_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: counter-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[quintet.systems]\ncounter = counter_plugin:CounterSystem\n")
    env = {**ENV, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "quintet", "list"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split()[:2] for line in done.stdout.splitlines()]
    assert ["counter", "tiny"] in rows and ["counter", "demo"] in rows and ["hourglass", "tiny"] in rows
    trained = subprocess.run(
        [sys.executable, "-m", "quintet", "train", "counter", "--preset", "tiny", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert trained.returncode == 0 and "done: step 2" in trained.stdout, trained.stderr


def test_a_broken_entry_point_is_a_one_line_error(tmp_path):
    dist_info = tmp_path / "broken_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[quintet.systems]\nbroken = no_such_module:System\n")
    env = {**ENV, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "quintet", "list"], capture_output=True, text=True, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "broken = no_such_module:System" in lines[0]


@pytest.mark.timeout(600)
def test_an_installed_wheel_runs_its_own_benchmark(tmp_path):
    """``pip install .`` (not editable) into a fresh environment, then ``quintet bench training --quick``
    from a folder that is not the checkout."""
    source = tmp_path / "source"  # built from a copy: the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies (torch, ...) come from this environment; quintet itself only from the wheel
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("quintet_transformers-*.whl"))
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import quintet; print(quintet.__file__)"], capture_output=True, text=True, cwd=elsewhere
    )
    assert where.stdout.startswith(site), where.stdout + where.stderr
    bench = subprocess.run(
        [str(venv / "bin" / "quintet"), "bench", "training", "--quick", "--out", str(elsewhere / "results")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
        env=ENV,
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert (elsewhere / "results" / "training.json").is_file()
    assert "trainer_vs_bare_step_time" in bench.stdout
