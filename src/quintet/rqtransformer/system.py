"""The RQ-Transformer system for the registry: two stages (an RQ-VAE tokenizer, then a prior over its
codes), their tasks, and the demo section (reconstructions, class-conditional samples, cached vs
uncached sampling time)."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch

from quintet.core.generation import generate
from quintet.registry import DemoRun, Preset, System, TaskRequest
from quintet.rqtransformer.classifier import trained_classifier
from quintet.rqtransformer.config import RQVAEConfig
from quintet.rqtransformer.data import (
    CodeCache,
    code_batches,
    image_batches,
    load_image_set,
    prior_loss,
    reconstruction_class_accuracy,
    reconstruction_grid,
    sample_class_accuracy,
    sample_classes,
    sample_grid,
    sampling_seconds_per_image,
    tokenizer_metrics,
    val_loss,
)
from quintet.rqtransformer.flat import FlatCodeLM, count_parameters, start_tokens
from quintet.rqtransformer.model import RQTransformer
from quintet.rqtransformer.presets import SHAPES, RQRecipe, presets
from quintet.rqtransformer.rqvae import RQVAE
from quintet.training.pipeline import RunResult
from quintet.training.task import ReportSection, SampleFolder, Task

TOKENIZER, PRIOR = "tokenizer", "prior"
_LOGGED_QUANTIZER_METRICS = ("recon_psnr", "codebook_usage", "perplexity", "dead_codes", "commitment")


def tokenizer_loss(module: torch.nn.Module, images: torch.Tensor):
    """Reconstruction MSE + commitment loss of ``module`` (an RQ-VAE, maybe wrapped) on ``images``."""
    loss, metrics = RQVAE.loss(module(images), images)
    return loss, {name: metrics[name] for name in _LOGGED_QUANTIZER_METRICS if name in metrics}


class RQTransformerSystem(System):
    name = "rqtransformer"
    description = (
        "residual-quantized image generation (Lee et al. 2022): an RQ-VAE codes each image as h x w x D residual "
        "codes, a spatial + depth transformer samples new ones, with an equal-parameter flat transformer baseline"
    )
    model_classes = (RQVAE, RQTransformer, FlatCodeLM)
    demo_budget_share = 1.25  # 150 s of training in the full demo (tokenizer + prior), 35 s with --quick
    metric_meanings = {
        "recon_psnr": "peak signal-to-noise ratio of validation images reconstructed from all D codes, in dB "
        "(higher is better; 20 dB is blurry, 30 dB close to the original)",
        "recon_psnr_depth1": "the same PSNR from the first code of each position only: what the deeper residual "
        "codes add is the gap to recon_psnr",
        "codebook_usage": "share of the K codebook entries that validation images use (1 = every code is used)",
        "perplexity": "the training batches' effective number of codes in use (exp of the entropy of code use)",
        "dead_codes": "codes unused for a while (re-seeded from encoder outputs when a restart threshold is set)",
        "commitment": "mean squared distance between encoder outputs and their quantized partial sums",
        "val_loss": "the prior's cross-entropy on validation images' codes, in nats per code (ln K = knowing "
        "nothing; lower is better; comparable between priors on the same tokenizer's codes only)",
        "sample_class_accuracy": "share of class-conditional samples that a classifier trained on real images "
        "assigns to the class they were sampled for (10 classes: 0.1 is chance)",
        "classifier_val_accuracy": "that classifier's accuracy on real validation images: the ceiling that gives "
        "sample_class_accuracy its meaning",
        "classifier_recon_accuracy": "its accuracy on validation images coded and decoded by the RQ-VAE: the most "
        "sample_class_accuracy can reach through this tokenizer",
    }

    def presets(self) -> dict[str, Preset]:
        return presets()

    def example_batch(self, model, *, batch_size: int, generator: torch.Generator):
        config = model.config
        if isinstance(model, RQVAE):
            # the smallest size the preset codes as a grid (a 1 x 1 grid for a 256 x 256 preset keeps tests cheap)
            side = min(config.image_size, max(32, config.downsampling))
            return torch.rand(batch_size, config.in_channels, side, side, generator=generator)
        codes = torch.randint(0, config.codebook_size, (batch_size, *config.code_shape), generator=generator)
        labels = torch.randint(0, max(1, config.num_classes), (batch_size,), generator=generator)
        return codes, labels

    def generate(self, model, batch, *, use_cache: bool) -> torch.Tensor | None:
        """Greedy codes for the first example's class: the whole grid from the RQ-Transformer; the flat
        baseline's first 32 codes (recomputing its h * w * D codes costs their square)."""
        if isinstance(model, RQVAE):
            return None
        labels = batch[1][:1] if model.config.num_classes else None
        if isinstance(model, FlatCodeLM):
            prompt = start_tokens(model.config, labels, 1, labels.device if labels is not None else "cpu")
            new = min(32, model.config.num_codes)
            return generate(model, prompt, new, temperature=0.0, use_cache=use_cache)
        size = None if labels is not None else 1
        return model.generate(labels, batch_size=size, temperature=0.0, use_cache=use_cache)

    def make_task(self, request: TaskRequest) -> Task:
        recipe = request.preset.recipe or RQRecipe()
        images = functools.cache(lambda: load_image_set(request.data, recipe))
        if isinstance(request.stage.model_config, RQVAEConfig):
            return self._tokenizer_task(request, recipe, images)
        return self._prior_task(request, recipe, images)

    def _tokenizer_task(self, request: TaskRequest, recipe: RQRecipe, images) -> Task:
        settings = request.settings
        model = self.build_model(request.stage)
        outputs = SampleFolder("rqtransformer")

        def sample(trained: RQVAE) -> dict:
            return {"images": [str(reconstruction_grid(trained, images(), outputs.path("reconstructions.png")))]}

        return Task(
            model=model,
            loss=tokenizer_loss,
            train_batch=image_batches(images, batch_size=settings.batch_size, seed=settings.seed),
            settings=settings,
            evaluate=lambda trained: tokenizer_metrics(trained, images(), count=recipe.eval_images),
            sample=sample,
            batch_flops=lambda batch: batch.shape[0] * model.flops_per_sample(batch.shape[2], batch.shape[3]),
            start=outputs.start,
        )

    def _prior_task(self, request: TaskRequest, recipe: RQRecipe, images) -> Task:
        settings, stage = request.settings, request.stage
        tokenizer = request.inputs.get(TOKENIZER)
        if not isinstance(tokenizer, RQVAE):
            raise ValueError(f"inputs: the {stage.name} stage needs the trained RQ-VAE of the {TOKENIZER!r} stage")
        config = stage.model_config
        preset_config = request.preset.stage(stage.name).model_config
        if request.data is not None and config == preset_config and config.num_classes:
            # a user's folder decides the number of classes (a checkpoint's config already has it)
            config = replace(config, num_classes=images().num_classes)
        grid = (recipe.image_size // tokenizer.config.downsampling,) * 2 + (tokenizer.config.depth,)
        if (config.codebook_size, config.code_shape) != (tokenizer.config.codebook_size, grid):
            raise ValueError(
                f"model_config: the prior models {config.code_shape} codes of {config.codebook_size}, the tokenizer "
                f"gives {grid} codes of {tokenizer.config.codebook_size} at image size {recipe.image_size}"
            )
        model = self.build_model(replace(stage, model_config=config))
        train_codes = functools.cache(lambda: CodeCache(tokenizer, images(), "train"))
        val_codes = functools.cache(lambda: CodeCache(tokenizer, images(), "val"))
        classifier = functools.cache(
            lambda: trained_classifier(images(), steps=recipe.classifier_steps, width=recipe.classifier_width)
        )
        outputs = SampleFolder("rqtransformer")

        def evaluate(trained) -> dict[str, float]:
            metrics = {"val_loss": val_loss(trained, val_codes(), count=recipe.eval_images)}
            if config.num_classes:
                judge, judge_accuracy = classifier()
                judge = judge.to(next(trained.parameters()).device)
                accuracy = sample_class_accuracy(trained, tokenizer, judge, recipe, seed=settings.seed)
                ceiling = reconstruction_class_accuracy(tokenizer, judge, images(), count=recipe.eval_images)
                metrics.update(
                    sample_class_accuracy=accuracy,
                    classifier_val_accuracy=judge_accuracy,
                    classifier_recon_accuracy=ceiling,
                )
            return metrics

        def sample(trained) -> dict:
            path, _ = sample_grid(trained, tokenizer, recipe, outputs.path("samples.png"), seed=settings.seed)
            return {"images": [str(path)]}

        return Task(
            model=model,
            loss=prior_loss(config),
            train_batch=code_batches(train_codes, batch_size=settings.batch_size, seed=settings.seed),
            settings=settings,
            evaluate=evaluate,
            sample=sample,
            batch_tokens=lambda batch: batch[0].numel(),
            batch_flops=lambda batch: batch[0].shape[0] * model.flops_per_sample(),
            start=outputs.start,
        )

    # ------------------------------------------------------------------ demo

    def demo_runs(self, *, quick: bool) -> list[DemoRun]:
        preset = self.presets()["demo"]
        if quick:  # a quarter of the time: shorter cosine schedules, one evaluation at the end
            for stage in preset.stages:
                steps = max(50, stage.settings.steps // 4)
                preset = preset.replace_stage(stage.name, settings=replace(stage.settings, steps=steps, eval_every=0))
        return [DemoRun(label="demo", preset=preset)]

    def demo_section(self, runs: list[RunResult], *, out_dir: Path, quick: bool) -> ReportSection:
        out_dir = Path(out_dir)
        run = runs[0]
        recipe = run.preset.recipe
        tokenizer_stage, prior_stage = run.stages[TOKENIZER], run.stages[PRIOR]
        tokenizer, prior = tokenizer_stage.model, prior_stage.model
        metrics: dict[str, float] = {}
        for stage in (tokenizer_stage, prior_stage):
            found = stage.result.eval_metrics if stage.result is not None else None
            metrics.update(found if found else stage.task.evaluate(stage.model))
        images = load_image_set(None, recipe)

        figures = [str(reconstruction_grid(tokenizer, images, out_dir / "rq_reconstructions.png"))]
        grid, _ = sample_grid(prior, tokenizer, recipe, out_dir / "rq_samples.png", seed=0)
        figures.append(str(grid))
        stages = (tokenizer_stage, prior_stage)
        figures += [str(s.result.loss_curve) for s in stages if s.result is not None and s.result.loss_curve]

        # sampling time per image, cached vs recomputing every step, one image per class in one batch
        class_ids = sample_classes(prior.config.num_classes, 1) if prior.config.num_classes else None
        timing_ids = class_ids if class_ids is not None else torch.zeros(4, dtype=torch.long)
        cached = sampling_seconds_per_image(prior, timing_ids, use_cache=True, repeats=2)
        uncached = sampling_seconds_per_image(prior, timing_ids, use_cache=False)
        metrics.update(
            sampling_ms_per_image_cached=cached * 1e3,
            sampling_ms_per_image_uncached=uncached * 1e3,
            sampling_cache_speedup=uncached / cached,
        )
        h, w, depth = prior.config.code_shape
        steps = {name: s.result.step if s.result else None for name, s in run.stages.items()}
        seconds = sum(s.result.seconds for s in run.stages.values() if s.result is not None)
        meanings = " ".join(f"{k}: {v}." for k, v in self.metric_meanings.items() if k in metrics)
        summary = (
            f"An RQ-VAE ({count_parameters(tokenizer):,} parameters) learned to code {recipe.image_size} x "
            f"{recipe.image_size} images of {SHAPES} as {h} x {w} x {depth} residual codes from a shared codebook of "
            f"{tokenizer.config.codebook_size} ({steps[TOKENIZER]} steps), then a class-conditional RQ-Transformer "
            f"({count_parameters(prior):,} parameters: {prior.config.spatial_layers} spatial and "
            f"{prior.config.depth_layers} depth layers, '{prior.config.depth_input}' depth inputs) learned the codes "
            f"({steps[PRIOR]} steps); {seconds:.0f} s of training in all. The first figure shows real validation "
            f"images (top row) and their reconstructions from the first 1 .. {depth} codes of each position (rows "
            f"below): each residual code sharpens the image. The second shows samples, one row per class "
            f"({', '.join(images.classes[: recipe.grid_classes])}), with classifier-free guidance "
            f"{recipe.cfg_scale}. Sampling one image takes {cached * 1e3:.0f} ms with the two KV caches and "
            f"{uncached * 1e3:.0f} ms recomputing both transformers every step ({uncached / cached:.1f}x). {meanings}"
        )
        table = [
            {"sampling": "cached (KV caches)", "ms per image": round(cached * 1e3, 2)},
            {"sampling": "uncached (recompute)", "ms per image": round(uncached * 1e3, 2)},
        ]
        return ReportSection(
            title="RQ-Transformer: residual-quantized image generation",
            summary=summary,
            train_seconds=seconds,
            metrics=metrics,
            figures=figures,
            tables={"sampling time per image (one batch of one image per class)": table},
        )
