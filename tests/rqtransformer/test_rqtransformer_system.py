"""The system end to end on the tiny preset: both stages train through the Trainer (loss falls), the prior
trains on the tokenizer's codes, evaluation metrics under their stable names, checkpoints sample and
evaluate again, the demo section; and the task's clear errors."""

import json
from pathlib import Path

import pytest
import torch

from quintet import registry
from quintet.registry import TaskRequest
from quintet.rqtransformer import RQVAE, FlatCodeLM, RQTransformer
from quintet.rqtransformer.data import batch_generator, load_image_set
from quintet.rqtransformer.system import RQTransformerSystem
from quintet.training.pipeline import TrainerOptions, load_for_inference, train_preset

SYSTEM = registry.register(RQTransformerSystem())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    preset = SYSTEM.presets()["tiny"]
    run_dir = tmp_path_factory.mktemp("rq") / "run"
    torch.manual_seed(0)
    result = train_preset(SYSTEM, preset, run_dir=run_dir, options=TrainerOptions(device="cpu", live_progress=False))
    return preset, run_dir, result


def _losses(result) -> list[float]:
    return [event["loss"] for event in result.history if event["kind"] == "train"]


def test_both_stages_train_and_their_losses_fall(tiny_run):
    _, run_dir, run = tiny_run
    assert list(run.stages) == ["tokenizer", "prior"]
    for name, stage in run.stages.items():
        losses = _losses(stage.result)
        assert losses[-1] < 0.9 * losses[0], (name, losses)
        assert (run_dir / name / "checkpoints").is_dir()
    assert set(json.loads((run_dir / "run.json").read_text())["completed"]) == {"tokenizer", "prior"}
    assert isinstance(run.stages["tokenizer"].model, RQVAE)
    assert isinstance(run.stages["prior"].model, RQTransformer)


def test_eval_metrics_have_their_stable_names(tiny_run):
    _, _, run = tiny_run
    tokenizer = run.stages["tokenizer"].result.eval_metrics
    prior = run.stages["prior"].result.eval_metrics
    assert {"recon_psnr", "codebook_usage"} <= set(tokenizer)
    assert 0 < tokenizer["codebook_usage"] <= 1 and tokenizer["recon_psnr"] > 5
    assert {"val_loss", "sample_class_accuracy", "classifier_val_accuracy", "classifier_recon_accuracy"} <= set(prior)
    assert 0 < prior["val_loss"] < torch.log(torch.tensor(32.0))  # better than a uniform guess over K = 32
    assert 0 <= prior["sample_class_accuracy"] <= 1 and 0 < prior["classifier_val_accuracy"] <= 1
    assert 0 <= prior["classifier_recon_accuracy"] <= 1
    for name in ("recon_psnr", "codebook_usage", "val_loss", "sample_class_accuracy", "classifier_recon_accuracy"):
        assert name in SYSTEM.metric_meanings


def test_the_prior_trains_on_the_tokenizers_codes(tiny_run):
    preset, _, run = tiny_run
    tokenizer = run.stages["tokenizer"].model
    task = run.stages["prior"].task
    codes, labels = task.train_batch(3)
    # micro-batch 3 holds the codes the trained tokenizer gives the training images it draws
    images = load_image_set(None, preset.recipe)
    drawn = torch.randint(
        0, images.count("train"), (task.settings.batch_size,), generator=batch_generator(task.settings.seed, 3)
    )
    pixels, expected_labels = images.batch("train", drawn)
    assert torch.equal(codes, tokenizer.encode(pixels)) and torch.equal(labels, expected_labels)
    assert torch.equal(task.train_batch(3)[0], codes)  # deterministic in (seed, index)


def test_checkpoints_sample_and_evaluate_again(tiny_run):
    _, run_dir, run = tiny_run
    task, model, _ = load_for_inference(SYSTEM, run_dir, device="cpu")
    assert isinstance(model, RQTransformer)
    with torch.no_grad():
        samples = task.sample(model)
        metrics = task.evaluate(model)
    assert all(Path(path).is_file() for path in samples["images"])
    assert metrics["val_loss"] == pytest.approx(run.stages["prior"].result.eval_metrics["val_loss"], rel=1e-5)
    tokenizer_task, tokenizer, _ = load_for_inference(SYSTEM, run_dir / "tokenizer", device="cpu")
    assert isinstance(tokenizer, RQVAE)
    with torch.no_grad():
        assert Path(tokenizer_task.sample(tokenizer)["images"][0]).is_file()


def test_demo_section(tiny_run, tmp_path):
    _, _, run = tiny_run
    section = SYSTEM.demo_section([run], out_dir=tmp_path, quick=True)
    assert {"recon_psnr", "codebook_usage", "val_loss", "sample_class_accuracy"} <= set(section.metrics)
    assert section.metrics["sampling_ms_per_image_uncached"] > 0 and section.metrics["sampling_ms_per_image_cached"] > 0
    assert len(section.figures) >= 4 and all(Path(f).is_file() for f in section.figures)
    assert "nats per code" in section.summary


def test_prior_task_needs_a_matching_tokenizer():
    preset = SYSTEM.presets()["tiny"]
    prior = preset.stage("prior")
    with pytest.raises(ValueError, match="^inputs: the prior stage needs the trained RQ-VAE"):
        SYSTEM.make_task(TaskRequest.for_stage(preset, prior))
    other = SYSTEM.build_model(SYSTEM.presets()["demo"].stage("tokenizer"))
    with pytest.raises(ValueError, match="^model_config: the prior models"):
        SYSTEM.make_task(TaskRequest.for_stage(preset, prior, inputs={"tokenizer": other}))


def test_every_preset_builds_its_models_with_the_right_classes():
    presets = SYSTEM.presets()
    assert {"tiny", "demo", "imagenet256"} <= set(presets)
    for preset in presets.values():
        assert preset.stage_names == ("tokenizer", "prior") and preset.stage("prior").needs == ("tokenizer",)
    assert SYSTEM.model_class(presets["demo-flat"].stage("prior").model_config) is FlatCodeLM
    paper = presets["imagenet256"]
    assert paper.stage("prior").model_config.code_shape == (8, 8, 4)
    assert paper.stage("tokenizer").model_config.downsampling == 32


def test_data_flag_reads_an_image_folder(tmp_path):
    from PIL import Image

    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220)), ("green", (30, 220, 30))):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for index in range(8):
            Image.new("RGB", (20, 24), colour).save(folder / f"{index}.png")
    preset = SYSTEM.presets()["tiny"]
    tokenizer = SYSTEM.build_model(preset.stage("tokenizer")).eval()
    task = SYSTEM.make_task(
        TaskRequest.for_stage(preset, "prior", data=str(tmp_path / "images"), inputs={"tokenizer": tokenizer})
    )
    assert task.model.config.num_classes == 3  # the folder's classes, not the preset's 10
    codes, labels = task.train_batch(0)
    assert codes.shape[1:] == (4, 4, 2) and int(labels.max()) < 3
    with pytest.raises(ValueError, match="^data: .* is not a folder"):
        SYSTEM.make_task(TaskRequest.for_stage(preset, "tokenizer", data=str(tmp_path / "nope"))).train_batch(0)
