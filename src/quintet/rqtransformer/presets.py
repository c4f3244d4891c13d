"""The RQ-Transformer system's presets: a tokenizer stage (RQ-VAE), then a prior stage on its codes.

``Preset.recipe`` is an :class:`RQRecipe`: the image data, evaluation and sampling settings the
system's tasks read (no table keyed by preset name anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from quintet.core.validation import check_int, check_number
from quintet.registry import Preset, Stage
from quintet.rqtransformer.config import RQTransformerConfig, RQVAEConfig
from quintet.rqtransformer.flat import flat_baseline
from quintet.training.task import TrainSettings

SYSTEM = "rqtransformer"
SHAPES = "the embedded procedural shapes (10 classes, 32 x 32 RGB, 10k train / 1k val; no download)"


@dataclass(frozen=True, kw_only=True)
class RQRecipe:
    """Data, evaluation and sampling settings of an RQ-Transformer preset."""

    image_size: int = 32
    """images are read (and folders resized and centre-cropped) at this size"""
    shapes_train: int = 10_000
    """images of the embedded shapes set (when no --data is given)"""
    shapes_val: int = 1_000
    eval_images: int = 256
    """validation images for recon_psnr, codebook_usage and val_loss"""
    samples_per_class: int = 5
    """generated images per class for sample_class_accuracy (each evaluation)"""
    grid_per_class: int = 8
    """images per class (a row each) in the sample grid"""
    grid_classes: int = 10
    """at most this many classes (rows) in the sample grid"""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = 2.0
    """classifier-free guidance of samples (None: plain conditional sampling)"""
    classifier_steps: int = 150
    """training steps of the judging classifier (trained once per image set, then cached)"""
    classifier_width: int = 16

    def __post_init__(self) -> None:
        for name in ("image_size", "shapes_train", "shapes_val", "eval_images", "samples_per_class"):
            check_int(getattr(self, name), name)
        for name in ("grid_per_class", "grid_classes", "classifier_steps", "classifier_width"):
            check_int(getattr(self, name), name)
        check_number(self.temperature, "temperature", low=0.0)
        if self.top_k is not None:
            check_int(self.top_k, "top_k")
        if self.top_p is not None:
            check_number(self.top_p, "top_p", low=0.0, high=1.0, low_open=True)
        if self.cfg_scale is not None:
            check_number(self.cfg_scale, "cfg_scale", low=0.0)


def _preset(name, description, data, minutes, tokenizer, tok_settings, prior, prior_settings, recipe, shares):
    if tokenizer.image_size != recipe.image_size:
        raise ValueError(f"image_size: {name}'s tokenizer reads {tokenizer.image_size}, its recipe {recipe.image_size}")
    if (prior.codebook_size, prior.code_shape) != (tokenizer.codebook_size, tokenizer.code_shape):
        raise ValueError(f"code_shape: the {name} prior models {prior.code_shape} codes of the tokenizer's")
    return Preset(
        system=SYSTEM,
        name=name,
        description=description,
        data=data,
        expected_minutes=minutes,
        recipe=recipe,
        stages=(
            Stage(
                name="tokenizer",
                model_config=tokenizer,
                settings=tok_settings,
                description="RQ-VAE: images -> (h, w, D) residual codes -> images",
                budget_share=shares[0],
            ),
            Stage(
                name="prior",
                model_config=prior,
                settings=prior_settings,
                description=f"{type(prior).__name__} over the tokenizer's codes, class-conditional",
                needs=("tokenizer",),
                budget_share=shares[1],
            ),
        ),
    )


def presets() -> dict[str, Preset]:
    # ---- tiny: the tests' preset (16 x 16 shapes, 4 x 4 x 2 codes, one layer everywhere)
    tiny_tokenizer = RQVAEConfig(
        image_size=16, channels=(8, 16, 16), latent_dim=16, codebook_size=32, depth=2, res_blocks=1
    )
    tiny_prior = RQTransformerConfig(
        codebook_size=32,
        code_shape=tiny_tokenizer.code_shape,
        num_classes=10,
        dim=32,
        heads=2,
        dim_head=16,
        spatial_layers=1,
        depth_layers=1,
        class_conditioning="film",
        spatial_rotary=True,
    )
    tiny_recipe = RQRecipe(
        image_size=16,
        shapes_train=2_000,
        shapes_val=200,
        eval_images=32,
        samples_per_class=1,
        grid_per_class=2,
        classifier_steps=20,
        classifier_width=8,
    )
    tiny_settings = TrainSettings(steps=30, batch_size=16, lr=3e-3, warmup_steps=3, eval_every=0, log_every=5)

    # ---- demo: 32 x 32 shapes -> 8 x 8 x 4 codes from one shared codebook of K = 32, both stages in 150 s
    # on 2 CPU cores. Measured on this budget: K = 32 reconstructs better than K = 256 after the same steps
    # (each code is updated more often) and its codes are far easier for a small prior to learn; 2-D
    # rotary positions let the prior reuse a shape learned at one place everywhere (lower val loss, clearer
    # shapes); a prior of width 128 learns as much per step as one of width 192 at half the cost. Encoder and
    # decoder widths (16, 32, 64) take about half the time per step of (32, 64, 128): in 57 s (one loaded
    # core) 327 steps reach 18.6 dB where 157 steps of the wider one reach 17.1 dB.
    demo_tokenizer = RQVAEConfig(
        image_size=32, channels=(16, 32, 64), latent_dim=64, codebook_size=32, depth=4, res_blocks=1
    )
    demo_prior = RQTransformerConfig(
        codebook_size=32,
        code_shape=demo_tokenizer.code_shape,
        num_classes=10,
        dim=128,
        heads=4,
        dim_head=32,
        spatial_layers=4,
        depth_layers=1,
        class_conditioning="film",
        spatial_rotary=True,
        class_dropout=0.1,
        # measured at this budget (same tokenizer, 800 steps): 1.196 nats per code with the individual code
        # embedding at each depth step, 1.232 with the paper's cumulative sums
        depth_input="individual",
    )
    # class accuracy of samples after 800 prior steps: 0.37 at cfg 3, 0.43 at 5, 0.41 at 8; 10 samples per class
    # (100 in all, ~3 s) keep its noise near +-0.04
    demo_recipe = RQRecipe(cfg_scale=5.0, samples_per_class=10)

    # ---- imagenet256: the paper's layout, 256 x 256 -> 8 x 8 x 4 codes (f = 32, K = 16384, shared), for GPUs
    paper_tokenizer = RQVAEConfig(
        image_size=256,
        channels=(64, 128, 128, 256, 256, 256),
        latent_dim=256,
        codebook_size=16_384,
        depth=4,
        res_blocks=2,
        dead_code_threshold=20,
    )
    paper_prior = RQTransformerConfig(
        codebook_size=16_384,
        code_shape=paper_tokenizer.code_shape,
        num_classes=1000,
        dim=512,
        heads=8,
        dim_head=64,
        spatial_layers=12,
        depth_layers=4,
        class_dropout=0.1,
        dropout=0.1,
    )
    paper_recipe = RQRecipe(
        image_size=256, eval_images=2_000, samples_per_class=1, grid_per_class=4, classifier_steps=20_000,
        classifier_width=64, top_k=2048, top_p=0.95, cfg_scale=None,
    )

    demo = _preset(
        "demo",
        "RQ-VAE (8 x 8 x 4 codes) then a class-conditional RQ-Transformer, on 32 x 32 shapes",
        SHAPES,
        2.5,
        demo_tokenizer,
        # steps: about what its ~57 s allow (550 took 41 s on one core of a lightly loaded machine), so the cosine
        # schedule anneals before the budget ends; time left over passes to the prior
        TrainSettings(
            steps=550, batch_size=16, lr=2e-3, weight_decay=0.0, warmup_steps=20, eval_every=0, log_every=10
        ),
        demo_prior,
        # measured on the same codes, equal images seen: batch 16 x 250 steps 1.27 nats per code (lr 4e-3: 1.29),
        # batch 32 x 125 steps 1.38, batch 8 x 500 steps 1.25 and the best class accuracy of samples (0.24) in
        # about the same time. On one core 900 steps took 84 s (lightly loaded machine; ~700 fit in 93 s under load)
        TrainSettings(steps=900, batch_size=8, lr=2e-3, warmup_steps=30, eval_every=0, log_every=20),
        demo_recipe,
        shares=(0.38, 0.62),
    )
    return {
        "tiny": _preset(
            "tiny",
            "smallest tokenizer and prior (16 x 16 shapes, 4 x 4 x 2 codes), for tests",
            "the embedded procedural shapes at 16 x 16 (2k train / 200 val)",
            0.1,
            tiny_tokenizer,
            tiny_settings,
            tiny_prior,
            tiny_settings,
            tiny_recipe,
            shares=(0.5, 0.5),
        ),
        "demo": demo,
        "demo-flat": replace(
            demo.replace_stage("prior", model_config=flat_baseline(demo_prior), description="FlatCodeLM baseline"),
            name="demo-flat",
            description="the demo's RQ-VAE then the equal-parameter flat transformer over all 8 x 8 x 4 codes",
        ),
        "imagenet256": _preset(
            "imagenet256",
            "the paper's 256 x 256 -> 8 x 8 x 4 layout (K = 16384, shared codebook), for GPUs with --data",
            "a user-supplied ImageNet-style folder (--data PATH: one sub-folder per class, or train/ and val/)",
            7 * 24 * 60.0,
            paper_tokenizer,
            TrainSettings(
                steps=300_000, batch_size=32, lr=4e-4, warmup_steps=2_000, weight_decay=0.0, eval_every=5_000,
                checkpoint_every=5_000, log_every=100,
            ),
            paper_prior,
            TrainSettings(
                steps=500_000, batch_size=64, lr=5e-4, warmup_steps=4_000, eval_every=10_000, checkpoint_every=10_000,
                log_every=100, ema_decay=0.9999,
            ),
            paper_recipe,
            shares=(0.5, 0.5),
        ),
    }
