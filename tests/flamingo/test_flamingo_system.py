"""The Flamingo system: the few-shot data, the three-stage tiny preset through the Trainer, the FLOPs of
each stage's model, and the ``hf-gpt2`` preset on tiny GPT-2 / CLIP models saved locally."""

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from quintet.bench import count_flops
from quintet.data.images import shapes_dataset
from quintet.flamingo.data import (
    BOS,
    END_OF_CHUNK,
    FIRST_CONCEPT,
    FIRST_WORD,
    IMAGE,
    NUM_TOKENS,
    FewShotEpisodes,
    choose,
    decode,
)
from quintet.flamingo.system import FlamingoSystem
from quintet.registry import TaskRequest
from quintet.training.pipeline import TrainerOptions, train_preset

SYSTEM = FlamingoSystem()


@pytest.fixture(scope="module")
def images():
    return shapes_dataset(image_size=16, train_size=200, val_size=40)


def test_episodes_name_images_with_fresh_words(images):
    episodes = FewShotEpisodes(images, ways=3)
    first = episodes.sample("train", batch_size=4, examples=6, generator=torch.Generator().manual_seed(5))
    again = episodes.sample("train", batch_size=4, examples=6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.ids, again.ids) and torch.equal(first.images, again.images)  # (index, seed) -> batch
    ids = first.ids
    assert ids.shape == (4, 1 + 3 * 6) and first.images.shape == (4, 6, 3, 16, 16)
    assert (ids[:, 0] == BOS).all() and (ids[:, 1::3] == IMAGE).all() and (ids[:, 3::3] == END_OF_CHUNK).all()
    words = ids[:, 2::3]
    assert ((words >= FIRST_WORD) & (words < NUM_TOKENS)).all()
    assert all(len(set(row.tolist())) <= 3 for row in words)  # at most `ways` words per episode
    # one word per class within an episode: the same word always shows the same class
    text = episodes.sample(
        "train", batch_size=4, examples=6, generator=torch.Generator().manual_seed(5), text_only=True
    )
    assert text.images is None and text.vision_features is None
    concepts = text.ids[:, 1::3]
    assert ((concepts >= FIRST_CONCEPT) & (concepts < FIRST_WORD)).all()
    for row_concepts, row_words in zip(concepts.tolist(), text.ids[:, 2::3].tolist()):
        pairs = set(zip(row_concepts, row_words))
        assert len(pairs) == len({c for c, _ in pairs}) == len({w for _, w in pairs})


def test_prompts_and_captions(images):
    episodes = FewShotEpisodes(images, ways=4)
    for shots in (0, 1, 4, 6):
        prompts = episodes.prompts("val", batch_size=5, shots=shots, generator=torch.Generator().manual_seed(shots))
        assert prompts.batch.ids.shape == (5, 1 + 3 * shots + 1) and (prompts.batch.ids[:, -1] == IMAGE).all()
        assert prompts.batch.images.shape[1] == shots + 1
        assert (prompts.candidates == prompts.answers[:, None]).sum(dim=1).eq(1).all()
        if shots >= 4:  # every class appears among the examples: the answer's word is in the prompt
            assert all(int(a) in row.tolist() for a, row in zip(prompts.answers, prompts.batch.ids))
    captions = episodes.captions("train", batch_size=3, generator=torch.Generator().manual_seed(0))
    assert captions.ids.shape == (3, 4) and (captions.ids[:, 1] == IMAGE).all()
    assert decode(captions.ids[0], images.classes).startswith("<bos> <image> <concept:")
    logits = torch.zeros(2, NUM_TOKENS)
    logits[0, FIRST_WORD + 3] = logits[1, FIRST_WORD + 9] = 1.0
    candidates = torch.tensor([[FIRST_WORD + 1, FIRST_WORD + 3], [FIRST_WORD + 9, FIRST_WORD + 2]])
    assert choose(logits, candidates).tolist() == [FIRST_WORD + 3, FIRST_WORD + 9]
    with pytest.raises(ValueError, match="^ways: the image set has 10 classes"):
        FewShotEpisodes(images, ways=11)


def test_tiny_preset_trains_all_stages_and_losses_fall(tmp_path):
    torch.manual_seed(0)
    preset = SYSTEM.presets()["tiny"].with_settings(steps=30, log_every=2, eval_every=0)
    run = train_preset(SYSTEM, preset, run_dir=tmp_path, options=TrainerOptions(device="cpu", live_progress=False))
    assert set(run.stages) == {"vision", "lm", "flamingo"}
    for name, stage in run.stages.items():
        losses = [e["loss"] for e in stage.result.history if e.get("kind") == "train"]
        assert sum(losses[-3:]) < sum(losses[:3]), (name, losses)
    flamingo = run.stages["flamingo"]
    metrics = flamingo.result.eval_metrics
    assert {f"fewshot_accuracy_{k}" for k in (0, 1, 2, 4, 8)} <= set(metrics) and metrics["fewshot_chance"] == 0.25
    # Flamingo was built on the trained LM and encoder, and training left them as they were, but for the
    # <image> row (never read in the LM's text): a new token starting at the mean of the concepts it stands for
    lm, vision = run.stages["lm"].model, run.stages["vision"].model
    image_row = torch.arange(NUM_TOKENS) == IMAGE
    for name, tensor in lm.state_dict().items():
        built = flamingo.model.lm.state_dict()[name]
        if name == "token_emb.weight":
            assert torch.equal(built[~image_row], tensor[~image_row])
            concepts = tensor[FIRST_CONCEPT : FIRST_CONCEPT + 10].mean(dim=0)
            assert torch.allclose(built[IMAGE], concepts) and float(concepts.norm()) > 0
            continue
        assert torch.equal(built, tensor), name
    for name, tensor in vision.encoder.state_dict().items():
        assert torch.equal(flamingo.model.vision.state_dict()[name], tensor), name
    sample = flamingo.task.sample(flamingo.model)
    assert sample["count"] == preset.recipe.demo_prompts and sample["images"]
    section = SYSTEM.demo_section([run], out_dir=tmp_path / "section", quick=True)
    assert "fewshot_accuracy_4" in section.metrics and len(section.figures) >= 3


@pytest.mark.parametrize("stage", ["vision", "lm", "flamingo"])
def test_batch_flops_match_the_counted_flops(stage):
    torch.manual_seed(0)
    preset = SYSTEM.presets()["tiny"]
    task = SYSTEM.make_task(TaskRequest.for_stage(preset, stage))
    batch = SYSTEM.example_batch(task.model, batch_size=2, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH):  # FlopCounterMode counts no fused CPU attention kernel
        counted = count_flops(lambda: task.loss(task.model, batch)[0].backward())
    assert abs(task.batch_flops(batch) - counted) <= 0.1 * counted, (task.batch_flops(batch), counted)


def test_generation_is_the_same_cached_and_uncached():
    for stage in ("lm", "flamingo"):
        task = SYSTEM.make_task(TaskRequest.for_stage(SYSTEM.presets()["tiny"], stage))
        batch = SYSTEM.example_batch(task.model, batch_size=2, generator=torch.Generator().manual_seed(1))
        cached = SYSTEM.generate(task.model, batch, use_cache=True)
        assert torch.equal(cached, SYSTEM.generate(task.model, batch, use_cache=False))


def test_hf_gpt2_preset_on_tiny_local_base_models(tmp_path):
    """What the registry test does for every preset, for ``hf-gpt2`` on tiny GPT-2 / CLIP saved locally
    (the preset names the real models, which are not downloaded here)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lm_config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(lm_config).save_pretrained(tmp_path / "gpt2")
    _word_tokenizer(transformers).save_pretrained(tmp_path / "gpt2")
    clip = transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    transformers.CLIPVisionModel(clip).save_pretrained(tmp_path / "clip")
    preset = SYSTEM.presets()["hf-gpt2"]
    config = replace(
        preset.stages[0].model_config,
        language_model=str(tmp_path / "gpt2"),
        vision_model=str(tmp_path / "clip"),
        num_latents=4,
        resampler_depth=1,
        resampler_heads=2,
        resampler_dim_head=8,
        cross_attn_heads=2,
        cross_attn_dim_head=8,
    )
    preset = preset.replace_stage("train", model_config=config)
    preset = replace(
        preset, recipe=replace(preset.recipe, image_size=16, train_images=100, eval_episodes=2, shots=(0, 2))
    )
    task = SYSTEM.make_task(TaskRequest.for_stage(preset))
    model = task.model
    assert type(model) is SYSTEM.model_class(config)
    batch = SYSTEM.example_batch(model, batch_size=2, generator=torch.Generator().manual_seed(0))
    model.train()
    loss, _ = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.cross_attn["0"].attn_gate.grad is not None
    assert all(p.grad is None for p in model.language_model.parameters())
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    loaded = SYSTEM.load_model(tmp_path / "adapter")
    assert type(loaded) is type(model) and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(task.loss(model, batch)[0], task.loss(loaded, batch)[0])
        assert torch.equal(
            SYSTEM.generate(model, batch, use_cache=True), SYSTEM.generate(model, batch, use_cache=False)
        )

    # the task's own batches: captions in the base tokenizer's words, images resized to CLIP's input size
    batch = task.train_batch(0)
    assert batch.images.shape[-1] == 32 and batch.target_mask.shape == (
        preset.stages[0].settings.batch_size,
        batch.ids.shape[1] - 1,
    )
    assert (batch.ids == model.media_token_id).sum(dim=1).eq(preset.recipe.examples).all()
    with torch.no_grad():
        assert torch.isfinite(task.loss(model, batch)[0])
        metrics = task.evaluate(model)
    assert set(metrics) == {"val_loss", "fewshot_chance", "fewshot_accuracy_0", "fewshot_accuracy_2"}


def _word_tokenizer(transformers):
    """A word-level tokenizer over the label words, built locally (a stand-in for GPT-2's BPE files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from quintet.flamingo.data import LABEL_WORDS

    vocab = {word: index for index, word in enumerate(["<unk>", "<eos>", *LABEL_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")
