"""The Trainer on a tiny causal LM: it learns, accumulates, stops on NaN, keeps to budgets, logs."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from toy_task import ToyConfig, lm_loss, make_toy_task, pattern_batch

from quintet.core import CheckpointError
from quintet.training import NonFiniteLossError, Task, Trainer, TrainSettings
from quintet.training.checkpoint import latest_checkpoint, load_checkpoint_model
from quintet.training.optim import lr_factor
from quintet.training.trainer import move_to_device

QUIET = dict(device="cpu", live_progress=False)


def settings(**changes) -> TrainSettings:
    base = TrainSettings(steps=8, batch_size=4, warmup_steps=2, eval_every=0, checkpoint_every=0, log_every=2)
    return replace(base, **changes)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_falls_on_one_repeated_batch(tmp_path, precision):
    task = make_toy_task(settings(steps=40, lr=3e-3, log_every=5), config=ToyConfig(dropout=0.0))
    batch = pattern_batch(0, batch_size=4, seq_len=16, vocab=16, seed=0)
    task.train_batch = lambda index: batch
    result = Trainer(task, run_dir=tmp_path, precision=precision, **QUIET).fit()
    losses = [event["loss"] for event in result.history if event["kind"] == "train"]
    assert losses[-1] < 0.3 * losses[0]
    assert result.step == 40


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two accumulated half-batches take the same optimizer steps as one batch of both halves."""
    config = ToyConfig(dropout=0.0)
    half_a = pattern_batch(1, batch_size=4, seq_len=16, vocab=16, seed=0)
    half_b = pattern_batch(2, batch_size=4, seq_len=16, vocab=16, seed=0)
    accumulated = make_toy_task(settings(steps=4, grad_accum=2, lr=1e-2), config=config)
    accumulated.train_batch = lambda index: half_a if index % 2 == 0 else half_b
    whole = make_toy_task(settings(steps=4, grad_accum=1, lr=1e-2), config=config)
    whole.train_batch = lambda index: torch.cat([half_a, half_b])
    runs = [Trainer(task, run_dir=tmp_path / str(i), **QUIET).fit() for i, task in enumerate((accumulated, whole))]
    # AdamW is blind to the gradient's scale: the logged (pre-clip) gradient norm is not
    for key in ("loss", "grad_norm"):
        assert [e[key] for e in runs[0].history if e["kind"] == "train"] == pytest.approx(
            [e[key] for e in runs[1].history if e["kind"] == "train"], rel=1e-5
        )
    for p, q in zip(accumulated.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    task = make_toy_task(settings(steps=10, checkpoint_every=2, log_every=10))
    calls = {"n": 0}

    def loss(module, batch):
        calls["n"] += 1
        value, metrics = lm_loss(module, batch)
        return (value * math.nan if calls["n"] >= 5 else value), metrics

    task.loss = loss
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5\b.*step_00000004"):
        Trainer(task, run_dir=tmp_path, **QUIET).fit()
    latest = latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_00000004"
    model, _, _ = load_checkpoint_model(type(task.model), tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in events)


def test_time_budget_stops_early_with_a_checkpoint(tmp_path):
    task = make_toy_task(settings(steps=100_000, time_budget_s=0.3, log_every=50))
    result = Trainer(task, run_dir=tmp_path, **QUIET).fit()
    assert result.stopped_early == "time budget"
    assert 0 < result.step < 100_000
    assert result.checkpoint.name == f"step_{result.step:08d}"
    assert result.eval_metrics.keys() == {"val_loss"}


def test_history_metrics_file_and_result(tmp_path):
    task = make_toy_task(settings(steps=6, eval_every=3, log_every=2, ema_decay=0.9))
    result = Trainer(task, run_dir=tmp_path, run_config={"system": "toy"}, **QUIET).fit()
    train = [e for e in result.history if e["kind"] == "train"]
    evals = [e for e in result.history if e["kind"] == "eval"]
    assert [e["step"] for e in train] == [2, 4, 6]
    assert [e["step"] for e in evals] == [3, 6]
    for event in result.history:
        assert {"step", "time_s", "loss"} <= event.keys()
    assert all("val_loss" in e for e in evals) and "tokens_per_s" in train[0]
    times = [e["time_s"] for e in result.history]
    assert times == sorted(times)
    assert result.eval_metrics == {"val_loss": evals[-1]["val_loss"]}
    assert result.train_metrics["loss"] == train[-1]["loss"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == result.history
    assert result.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.checkpoint / "ema" / "model.safetensors").is_file()


def test_ema_weights_lag_the_model_and_are_evaluated(tmp_path):
    task = make_toy_task(settings(steps=6, ema_decay=0.5, lr=1e-2))
    trainer = Trainer(task, run_dir=tmp_path, **QUIET)
    result = trainer.fit()
    ema = trainer.eval_model
    assert ema is not task.model
    assert not torch.equal(ema.head.weight, task.model.head.weight)
    with torch.no_grad():
        ema_loss, _ = lm_loss(ema.eval(), pattern_batch(-1, batch_size=8, seq_len=16, vocab=16, seed=0))
    assert result.eval_metrics["val_loss"] == pytest.approx(float(ema_loss), rel=1e-5)


def test_fresh_run_replaces_an_old_one_and_resume_needs_a_checkpoint(tmp_path):
    Trainer(make_toy_task(settings(steps=4)), run_dir=tmp_path, **QUIET).fit()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004"
    Trainer(make_toy_task(settings(steps=2)), run_dir=tmp_path, **QUIET).fit()
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step_*"))] == ["step_00000002"]
    with pytest.raises(ValueError, match="holds no checkpoint"):
        Trainer(make_toy_task(settings()), run_dir=tmp_path / "empty", resume=True, **QUIET).fit()


def test_resume_refuses_a_different_model_config(tmp_path):
    Trainer(make_toy_task(settings(steps=2)), run_dir=tmp_path, **QUIET).fit()
    other = make_toy_task(settings(steps=4), config=ToyConfig(dropout=0.0))
    with pytest.raises(CheckpointError, match="model config differs"):
        Trainer(other, run_dir=tmp_path, resume=True, **QUIET).fit()


def test_bad_arguments_are_named(tmp_path):
    task = make_toy_task(settings())
    with pytest.raises(ValueError, match="parallel"):
        Trainer(task, run_dir=tmp_path, parallel="zero3")
    with pytest.raises(ValueError, match="precision"):
        Trainer(task, run_dir=tmp_path, precision="fp8")
    with pytest.raises(TypeError, match=r"run_config\['when'\]"):
        Trainer(task, run_dir=tmp_path, run_config={"when": object()})
    with pytest.raises(TypeError, match="save_pretrained"):
        Trainer(Task(model=torch.nn.Linear(2, 2), loss=lm_loss, train_batch=lambda i: i), run_dir=tmp_path)
    with pytest.raises(ValueError, match="device"):
        Trainer(task, run_dir=tmp_path, device="tpu").fit()
    with pytest.raises(ValueError, match="run_dir: cannot write"):
        (tmp_path / "file").write_text("x")
        Trainer(task, run_dir=tmp_path / "file" / "run", device="cpu").fit()


@pytest.mark.parametrize(
    "field, value", [("steps", 0), ("lr", -1.0), ("grad_accum", 0), ("ema_decay", 1.0), ("betas", (0.9,))]
)
def test_train_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainSettings(**{field: value})


def test_learning_rate_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(25)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[20] == pytest.approx(0.1) and factors[24] == pytest.approx(0.1)


def test_move_to_device_reaches_nested_tensors():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), 3)], "c": "text"}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["a"].is_meta and moved["b"][0].is_meta and moved["b"][1][0].is_meta
    assert moved["b"][1][1] == 3 and moved["c"] == "text"


def test_ctrl_c_finishes_the_step_checkpoints_and_returns(tmp_path):
    task = make_toy_task(settings(steps=50, log_every=10))
    task.after_step = lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 3 else None
    previous = signal.getsignal(signal.SIGINT)
    result = Trainer(task, run_dir=tmp_path, **QUIET).fit()
    assert result.stopped_early == "interrupted" and result.step == 3
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    assert signal.getsignal(signal.SIGINT) is previous


def test_stop_when_ends_the_run_after_an_evaluation_without_evaluating_twice(tmp_path):
    task = make_toy_task(settings(steps=20, eval_every=4))
    evaluate, calls = task.evaluate, []
    task.evaluate = lambda module: calls.append(1) or evaluate(module)
    task.stop_when = lambda metrics: "good enough" if len(calls) == 2 else None
    result = Trainer(task, run_dir=tmp_path, **QUIET).fit()
    assert result.stopped_early == "good enough" and result.step == 8
    last_eval = [event for event in result.history if event["kind"] == "eval"][-1]
    assert len(calls) == 2 and result.eval_metrics == {"val_loss": last_eval["val_loss"]}
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000008"


def test_start_hook_learns_the_run_folder_and_the_step_of_each_batch(tmp_path):
    task = make_toy_task(settings(steps=4, grad_accum=2, checkpoint_every=2))
    seen, train_batch = [], task.train_batch
    task.start = seen.append
    Trainer(task, run_dir=tmp_path, **QUIET).fit()
    (run,) = seen
    assert run.run_dir == tmp_path and run.start_step == 0 and run.world_size == 1 and not run.resumed
    assert [run.step_of(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    task = make_toy_task(settings(steps=6, grad_accum=2, checkpoint_every=2))
    task.start, task.train_batch = seen.append, train_batch
    Trainer(task, run_dir=tmp_path, resume=True, **QUIET).fit()
    assert seen[-1].start_step == 4 and seen[-1].resumed


def test_metrics_stay_on_the_device_until_a_log_step(tmp_path, monkeypatch):
    """Between log events the loop reads nothing back from its tensors (no .item(), float(), .tolist()).

    Conversions are counted where quintet's code or the task's loss asks for them (torch's own
    optimizer reads its CPU step counters, which never wait on a device).
    """
    import toy_task

    import quintet

    ours = (str(Path(quintet.__file__).parent), toy_task.__file__)
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(ours):
                reads.append(trainer.step)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    task = make_toy_task(settings(steps=12, log_every=4, grad_clip=1.0), config=ToyConfig(dropout=0.0))
    trainer = Trainer(task, run_dir=tmp_path, **QUIET)
    trainer.fit()
    per_step = {step: reads.count(step) for step in set(reads)}
    # reads happen at the steps that log (4, 8, 12: losses, norms, metrics: three reads) and in the
    # final evaluation; the steps in between read nothing
    assert set(per_step) == {4, 8, 12}, per_step
    assert per_step[4] == per_step[8] == 3, per_step
