"""Genie's presets: the recipe (data, evaluation, decoding) and the stages of each preset.

A preset trains up to three stages in order: ``tokenizer`` (frames -> tokens), optionally
``latent_actions`` (actions inferred from video), and ``dynamics`` (the world model over tokens,
given the tokenizer and, when it trains on inferred actions, the latent action model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from quintet.core.validation import check_int, check_number
from quintet.genie.config import GenieConfig, LatentActionConfig, TokenizerConfig
from quintet.genie.data import GameRecording
from quintet.registry import Preset, Stage
from quintet.training.task import TrainSettings

ACTION_SOURCES = ("true", "latent", "none")
BOXING = "Atari Boxing (ale-py's bundled ROM), recorded with held random actions, ring cropped, 64 x 64"


@dataclass(frozen=True, kw_only=True)
class GenieRecipe:
    """The Genie presets' own settings: what is recorded, how the world model is evaluated and played."""

    recording: GameRecording = field(default_factory=GameRecording)
    val_episodes: int = 1
    """recorded episodes held out for evaluation"""
    action_source: str = "true"
    """what the dynamics model is conditioned on: the recorded actions ('true'), the latent action
    model's codes ('latent': video without action labels), or nothing ('none': a plain video model)"""
    clip_frames: int = 8
    """frames per training clip of the dynamics model"""
    context_frames: int = 2
    """real frames given before an open-loop rollout"""
    rollout_frames: int = 6
    """imagined frames per rollout (the k of rollout_psnr_k)"""
    eval_clips: int = 32
    eval_frames: int = 256
    """held-out frames (tokenizer) or transitions (latent actions) per evaluation"""
    temperature: float = 0.0
    """sampling temperature of play and of the demo's animation (0: greedy)"""
    cfg_scale: float = 1.0
    """classifier-free guidance on actions when playing (1: none)"""

    def __post_init__(self) -> None:
        for name in ("val_episodes", "clip_frames", "context_frames", "rollout_frames", "eval_clips", "eval_frames"):
            check_int(getattr(self, name), name)
        if self.clip_frames < 2:
            raise ValueError(f"clip_frames: expected >= 2, got {self.clip_frames}")
        if self.action_source not in ACTION_SOURCES:
            raise ValueError(f"action_source: expected one of {ACTION_SOURCES}, got {self.action_source!r}")
        check_number(self.temperature, "temperature", low=0.0)
        check_number(self.cfg_scale, "cfg_scale", low=0.0)


def _stages(
    tokenizer: TokenizerConfig,
    dynamics: GenieConfig,
    settings: dict[str, TrainSettings],
    *,
    latent: LatentActionConfig | None,
    shares: dict[str, float],
    latent_actions_needed: bool,
) -> tuple[Stage, ...]:
    stages = [
        Stage(
            name="tokenizer",
            model_config=tokenizer,
            settings=settings["tokenizer"],
            description="VQ autoencoder: frames -> grids of discrete tokens",
            budget_share=shares["tokenizer"],
        )
    ]
    if latent is not None:
        stages.append(
            Stage(
                name="latent_actions",
                model_config=latent,
                settings=settings["latent_actions"],
                description="latent action model: a small action codebook from pairs of frames",
                budget_share=shares["latent_actions"],
            )
        )
    stages.append(
        Stage(
            name="dynamics",
            model_config=dynamics,
            settings=settings["dynamics"],
            description="world model: next frame's tokens from past tokens and the action taken",
            needs=("tokenizer", "latent_actions") if latent_actions_needed else ("tokenizer",),
            budget_share=shares["dynamics"],
        )
    )
    return tuple(stages)


def genie_presets(system: str) -> dict[str, Preset]:
    # ---------------------------------------------------------------- tiny: tests, seconds
    tiny_recording = GameRecording(episodes=3, max_steps=24, frame_size=16)
    tiny_tokenizer = TokenizerConfig(
        image_size=(16, 16), channels=(8, 16), res_blocks=1, codebook_size=32, codebook_dim=8
    )
    tiny_latent = LatentActionConfig(image_size=(16, 16), channels=(8, 16), num_latent_actions=4, action_dim=8)
    tiny_dynamics = GenieConfig(
        num_codes=32,
        token_grid=(4, 4),
        max_frames=4,
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
        num_actions=18,
        num_meta_tokens=1,
        action_dropout=0.2,
        action_loss_weight=0.1,
        maskgit_steps=2,
    )
    tiny_settings = TrainSettings(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=0, log_every=2)
    tiny = Preset(
        system=system,
        name="tiny",
        description="smallest tokenizer, latent action model and dynamics on 16 x 16 Boxing frames, for tests",
        data=BOXING.replace("64 x 64", "16 x 16, 3 episodes of 24 steps"),
        expected_minutes=0.2,
        recipe=GenieRecipe(
            recording=tiny_recording, clip_frames=4, context_frames=2, rollout_frames=2, eval_clips=4, eval_frames=16
        ),
        stages=_stages(
            tiny_tokenizer,
            tiny_dynamics,
            {name: tiny_settings for name in ("tokenizer", "latent_actions", "dynamics")},
            latent=tiny_latent,
            shares={"tokenizer": 1.0, "latent_actions": 1.0, "dynamics": 1.0},
            latent_actions_needed=False,
        ),
    )

    # ---------------------------------------------------------------- demo: 2 CPU cores, ~4 minutes
    # dead-code restarts: without them a fresh VQ collapses onto a handful of codes within 100 steps
    tokenizer = TokenizerConfig(
        channels=(32, 64, 128), res_blocks=1, codebook_size=512, codebook_dim=32, dead_code_threshold=10
    )
    latent = LatentActionConfig(channels=(16, 32, 64), num_latent_actions=8, action_dim=16)
    dynamics = GenieConfig(
        num_codes=tokenizer.codebook_size,
        token_grid=tokenizer.token_grid,
        max_frames=8,
        dim=128,
        depth=3,  # a decoding step per token: 3 layers play 13 imagined frames/s on 2 cores, 4 layers 10
        heads=4,
        dim_head=32,
        num_actions=18,
        num_meta_tokens=4,
        objective="autoregressive",
        action_dropout=0.1,
        action_loss_weight=0.1,
        maskgit_steps=6,
    )
    # step counts about what 2 cores train in each stage's share of the demo's time budget, so the
    # learning rate has decayed when the budget ends (the world model: delta_psnr 0.23 dB at step 233
    # of a 300-step schedule vs 0.03 at step 273 of a 5000-step one; 0.62 with 3 layers, 330 steps).
    # The latent action model needs ~600 steps: at 300 its 8 codes had collapsed onto 1 (NMI 0), at 600
    # all 8 were in use (NMI 0.12)
    fast = dict(weight_decay=0.01, eval_every=0, checkpoint_every=0)
    demo_settings = {
        "tokenizer": TrainSettings(steps=800, batch_size=16, lr=2e-3, warmup_steps=20, log_every=20, **fast),
        "latent_actions": TrainSettings(steps=650, batch_size=32, lr=2e-3, warmup_steps=20, log_every=20, **fast),
        "dynamics": TrainSettings(steps=310, batch_size=16, lr=2e-3, warmup_steps=30, log_every=10, **fast),
    }
    demo = Preset(
        system=system,
        name="demo",
        description="record Boxing, train tokenizer, latent actions and a world model, play it at 64 x 64",
        data=BOXING,
        expected_minutes=4.0,
        recipe=GenieRecipe(clip_frames=6),
        stages=_stages(
            tokenizer,
            dynamics,
            demo_settings,
            latent=latent,
            shares={"tokenizer": 0.22, "latent_actions": 0.18, "dynamics": 0.6},
            latent_actions_needed=False,
        ),
    )

    # ---------------------------------------------------------------- latent: trained on inferred actions
    latent_dynamics = replace(dynamics, num_actions=latent.num_latent_actions)
    latent_preset = Preset(
        system=system,
        name="latent",
        description="Genie 1's setting: the dynamics model learns from latent actions (no action labels used)",
        data=BOXING,
        expected_minutes=8.0,
        recipe=GenieRecipe(action_source="latent", clip_frames=6),
        stages=_stages(
            tokenizer,
            latent_dynamics,
            {**demo_settings, "latent_actions": replace(demo_settings["latent_actions"], steps=4000)},
            latent=latent,
            shares={"tokenizer": 0.3, "latent_actions": 0.2, "dynamics": 0.5},
            latent_actions_needed=True,
        ),
    )

    # ---------------------------------------------------------------- gpu: a larger world model
    gpu_tokenizer = replace(tokenizer, channels=(64, 128, 256), res_blocks=2, codebook_size=1024, temporal_convs=True)
    gpu_dynamics = replace(
        dynamics,
        num_codes=gpu_tokenizer.codebook_size,
        max_frames=16,
        dim=384,
        depth=8,
        heads=6,
        dim_head=64,
        num_meta_tokens=16,
        objective="maskgit",  # Genie's parallel decoding: a GPU has the compute its two streams cost in training
        maskgit_steps=8,
    )
    gpu = Preset(
        system=system,
        name="gpu",
        description="a 15M-parameter world model on 32 recorded Boxing episodes, 16-frame context, for one GPU",
        data=BOXING.replace("held random", "32 episodes of held random"),
        expected_minutes=120.0,
        recipe=GenieRecipe(
            recording=GameRecording(episodes=32, max_steps=1780),
            val_episodes=2,
            clip_frames=16,
            context_frames=4,
            rollout_frames=12,
            eval_clips=128,
            eval_frames=1024,
        ),
        stages=_stages(
            gpu_tokenizer,
            gpu_dynamics,
            {
                "tokenizer": TrainSettings(steps=30_000, batch_size=64, lr=1e-3, warmup_steps=500, eval_every=2000),
                "latent_actions": TrainSettings(
                    steps=20_000, batch_size=64, lr=1e-3, warmup_steps=500, eval_every=2000
                ),
                "dynamics": TrainSettings(
                    steps=100_000, batch_size=32, lr=3e-4, warmup_steps=2000, eval_every=5000, ema_decay=0.999
                ),
            },
            latent=latent,
            shares={"tokenizer": 0.3, "latent_actions": 0.1, "dynamics": 0.6},
            latent_actions_needed=False,
        ),
    )
    return {"tiny": tiny, "demo": demo, "latent": latent_preset, "gpu": gpu}
