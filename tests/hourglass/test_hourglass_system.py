import json
import math

import pytest
import torch

from quintet import registry
from quintet.hourglass import FlatLM, HourglassLM, flat_baseline
from quintet.hourglass.data import lm_loss
from quintet.registry import TaskRequest
from quintet.training.demo import run_system_demo
from quintet.training.task import TrainSettings


def task_of(system, preset, **changes):
    return system.make_task(TaskRequest.for_stage(preset, **changes))


@pytest.fixture
def system():
    return registry.get_system("hourglass")


def test_presets_build_the_documented_models(system):
    presets = system.presets()
    assert {"tiny", "demo", "enwik8"} <= set(presets)
    assert presets["demo"].stages[0].model_config.depth == (2, 4, 2)
    assert isinstance(system.build_model(presets["tiny"].stages[0]), HourglassLM)
    assert system.model_classes == (HourglassLM, FlatLM)


def test_train_batches_are_a_deterministic_function_of_seed_and_index(system):
    preset = system.presets()["tiny"]
    task = task_of(system, preset)
    again = task_of(system, preset)
    other_seed = task_of(system, preset, settings=TrainSettings(batch_size=4, seed=1))
    batch = task.train_batch(3)
    assert batch.shape == (4, preset.stages[0].model_config.max_seq_len + 1) and batch.dtype == torch.long
    assert torch.equal(batch, again.train_batch(3))
    assert not torch.equal(batch, task.train_batch(4))
    assert not torch.equal(batch, other_seed.train_batch(3))


def test_tiny_preset_loss_falls_when_overfitting_one_batch(system):
    torch.manual_seed(0)
    task = task_of(system, system.presets()["tiny"])
    batch = task.train_batch(0)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss, metrics = task.loss(task.model, batch)
        assert float(metrics["bpb"]) == pytest.approx(loss.item() / math.log(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_task_evaluates_bits_per_byte_and_samples_text(system):
    task = task_of(system, system.presets()["tiny"])
    metrics = task.evaluate(task.model)
    # an untrained byte model is close to a uniform guess over 256 bytes: 8 bits
    assert 7.0 < metrics["val_bpb"] < 9.0
    assert metrics["val_loss"] == pytest.approx(metrics["val_bpb"] * math.log(2))
    sample = task.sample(task.model)
    assert sample["text"].startswith(sample["prompt"]) and len(sample["text"]) > len(sample["prompt"])


def test_flat_variant_trains_through_the_same_task(system):
    preset = system.presets()["tiny"]
    flat = flat_baseline(preset.stages[0].model_config)
    task = task_of(system, preset.replace_stage("train", model_config=flat))
    assert isinstance(task.model, FlatLM)
    loss, _ = task.loss(task.model, task.train_batch(0))
    assert torch.isfinite(loss)


def test_loss_rejects_a_batch_without_targets():
    model = registry.get_system("hourglass").build_model(registry.get_preset("hourglass", "tiny").stages[0])
    with pytest.raises(ValueError, match="batch"):
        lm_loss(model, torch.zeros(2, 1, dtype=torch.long))


def test_enwik8_preset_needs_a_data_path(system):
    task = task_of(system, system.presets()["enwik8"])
    with pytest.raises(ValueError, match="data"):
        task.train_batch(0)


def test_make_task_reads_no_data_until_asked(system, monkeypatch):
    import quintet.hourglass.system as hourglass_system

    def no_corpus(*args, **kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(hourglass_system, "load_corpus", no_corpus)
    task = task_of(system, system.presets()["tiny"])
    with pytest.raises(AssertionError, match="corpus was read"):
        task.train_batch(0)


def test_demo_races_hourglass_and_flat_and_reports_both(system, tmp_path):
    section = run_system_demo(system, tmp_path, budget_s=4.0, quick=True)
    assert section.figures and all(p.endswith(".png") for p in section.figures)
    assert (tmp_path / "hourglass_val_bpb.png").is_file()
    assert set(section.samples) == {"hourglass sample (temperature 0.8)", "flat sample (temperature 0.8)"}
    for name in ("hourglass", "flat"):
        assert 0 < section.metrics[f"{name}_val_bpb"] < 9
        assert section.metrics[f"{name}_steps"] >= 1
    params = section.metrics["hourglass_params"], section.metrics["flat_params"]
    assert abs(params[0] - params[1]) < 0.1 * params[1]
    rows = section.tables["same wall-clock, hourglass vs flat"]
    assert [row["model"] for row in rows] == ["hourglass", "flat"]
    assert "bits per byte" in section.summary


def test_sample_and_eval_read_a_flat_baseline_checkpoint(system, tmp_path, capsys):
    """The hourglass system trains two model classes; its commands read either one's checkpoint."""
    from quintet.cli import main
    from quintet.training.pipeline import TrainerOptions, train_preset

    preset = system.presets()["tiny"]
    flat = preset.replace_stage("train", model_config=flat_baseline(preset.stages[0].model_config))
    train_preset(
        system,
        flat,
        run_dir=tmp_path,
        overrides={"steps": 2},
        options=TrainerOptions(device="cpu", live_progress=False),
    )
    assert main(["sample", "hourglass", "--checkpoint", str(tmp_path), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "loaded model weights" in captured.err
    assert main(["eval", "hourglass", "--checkpoint", str(tmp_path), "--device", "cpu"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["val_bpb"] < 9


def test_resume_keeps_the_run_s_data_and_refuses_another(tmp_path, capsys):
    from quintet.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = str(tmp_path / "run")
    common = ["--preset", "tiny", "--device", "cpu", "--out", out]
    assert main(["train", "hourglass", *common, "--data", str(text), "--steps", "2"]) == 0
    assert main(["train", "hourglass", "--out", out, "--device", "cpu", "--resume", "--steps", "3"]) == 0
    checkpoint = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "run_config.json").read_text())
    assert checkpoint["data"] == str(text)
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text("another corpus " * 500)
    assert main(["train", "hourglass", "--out", out, "--resume", "--data", str(other), "--steps", "4"]) == 2
    assert "data: the run trained on" in capsys.readouterr().err
