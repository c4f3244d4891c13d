"""The Flamingo system for the registry: presets, the stages' tasks, and the few-shot demo.

The demo follows the paper's recipe at toy scale, in three stages: a vision encoder pre-trained on
its own (here on class labels), a language model pre-trained on text alone (few-shot prompts in
which concept tokens stand for the images), then Flamingo with both frozen, training only the
Perceiver resampler and the gated cross-attention on interleaved image-text episodes. Its
few-shot accuracy on held-out images, against the number of examples in the prompt, is the result.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch

from quintet.flamingo.config import FlamingoConfig, ImageClassifierConfig, LanguageModelConfig, VisionConfig
from quintet.flamingo.data import (
    BOS,
    END_OF_CHUNK,
    FIRST_CONCEPT,
    FIRST_WORD,
    IMAGE,
    NUM_TOKENS,
    EpisodeBatch,
    FewShotEpisodes,
    caption_ids,
)
from quintet.flamingo.demo import flamingo_section
from quintet.flamingo.hf import HFFlamingo, HFFlamingoConfig
from quintet.flamingo.hf_task import hf_example_batch, hf_generate, hf_task
from quintet.flamingo.model import CausalLM, Flamingo
from quintet.flamingo.tasks import (
    FeatureBank,
    FlamingoRecipe,
    TrainingMixture,
    answer_prompts,
    classifier_loss,
    classifier_metrics,
    episode_loss,
    fewshot_accuracy,
    image_set,
    lazy,
    mixture_loss,
    validation_loss,
)
from quintet.flamingo.vision import ImageClassifier
from quintet.registry import DemoRun, Preset, Stage, System, TaskRequest
from quintet.training.pipeline import RunResult
from quintet.training.task import ReportSection, SampleFolder, Task, TrainSettings

SHAPES = "the embedded procedural shapes (10 classes, 32 x 32), as few-shot episodes with fresh label words"


def _seeded(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index) % (2**63))


def _stages(vision: VisionConfig, lm: LanguageModelConfig, flamingo: FlamingoConfig, steps, batches, shares) -> tuple:
    """The three stages: encoder pre-training, LM pre-training on text, Flamingo on both (frozen)."""
    common = dict(warmup_steps=20, weight_decay=0.01, log_every=10, checkpoint_every=0)
    return (
        Stage(
            name="vision",
            description="the image encoder learns the classes (a linear head on its features)",
            model_config=ImageClassifierConfig(vision=vision, num_classes=10),
            settings=TrainSettings(steps=steps[0], batch_size=batches[0], lr=3e-3, eval_every=0, **common),
            budget_share=shares[0],
        ),
        Stage(
            name="lm",
            description="the language model learns few-shot prompts from text (concept tokens for images)",
            model_config=lm,
            settings=TrainSettings(steps=steps[1], batch_size=batches[1], lr=3e-3, eval_every=0, **common),
            budget_share=shares[1],
        ),
        Stage(
            name="flamingo",
            description="LM and encoder frozen: the resampler and gated cross-attention learn from image episodes",
            model_config=flamingo,
            settings=TrainSettings(
                steps=steps[2],
                batch_size=batches[2],
                lr=2e-3,
                eval_every=steps[2] // 4,
                **{**common, "warmup_steps": 50},
            ),
            needs=("vision", "lm"),
            budget_share=shares[2],
        ),
    )


class FlamingoSystem(System):
    name = "flamingo"
    description = (
        "Flamingo (Alayrac et al. 2022): a frozen language model given eyes by a Perceiver resampler and gated "
        "cross-attention; learns new words for images from a few examples in its prompt"
    )
    model_classes = (Flamingo, CausalLM, ImageClassifier, HFFlamingo)
    demo_budget_share = 1.2  # ~144 s of training in the full demo, ~34 s with --quick
    metric_meanings = {
        "val_loss": "mean next-token cross-entropy on held-out episodes, in nats per predicted token (lower is "
        "better; most tokens are predictable template, the label words carry the information)",
        "val_word_loss": "cross-entropy of the label words alone on held-out episodes (nats; a word seen before "
        "for the same class is predictable, a class's first word is not)",
        "word_loss": "the training cross-entropy of the label words alone",
        "val_accuracy": "share of held-out images the pre-trained encoder's classifier names right",
        "accuracy": "the classifier's training accuracy",
        "fewshot_chance": "chance accuracy: 1 / the number of classes per episode",
        **{
            f"fewshot_accuracy_{k}": f"share of held-out prompts with {k} captioned example image(s) for which the "
            f"model names the query image with the right one of the episode's label words (0 shots: chance)"
            for k in (0, 1, 2, 4, 8)
        },
        **{
            f"text_fewshot_accuracy_{k}": f"the same with {k} example(s), for the language model alone reading "
            "concept tokens in place of the images (what the frozen LM brings)"
            for k in (0, 1, 2, 4, 8)
        },
    }

    def presets(self) -> dict[str, Preset]:
        tiny_vision = VisionConfig(image_size=16, kind="conv", dim=16, depth=2)
        tiny_lm = LanguageModelConfig(num_tokens=NUM_TOKENS, dim=32, depth=2, heads=2, dim_head=16, max_seq_len=64)
        tiny = FlamingoConfig(
            lm=tiny_lm,
            vision=tiny_vision,
            media_token_id=IMAGE,
            end_of_chunk_token_id=END_OF_CHUNK,
            num_latents=4,
            resampler_depth=1,
            resampler_heads=2,
            resampler_dim_head=8,
            cross_attn_heads=2,
            cross_attn_dim_head=16,
            cross_attn_ff_mult=2.0,
            gate_scale=20.0,
        )
        demo_vision = VisionConfig(image_size=32, kind="conv", dim=64, depth=3)
        demo_lm = LanguageModelConfig(num_tokens=NUM_TOKENS, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=64)
        demo = FlamingoConfig(
            lm=demo_lm,
            vision=demo_vision,
            media_token_id=IMAGE,
            end_of_chunk_token_id=END_OF_CHUNK,
            num_latents=8,
            resampler_depth=1,
            resampler_heads=4,
            resampler_dim_head=16,
            cross_attn_heads=4,
            cross_attn_dim_head=16,
            cross_attn_ff_mult=2.0,
            gate_scale=10.0,
        )
        hf = HFFlamingoConfig(
            language_model="gpt2", vision_model="openai/clip-vit-base-patch32", num_latents=64, gate_scale=1.0
        )
        return {
            "tiny": Preset(
                system=self.name,
                name="tiny",
                description="smallest three-stage Flamingo (encoder, LM, Flamingo), for tests",
                data=SHAPES + "; 16 x 16, 500 train images",
                expected_minutes=0.2,
                recipe=FlamingoRecipe(
                    image_size=16, train_images=500, eval_episodes=16, val_episodes=8, caption_pairs=4
                ),
                stages=_stages(tiny_vision, tiny_lm, tiny, steps=(20, 20, 20), batches=(16, 8, 4), shares=(1, 1, 1)),
            ),
            "demo": Preset(
                system=self.name,
                name="demo",
                description="encoder, LM on text, then Flamingo with both frozen: few-shot naming of shapes",
                data=SHAPES,
                expected_minutes=2.5,
                recipe=FlamingoRecipe(train_images=5000),
                stages=_stages(
                    demo_vision, demo_lm, demo, steps=(250, 1000, 1200), batches=(64, 32, 16), shares=(0.15, 0.3, 0.55)
                ),
            ),
            "hf-gpt2": Preset(
                system=self.name,
                name="hf-gpt2",
                description="the adapter on a user-supplied GPT-2 and CLIP ViT-B/32 (base models frozen), for a GPU",
                data=SHAPES + ", captions tokenized by the LM's own tokenizer; images resized to CLIP's 224",
                expected_minutes=60.0,
                recipe=FlamingoRecipe(image_size=32, eval_episodes=100),
                stages=(
                    Stage(
                        model_config=hf,
                        settings=TrainSettings(steps=5000, batch_size=8, lr=1e-4, warmup_steps=200, eval_every=500),
                    ),
                ),
            ),
        }

    def unavailable(self, preset: Preset) -> str | None:
        """Why ``preset`` cannot be built here: the base models of an adapter preset are user-supplied and
        nothing downloads them (``hf-gpt2`` is tested on tiny local models in tests/flamingo); else None."""
        for stage in preset.stages:
            config = stage.model_config
            if isinstance(config, HFFlamingoConfig):
                try:
                    from transformers import AutoConfig

                    for name in (config.language_model, config.vision_model):
                        AutoConfig.from_pretrained(name, local_files_only=True)
                except (ImportError, OSError, ValueError) as error:
                    return f"{preset.name}: its base models are not available locally ({type(error).__name__})"
        return None

    # ------------------------------------------------------------------------------------------ tests
    def example_batch(self, model, *, batch_size: int, generator: torch.Generator):
        if isinstance(model, HFFlamingo):
            return hf_example_batch(model, batch_size=batch_size, generator=generator)
        if isinstance(model, ImageClassifier):
            size = model.config.vision.image_size
            images = torch.rand(batch_size, 3, size, size, generator=generator)
            return images, torch.randint(0, model.config.num_classes, (batch_size,), generator=generator)
        examples = 3
        words = torch.randint(FIRST_WORD, NUM_TOKENS, (batch_size, examples), generator=generator)
        if isinstance(model, CausalLM):
            concepts = torch.randint(FIRST_CONCEPT, FIRST_WORD, (batch_size, examples), generator=generator)
            return EpisodeBatch(ids=caption_ids(words, media=concepts))
        size = model.config.vision.image_size
        images = torch.rand(batch_size, examples, 3, size, size, generator=generator)
        concepts = torch.randint(FIRST_CONCEPT, FIRST_WORD, (batch_size, 1), generator=generator)
        captions = torch.cat((torch.full_like(concepts, BOS), torch.full_like(concepts, IMAGE), concepts), dim=1)
        return TrainingMixture(
            episodes=EpisodeBatch(ids=caption_ids(words), images=images),
            captions=EpisodeBatch(ids=captions, images=images[:, :1]),
        )

    def generate(self, model, batch, *, use_cache: bool) -> torch.Tensor | None:
        if isinstance(model, HFFlamingo):
            return hf_generate(model, batch, use_cache=use_cache)
        if isinstance(model, ImageClassifier):
            return None
        if isinstance(model, Flamingo):
            batch = batch.episodes
        prompt = batch.ids[:, :8]  # two captioned examples and the query's media token
        media = {"images": batch.images[:, :3]} if isinstance(model, Flamingo) else {}
        return model.generate(prompt, 6, temperature=0.0, use_cache=use_cache, **media)

    # ------------------------------------------------------------------------------------------ tasks
    def make_task(self, request: TaskRequest) -> Task:
        config = request.stage.model_config
        recipe = request.preset.recipe or FlamingoRecipe()
        if isinstance(config, HFFlamingoConfig):
            return hf_task(self.task_model(request), request, recipe)
        images = lazy(lambda: image_set(request.data, recipe))
        if isinstance(config, ImageClassifierConfig):
            return self._vision_task(request, images)
        if isinstance(config, LanguageModelConfig):
            return self._lm_task(request, recipe, images)
        return self._flamingo_task(request, recipe, images)

    def _vision_task(self, request: TaskRequest, images) -> Task:
        settings, model = request.settings, self.task_model(request)
        return Task(
            model=model,
            loss=classifier_loss,
            train_batch=lambda index: images().random_batch(
                "train", settings.batch_size, generator=_seeded(settings.seed, index)
            ),
            settings=settings,
            evaluate=lambda trained: classifier_metrics(trained, images()),
            batch_flops=lambda batch: model.train_flops(batch[0].shape[0]),
        )

    def _lm_task(self, request: TaskRequest, recipe: FlamingoRecipe, images) -> Task:
        settings, model = request.settings, self.task_model(request)
        episodes = lazy(lambda: FewShotEpisodes(images(), ways=recipe.ways))

        def evaluate(trained: CausalLM) -> dict[str, float]:
            metrics = validation_loss(trained, episodes(), recipe, text_only=True)
            return metrics | fewshot_accuracy(trained, episodes(), recipe, text_only=True)

        return Task(
            model=model,
            loss=episode_loss,
            train_batch=lambda index: episodes().sample(
                "train",
                batch_size=settings.batch_size,
                examples=recipe.examples,
                generator=_seeded(settings.seed, index),
                text_only=True,
            ),
            settings=settings,
            evaluate=evaluate,
            batch_tokens=lambda batch: batch.ids.shape[0] * (batch.ids.shape[1] - 1),
            batch_flops=lambda batch: model.train_flops(batch.ids.shape[0], batch.ids.shape[1] - 1),
        )

    def _flamingo_task(self, request: TaskRequest, recipe: FlamingoRecipe, images) -> Task:
        settings, config, model = request.settings, request.stage.model_config, self.task_model(request)
        if request.model is None:
            if "lm" in request.inputs:
                model.load_language_model(request.inputs["lm"])
                concepts = slice(FIRST_CONCEPT, FIRST_CONCEPT + images().num_classes)
                with torch.no_grad():
                    # <image> never occurs in the LM's text: as a new token of a vocabulary extension it starts at
                    # the mean of the words it stands for (the concepts). A zero row would leave the residual
                    # stream near zero at <image> tokens, where the LM's RMS norm has a ~1/|x| Jacobian: while
                    # the gates are near zero that gave gradient norms of 1e4 and loss spikes (measured).
                    model.lm.token_emb.weight[IMAGE] = model.lm.token_emb.weight[concepts].mean(dim=0)
            if "vision" in request.inputs:
                model.vision.load_state_dict(request.inputs["vision"].encoder.state_dict())
        outputs = SampleFolder("flamingo")

        def make_episodes() -> FewShotEpisodes:
            media = FeatureBank(model.vision, images()) if config.freeze_vision else None
            return FewShotEpisodes(images(), ways=recipe.ways, media=media)

        episodes = lazy(make_episodes)

        def evaluate(trained: Flamingo) -> dict[str, float]:
            metrics = validation_loss(trained, episodes(), recipe, text_only=False)
            metrics["fewshot_chance"] = 1 / recipe.ways
            return metrics | fewshot_accuracy(trained, episodes(), recipe)

        def train_batch(index: int) -> TrainingMixture:
            generator = _seeded(settings.seed, index)
            sampled = episodes().sample(
                "train", batch_size=settings.batch_size, examples=recipe.examples, generator=generator
            )
            captions = None
            if recipe.caption_pairs:
                captions = episodes().captions("train", batch_size=recipe.caption_pairs, generator=generator)
            return TrainingMixture(episodes=sampled, captions=captions)

        def batch_flops(batch: TrainingMixture) -> float:
            total = 0.0
            for part in (batch.episodes, batch.captions):
                if part is not None:
                    b, n = part.ids.shape[0], part.ids.shape[1] - 1
                    media = next(iter(part.media().values()))
                    total += model.train_flops(b, n, media.shape[1], include_vision=part.images is not None)
            return total

        return Task(
            model=model,
            loss=functools.partial(mixture_loss, caption_weight=recipe.caption_weight),
            train_batch=train_batch,
            settings=settings,
            evaluate=evaluate,
            sample=lambda trained: answer_prompts(
                trained, episodes(), recipe, outputs.path("prompts.png"), shots=recipe.ways, seed=settings.seed
            ),
            start=outputs.start,
            batch_tokens=lambda batch: batch.episodes.ids.shape[0] * (batch.episodes.ids.shape[1] - 1),
            batch_flops=batch_flops,
        )

    # ------------------------------------------------------------------------------------------- demo
    def demo_runs(self, *, quick: bool) -> list[DemoRun]:
        """The ``demo`` preset; ``quick`` (about 34 s) trains fewer, smaller steps of each stage on 2,000 images."""
        preset = self.presets()["demo"]
        if quick:
            preset = replace(preset, recipe=replace(preset.recipe, train_images=2000, eval_episodes=100))
            for name, steps, batch, share in (
                ("vision", 60, 32, 0.2),
                ("lm", 450, 32, 0.4),
                ("flamingo", 300, 16, 0.4),
            ):
                stage = preset.stage(name)
                settings = replace(stage.settings, steps=steps, batch_size=batch, eval_every=0)
                preset = preset.replace_stage(name, settings=settings, budget_share=share)
        return [DemoRun(label="demo", preset=preset)]

    def demo_section(self, runs: list[RunResult], *, out_dir: Path, quick: bool) -> ReportSection:
        return flamingo_section(runs, out_dir=Path(out_dir), quick=quick)
