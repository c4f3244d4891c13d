"""A tiny language model and task for the Trainer / CLI tests.

Run as a script it is the ``quintet`` command with three toy systems registered ("toy" and "toy2",
whose checkpoints are of different model classes, and "toy-staged", two stages of two model classes
where the second distils the first), so CLI subprocess tests and ``torchrun`` can train something
real in seconds. With $QUINTET_TEST_SPY set to a folder, each rank also records which writers it
called and dumps its final weights there (for the multi-process test); with $QUINTET_TEST_KILL_AT
set to ``STAGE:STEP[:SIGNAL]`` the process sends itself SIGKILL (or SIGNAL) after that step of that stage.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quintet.core import PretrainedModel, Transformer
from quintet.registry import Preset, Stage, System, TaskRequest, register
from quintet.training.task import Task, TrainSettings


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    vocab: int = 16
    dim: int = 32
    depth: int = 2
    heads: int = 2
    dim_head: int = 16
    seq_len: int = 16
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("vocab", "dim", "depth", "heads", "dim_head", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")


class ToyLM(PretrainedModel):
    """Causal LM: ``tokens (b, n) -> logits (b, n, vocab)``."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.transformer = Transformer(
            config.dim,
            config.depth,
            heads=config.heads,
            dim_head=config.dim_head,
            causal=True,
            rotary=True,
            dropout=config.dropout,
        )
        self.head = nn.Linear(config.dim, config.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.embed(tokens)))


@dataclass(frozen=True, kw_only=True)
class OtherToyConfig(ToyConfig):
    pass


class OtherToyLM(ToyLM):
    config_class = OtherToyConfig


def lm_loss(module: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = module(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    accuracy = (logits.detach().argmax(-1) == tokens[:, 1:]).float().mean()
    return loss, {"accuracy": accuracy}


def pattern_batch(index: int, *, batch_size: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Batch ``index``: rows of the learnable pattern ``t -> (3 t + 1) mod vocab`` from random starts."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start = torch.randint(0, vocab, (batch_size, 1), generator=generator)
    tokens = [start]
    for _ in range(seq_len):
        tokens.append((3 * tokens[-1] + 1) % vocab)
    return torch.cat(tokens, dim=1)


def make_toy_task(
    settings: TrainSettings | None = None, *, config: ToyConfig | None = None, model_class: type = ToyLM
) -> Task:
    settings = settings or TrainSettings(steps=8, batch_size=4, warmup_steps=2, eval_every=0, log_every=2)
    config = config or ToyConfig()
    torch.manual_seed(settings.seed)
    model = model_class(config)
    shape = dict(batch_size=settings.batch_size, seq_len=config.seq_len, vocab=config.vocab, seed=settings.seed)
    held_out = pattern_batch(-1, **{**shape, "batch_size": 8})

    def evaluate(module: nn.Module) -> dict[str, float]:
        loss, _ = lm_loss(module, held_out.to(next(module.parameters()).device))
        return {"val_loss": float(loss)}

    def sample(module: nn.Module) -> dict[str, str]:
        tokens = held_out[:1, :4].to(next(module.parameters()).device)
        for _ in range(8):
            tokens = torch.cat([tokens, module(tokens)[:, -1:].argmax(-1)], dim=1)
        return {"text": " ".join(str(t) for t in tokens[0].tolist())}

    return Task(
        model=model,
        loss=lm_loss,
        train_batch=lambda index: pattern_batch(index, **shape),
        settings=settings,
        evaluate=evaluate,
        sample=sample,
        batch_tokens=lambda batch: batch.shape[0] * (batch.shape[1] - 1),
    )


class ToySystem(System):
    name = "toy"
    description = "A tiny causal LM on a modular pattern."
    model_classes = (ToyLM,)
    metric_meanings = {"val_loss": "cross-entropy on held-out pattern rows"}

    def presets(self) -> dict[str, Preset]:
        settings = TrainSettings(steps=6, batch_size=4, warmup_steps=2, eval_every=3, checkpoint_every=3, log_every=2)
        config_class = self.model_classes[0].config_class
        common = dict(system=self.name, data="a generated pattern")
        return {
            "tiny": Preset(
                name="tiny",
                description="for tests",
                expected_minutes=0.1,
                stages=(Stage(model_config=config_class(), settings=settings),),
                **common,
            ),
            "demo": Preset(
                name="demo",
                description="for the demo",
                expected_minutes=0.2,
                stages=(Stage(model_config=config_class(dim=48), settings=settings),),
                **common,
            ),
        }

    def example_batch(self, model, *, batch_size, generator):
        return torch.randint(0, model.config.vocab, (batch_size, model.config.seq_len + 1), generator=generator)

    def generate(self, model, batch, *, use_cache):
        tokens = batch[:, :4]
        for _ in range(4):  # the toy LM has no cache: both ways recompute
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
        return tokens

    def make_task(self, request: TaskRequest) -> Task:
        if request.data is not None:
            raise ValueError("data: the toy system trains on a generated pattern only")
        model_class = self.model_class(request.stage.model_config)
        task = make_toy_task(request.settings, config=request.stage.model_config, model_class=model_class)
        if request.model is not None:
            task.model = request.model
        return task


class OtherToySystem(ToySystem):
    name = "toy2"
    model_classes = (OtherToyLM,)


def distill_loss(teacher: nn.Module):
    """Stage 2 of the staged toy: next-token cross-entropy plus KL to the trained stage-1 model's predictions."""

    def loss(module: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = module(tokens[:, :-1])
        with torch.no_grad():
            targets = teacher(tokens[:, :-1]).log_softmax(-1)
        ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        kl = F.kl_div(logits.log_softmax(-1), targets, log_target=True, reduction="batchmean")
        return ce + kl, {"kl": kl.detach()}

    return loss


class StagedToySystem(System):
    """Two stages of two model classes: ``first`` (a ToyLM) trains on the pattern, ``second`` (an
    OtherToyLM) distils it."""

    name = "toy-staged"
    description = "Two toy stages: a pattern LM, then a second LM that distils it."
    model_classes = (ToyLM, OtherToyLM)

    def presets(self) -> dict[str, Preset]:
        settings = TrainSettings(steps=6, batch_size=4, warmup_steps=2, eval_every=3, checkpoint_every=2, log_every=1)
        stages = (
            Stage(name="first", model_config=ToyConfig(), settings=settings),
            Stage(
                name="second",
                model_config=OtherToyConfig(dim=24),
                settings=replace(settings, steps=5, lr=1e-3),
                needs=("first",),
            ),
        )
        common = dict(system=self.name, data="a generated pattern", expected_minutes=0.1, stages=stages)
        return {
            "tiny": Preset(name="tiny", description="two toy stages", **common),
            "demo": Preset(name="demo", description="two toy stages for the demo", **common),
        }

    def example_batch(self, model, *, batch_size, generator):
        return torch.randint(0, model.config.vocab, (batch_size, model.config.seq_len + 1), generator=generator)

    def make_task(self, request: TaskRequest) -> Task:
        stage = request.stage
        task = make_toy_task(
            request.settings, config=stage.model_config, model_class=self.model_class(stage.model_config)
        )
        if stage.name == "second":
            task.loss = distill_loss(request.inputs["first"])
        return task


def install_spies(folder: Path) -> None:
    """Record, per rank, each call of the checkpoint / metrics writers and the final weights."""
    import quintet.training.pipeline as pipeline
    import quintet.training.progress as progress
    import quintet.training.state as state
    import quintet.training.trainer as trainer

    rank = os.environ.get("RANK", "0")
    folder.mkdir(parents=True, exist_ok=True)

    def note(what: str) -> None:
        with open(folder / f"rank{rank}-writes.txt", "a", encoding="utf-8") as handle:
            handle.write(what + "\n")

    original_write, original_commit = state.write_checkpoint, state.commit_checkpoint

    def write_checkpoint(*args, **kwargs):
        note("checkpoint")
        return original_write(*args, **kwargs)

    def commit_checkpoint(*args, **kwargs):  # a sharded checkpoint: every rank writes, rank 0 commits
        note("checkpoint")
        return original_commit(*args, **kwargs)

    original_record = progress.RunLogger.record

    def record(self, event):
        if self.enabled:
            note("metrics")
        return original_record(self, event)

    original_fit, original_teardown = trainer.Trainer.fit, pipeline.teardown_distributed
    running = {}

    def fit(self):
        running["trainer"] = self
        return original_fit(self)

    def teardown_distributed(context, **options):
        weights = {}
        for key, value in running["trainer"].model.state_dict().items():
            # under FSDP each rank holds a shard (a DTensor): gather the whole tensor while the group lives
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            weights[key] = value.detach().cpu()
        torch.save(weights, folder / f"rank{rank}.pt")
        original_teardown(context, **options)

    state.write_checkpoint = write_checkpoint
    state.commit_checkpoint = commit_checkpoint
    progress.RunLogger.record = record
    trainer.Trainer.fit = fit
    pipeline.teardown_distributed = teardown_distributed


def install_kill(stage: str, step: int, signum: int = signal.SIGKILL) -> None:
    """Send this process ``signum`` after optimizer step ``step`` of stage ``stage`` (a crash or a preemption)."""
    import quintet.training.pipeline as pipeline

    original = pipeline.make_task

    def make_task(system, preset, stage_, *args, **kwargs):
        task = original(system, preset, stage_, *args, **kwargs)
        if stage_.name == stage:
            task.after_step = lambda done: os.kill(os.getpid(), signum) if done == step else None
        return task

    pipeline.make_task = make_task


if __name__ == "__main__":
    register(ToySystem())
    register(OtherToySystem())
    register(StagedToySystem())
    if os.environ.get("QUINTET_TEST_SPY"):
        install_spies(Path(os.environ["QUINTET_TEST_SPY"]))
    if os.environ.get("QUINTET_TEST_KILL_AT"):  # STAGE:STEP[:SIGNAL]
        kill_stage, kill_step, *name = os.environ["QUINTET_TEST_KILL_AT"].split(":")
        install_kill(kill_stage, int(kill_step), getattr(signal, name[0]) if name else signal.SIGKILL)
    from quintet.cli import main

    sys.exit(main())
