"""A tiny language model and task for the Trainer / CLI tests (and the training benchmark).

Run as a script it is the ``quintet`` command with two toy systems registered ("toy" and "toy2",
whose checkpoints are of different model classes), so CLI subprocess tests and ``torchrun`` can
train something real in seconds. With $QUINTET_TEST_SPY set to a folder, each rank also records
which writers it called and dumps its final weights there (for the multi-process test).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quintet.core import PretrainedModel, Transformer
from quintet.registry import Preset, System, register
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


def lm_loss(module: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    logits = module(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    return loss, {}


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
    model_class = ToyLM

    def presets(self) -> dict[str, Preset]:
        settings = TrainSettings(steps=6, batch_size=4, warmup_steps=2, eval_every=3, checkpoint_every=3, log_every=2)
        common = dict(system=self.name, data="a generated pattern", settings=settings)
        return {
            "tiny": Preset(
                name="tiny",
                description="for tests",
                expected_minutes=0.1,
                model_config=self.model_class.config_class(),
                **common,
            ),
            "demo": Preset(
                name="demo",
                description="for the demo",
                expected_minutes=0.2,
                model_config=self.model_class.config_class(dim=48),
                **common,
            ),
        }

    def example_batch(self, model, *, batch_size, generator):
        return torch.randint(0, model.config.vocab, (batch_size, model.config.seq_len + 1), generator=generator)

    def loss(self, model, batch):
        return lm_loss(model, batch)

    def make_task(self, preset, *, data=None, settings=None) -> Task:
        if data is not None:
            raise ValueError("data: the toy system trains on a generated pattern only")
        return make_toy_task(settings or preset.settings, config=preset.model_config, model_class=self.model_class)


class OtherToySystem(ToySystem):
    name = "toy2"
    model_class = OtherToyLM


def install_spies(folder: Path) -> None:
    """Record, per rank, each call of the checkpoint / metrics writers and the final weights."""
    import quintet.training.progress as progress
    import quintet.training.trainer as trainer

    rank = os.environ.get("RANK", "0")
    folder.mkdir(parents=True, exist_ok=True)

    def note(what: str) -> None:
        with open(folder / f"rank{rank}-writes.txt", "a", encoding="utf-8") as handle:
            handle.write(what + "\n")

    original_write = trainer.write_checkpoint

    def write_checkpoint(*args, **kwargs):
        note("checkpoint")
        return original_write(*args, **kwargs)

    original_record = progress.RunLogger.record

    def record(self, event):
        if self.enabled:
            note("metrics")
        return original_record(self, event)

    original_fit, original_teardown = trainer.Trainer.fit, trainer.teardown_distributed
    running = {}

    def fit(self):
        running["trainer"] = self
        return original_fit(self)

    def teardown_distributed(context):
        weights = {}
        for key, value in running["trainer"].model.state_dict().items():
            # under FSDP each rank holds a shard (a DTensor): gather the whole tensor while the group lives
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            weights[key] = value.detach().cpu()
        torch.save(weights, folder / f"rank{rank}.pt")
        original_teardown(context)

    trainer.write_checkpoint = write_checkpoint
    progress.RunLogger.record = record
    trainer.Trainer.fit = fit
    trainer.teardown_distributed = teardown_distributed


if __name__ == "__main__":
    register(ToySystem())
    register(OtherToySystem())
    if os.environ.get("QUINTET_TEST_SPY"):
        install_spies(Path(os.environ["QUINTET_TEST_SPY"]))
    from quintet.cli import main

    sys.exit(main())
