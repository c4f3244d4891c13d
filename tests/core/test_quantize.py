import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from quintet.core import PretrainedModel, QuantizerOutput, ResidualQuantizer, VectorQuantizer

WORKER = Path(__file__).with_name("quantize_worker.py")


def fit(quantizer: nn.Module, data: torch.Tensor, steps: int, batch: int = 256, seed: int = 0) -> QuantizerOutput:
    """Training forwards over random batches of ``data``; returns the last output, leaves the quantizer in eval."""
    generator = torch.Generator().manual_seed(seed)
    quantizer.train()
    for _ in range(steps):
        out = quantizer(data[torch.randint(0, len(data), (batch,), generator=generator)])
    quantizer.eval()
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_residual_error_falls_with_depth_on_a_fitted_codebook(shared):
    data = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))
    rq = ResidualQuantizer(8, 32, 4, shared_codebook=shared)
    fit(rq, data, steps=30)
    partial = rq.decode(rq.encode(data), cumulative=True)  # (n, D, d)
    errors = (partial - data[:, None]).pow(2).mean((0, 2))
    assert torch.all(errors[1:] < errors[:-1]), errors
    assert errors[-1] < 0.5 * data.var()
    assert torch.allclose(partial[:, -1], rq.decode(rq.encode(data)), atol=1e-6)


def test_straight_through_gradient_is_the_identity_and_reaches_projections():
    x = torch.randn(4, 5, 8, requires_grad=True)
    upstream = torch.randn(4, 5, 8)
    vq = VectorQuantizer(8, 16)
    vq.train()
    (vq(x).quantized * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)

    projected = ResidualQuantizer(8, 16, 2, codebook_dim=4)
    projected.train()
    x.grad = None
    out = projected(x)
    (out.quantized.sum() + out.loss).backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert projected.project_in.weight.grad.abs().sum() > 0
    assert projected.project_out.weight.grad.abs().sum() > 0


def test_rotation_trick_keeps_the_forward_and_rotates_the_gradient():
    x = torch.randn(64, 8)
    straight = ResidualQuantizer(8, 16, 2, codebook_init="normal", commitment_weight=0.0)
    rotated = ResidualQuantizer(8, 16, 2, codebook_init="normal", commitment_weight=0.0, rotation_trick=True)
    rotated.load_state_dict(straight.state_dict())
    outputs, grads = [], []
    for quantizer in (straight, rotated):
        quantizer.eval()
        e = x.clone().requires_grad_()
        out = quantizer(e)
        q = out.quantized.detach()
        # upstream gradient along q: the rotation maps ê to q̂, so Rᵀ q̂ = ê and the gradient is λ ê
        (out.quantized * (q / q.norm(dim=-1, keepdim=True))).sum().backward()
        outputs.append(out)
        grads.append(e.grad)
    assert torch.equal(outputs[0].quantized, outputs[1].quantized)
    assert torch.equal(outputs[0].codes, outputs[1].codes)
    assert not torch.allclose(grads[0], grads[1], atol=1e-3)
    q = outputs[0].quantized
    scale = q.norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True)
    assert torch.allclose(grads[1], scale * x / x.norm(dim=-1, keepdim=True), atol=1e-5)


def test_dead_code_is_restarted_from_current_inputs():
    data = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    vq = VectorQuantizer(8, 8, dead_code_threshold=2)
    fit(vq, data, steps=1)
    with torch.no_grad():  # move code 3 (and its EMA statistics) far away: nothing will pick it
        vq.codebook[3] = vq.books[0].ema_sum[3] = 1e3
        vq.books[0].ema_count[3] = 1.0
    vq.train()
    first = vq(data)
    assert first.metrics["dead_codes"] == 0 and vq.books[0].unused_updates[3] == 1
    second = vq(data)
    assert second.metrics["dead_codes"] == 1  # found at its 2nd unused update, and restarted
    assert vq.books[0].unused_updates[3] == 0
    assert (data == vq.codebook[3]).all(-1).any()  # re-seeded with one of this batch's vectors
    assert vq.books[0].ema_count[3] == 1 and torch.equal(vq.books[0].ema_sum[3], vq.codebook[3])


def test_data_init_takes_codes_from_the_first_training_batch_and_eval_never_changes_state():
    data = torch.randn(64, 8)
    vq = VectorQuantizer(8, 16)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(data)
    vq.encode(data)
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    assert not vq.books[0].initialized
    vq.train()
    with torch.no_grad():
        vq.books[0].initialize(data)
    assert vq.books[0].initialized
    assert (vq.codebook[:, None] == data).all(-1).any(-1).all()  # each code is an input vector
    assert len(set(map(tuple, vq.codebook.tolist()))) == 16  # drawn without replacement


def _spawn_worker(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=180, env=env)


def test_ema_and_restarts_under_two_processes_match_one_process_on_the_concatenated_inputs(tmp_path):
    done = _spawn_worker(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("quantize_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(worker.WORLD)]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # identical codebooks on every rank

    models = worker.build()
    dead = worker.train(models, lambda step: torch.cat([worker.inputs(step, r) for r in range(worker.WORLD)]))
    assert dead == ranks[0]["dead"]
    assert sum(dead["rq"]) > 0 and sum(dead["vq"]) > 0  # restarts happened on the way
    for key, value in worker.state(models).items():
        distributed = ranks[0]["state"][key]
        if value.is_floating_point():
            assert torch.allclose(value, distributed, atol=1e-5), key
        else:
            assert torch.equal(value, distributed), key


def test_cosine_codes_are_unit_vectors_picked_by_angle():
    data = torch.randn(512, 8)
    vq = VectorQuantizer(8, 16, distance="cosine")
    fit(vq, data, steps=5)
    assert torch.allclose(vq.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)
    codes = vq.encode(data)
    similarity = nn.functional.normalize(data, dim=-1) @ vq.codebook.T
    assert torch.equal(codes, similarity.argmax(-1))
    assert torch.equal(vq.encode(data * 7.5), codes)  # only the direction matters
    out = vq(data)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(512), atol=1e-5)
    with pytest.raises(ValueError, match="distance"):
        ResidualQuantizer(8, 16, 2, distance="cosine")


def test_shared_and_per_depth_codebooks():
    data = torch.randn(256, 8)
    shared = ResidualQuantizer(8, 16, 3)
    per_depth = ResidualQuantizer(8, 16, 3, shared_codebook=False)
    fit(shared, data, steps=3)
    fit(per_depth, data, steps=3)
    assert len(shared.books) == 1 and len(per_depth.books) == 3
    assert shared.codebooks.shape == per_depth.codebooks.shape == (3, 16, 8)
    assert torch.equal(shared.codebooks[0], shared.codebooks[2])
    assert not torch.equal(per_depth.codebooks[0], per_depth.codebooks[2])
    codes = per_depth.encode(data)
    manual = sum(per_depth.codebooks[d][codes[:, d]] for d in range(3))
    assert torch.allclose(per_depth.decode(codes), manual, atol=1e-6)
    metrics = per_depth(data).metrics
    assert {"dead_codes_d0", "codebook_usage_d2", "perplexity_d1"} <= metrics.keys()
    assert "dead_codes_d0" not in shared(data).metrics


@pytest.mark.parametrize("projected", [False, True])
def test_encode_decode_round_trip_matches_forward(projected):
    data = torch.randn(2, 6, 8)
    kwargs = {"codebook_dim": 4} if projected else {}
    vq, rq = VectorQuantizer(8, 16, **kwargs), ResidualQuantizer(8, 16, 3, **kwargs)
    for quantizer in (vq, rq):
        fit(quantizer, data.reshape(-1, 8), steps=2, batch=12)
        out = quantizer(data)
        codes = quantizer.encode(data)
        assert codes.dtype == torch.int64 and torch.equal(codes, out.codes)
        assert torch.allclose(quantizer.decode(codes), out.quantized, atol=1e-6)
        assert out.loss.ndim == 0 and all(v.ndim == 0 and not v.requires_grad for v in out.metrics.values())
    assert vq.encode(data).shape == (2, 6) and rq.encode(data).shape == (2, 6, 3)
    codes = rq.encode(data)
    assert rq.embed(codes).shape == rq.decode(codes, cumulative=True).shape == (2, 6, 3, 8)
    assert torch.allclose(rq.embed(codes).sum(-2), rq.decode(codes), atol=1e-6)
    assert torch.allclose(rq.decode(codes, cumulative=True)[..., -1, :], rq.decode(codes), atol=1e-6)


def test_learned_codebook_gets_gradients_ema_codebook_does_not():
    data = torch.randn(64, 8)
    learned, ema = VectorQuantizer(8, 16, ema_decay=None), VectorQuantizer(8, 16)
    assert isinstance(learned.codebook, nn.Parameter) and not isinstance(ema.codebook, nn.Parameter)
    learned.train()
    learned(data).loss.backward()
    assert learned.codebook.grad.abs().sum() > 0
    ema.train()
    before = ema(data).quantized.detach()
    after = ema(data).quantized.detach()
    assert not torch.equal(before, after)  # the EMA moved the codes between the two steps


def test_distances_ignore_autocast():
    data = torch.randn(128, 8)
    rq = ResidualQuantizer(8, 32, 2)
    fit(rq, data, steps=2, batch=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rq(data)
    assert torch.equal(out.codes, rq.encode(data)) and out.quantized.dtype == torch.float32


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda vq, rq: vq(torch.randn(3, 7)), ValueError, "x"),
        (lambda vq, rq: rq(torch.randn(3, 8).long()), TypeError, "x"),
        (lambda vq, rq: vq.decode(torch.tensor([16])), ValueError, "codes"),
        (lambda vq, rq: vq.decode(torch.tensor([-1])), ValueError, "codes"),
        (lambda vq, rq: vq.decode(torch.tensor([1.0])), TypeError, "codes"),
        (lambda vq, rq: rq.decode(torch.zeros(4, 2, dtype=torch.long)), ValueError, "codes"),
        (lambda vq, rq: rq.embed(torch.zeros(4, 3)), TypeError, "codes"),
        (lambda vq, rq: VectorQuantizer(8, 0), ValueError, "codebook_size"),
        (lambda vq, rq: VectorQuantizer(8, 4, distance="manhattan"), ValueError, "distance"),
        (lambda vq, rq: VectorQuantizer(8, 4, ema_decay=1.0), ValueError, "ema_decay"),
        (lambda vq, rq: ResidualQuantizer(8, 4, 0), ValueError, "depth"),
        (lambda vq, rq: VectorQuantizer(8, 4, dead_code_threshold=-1), ValueError, "dead_code_threshold"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=f"^{name}"):
        call(VectorQuantizer(8, 16), ResidualQuantizer(8, 16, 3))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyTokenizerConfig:
    dim: int = 8
    codebook_size: int = 16
    depth: int = 2


class TinyTokenizer(PretrainedModel):
    config_class = TinyTokenizerConfig

    def __init__(self, config: TinyTokenizerConfig):
        super().__init__(config)
        self.encoder = nn.Linear(config.dim, config.dim)
        self.quantizer = ResidualQuantizer(config.dim, config.codebook_size, config.depth, dead_code_threshold=2)

    def forward(self, x):
        return self.quantizer(self.encoder(x))


def test_save_load_keeps_ema_buffers_exactly_and_training_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = TinyTokenizer(TinyTokenizerConfig())
    data = torch.randn(64, 8)
    model.train()
    for _ in range(3):
        model(data)
    model.save_pretrained(tmp_path)
    loaded = TinyTokenizer.from_pretrained(tmp_path)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert {"quantizer.books.0.ema_count", "quantizer.books.0.ema_sum", "quantizer.books.0.unused_updates"} <= set(
        state
    )
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    model.train(), loaded.train()
    assert torch.equal(model(data).quantized, loaded(data).quantized)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
