"""The two priors over residual codes: causality in raster-depth order, cached == uncached decoding,
no ignored code, classifier-free guidance, bad input, parameter matching and analytic FLOPs."""

import dataclasses

import pytest
import torch

from quintet.bench import count_flops
from quintet.core import CheckpointError
from quintet.core.sampling import probabilities
from quintet.rqtransformer import (
    FlatCodeLM,
    FlatCodeLMConfig,
    RQTransformer,
    RQTransformerConfig,
    count_parameters,
    flat_baseline,
)

K = 11
TOL = 1e-5


def rq_config(code_shape=(2, 3, 3), num_classes=4, **overrides) -> RQTransformerConfig:
    fields = dict(codebook_size=K, dim=32, heads=2, dim_head=16, spatial_layers=2, depth_layers=2, class_dropout=0.2)
    fields.update(overrides)
    return RQTransformerConfig(code_shape=code_shape, num_classes=num_classes, **fields)


def make(config):
    torch.manual_seed(0)
    model = (RQTransformer if isinstance(config, RQTransformerConfig) else FlatCodeLM)(config).eval()
    # FiLM projections start at zero (a fresh model ignores them): give them weights so they matter
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "to_scale_shift" in name:
                parameter.normal_(std=0.05)
    return model


def logits_of(model, codes, class_ids):
    if isinstance(model, FlatCodeLM):
        return model.code_logits(codes, class_ids)
    return model(codes, class_ids)


VARIANTS = [
    pytest.param(dict(), id="cumulative-token"),
    pytest.param(dict(depth_input="individual"), id="individual-token"),
    pytest.param(dict(class_conditioning="film"), id="cumulative-film"),
    pytest.param(dict(shared_code_embedding=False, depth_input="individual"), id="per-depth-embedding"),
    pytest.param(dict(spatial_rotary=True, class_conditioning="film"), id="rotary-film"),
    pytest.param(dict(num_classes=0, class_dropout=0.0), id="unconditional"),
]
SHAPES = [(2, 3, 3), (1, 4, 1), (3, 1, 2), (1, 1, 4)]


def _perturbation_check(model, codes, class_ids):
    """Code i (raster-depth order) changed in copy i: logits of codes < i stay, code i + 1's move."""
    b, h, w, depth = codes.shape
    n = h * w * depth
    copies = codes.repeat(n, 1, 1, 1).flatten(1)
    index = torch.arange(n)
    copies[index, index] = (copies[index, index] + 1) % K
    copies = copies.view(n, h, w, depth)
    labels = None if class_ids is None else class_ids.repeat(n)
    with torch.no_grad():
        reference = logits_of(model, codes, class_ids).flatten(1, 3)[0]
        perturbed = logits_of(model, copies, labels).flatten(1, 3)
    for i in range(n):
        past = (perturbed[i, : i + 1] - reference[: i + 1]).abs().max()
        assert past <= 1e-6, f"changing code {i} moved the logits of code <= {i} by {past}"
        if i + 1 < n:  # not vacuous: the change reaches the next code's prediction
            assert (perturbed[i, i + 1] - reference[i + 1]).abs().max() > 1e-5, f"code {i} never reached code {i + 1}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("code_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rq_changing_a_code_never_changes_earlier_logits(variant, code_shape):
    config = rq_config(code_shape, **variant)
    model = make(config)
    codes = torch.randint(0, K, (1, *code_shape))
    class_ids = torch.tensor([2]) if config.num_classes else None
    _perturbation_check(model, codes, class_ids)


@pytest.mark.parametrize("num_classes", [0, 4])
@pytest.mark.parametrize("rotary", [False, True])
def test_flat_changing_a_code_never_changes_earlier_logits(num_classes, rotary):
    dropout = 0.2 if num_classes else 0.0
    config = flat_baseline(rq_config((2, 2, 3), num_classes=num_classes, class_dropout=dropout, spatial_rotary=rotary))
    model = make(config)
    codes = torch.randint(0, K, (1, 2, 2, 3))
    _perturbation_check(model, codes, torch.tensor([1]) if num_classes else None)


@pytest.mark.parametrize("variant", VARIANTS[:-1])  # the class-conditional ones
def test_rq_class_changes_every_logit(variant):
    config = rq_config(**variant)
    model = make(config)
    codes = torch.randint(0, K, (1, *config.code_shape))
    with torch.no_grad():
        a, b = model(codes, torch.tensor([0])), model(codes, torch.tensor([3]))
    assert (a - b).flatten(1, 3).abs().amax(dim=-1).min() > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_rq_cached_equals_uncached_at_every_step(variant):
    config = rq_config((3, 2, 4), **variant)
    model = make(config)
    class_ids = torch.tensor([0, 3, 1]) if config.num_classes else None
    size = None if config.num_classes else 3
    cached, cached_logits = model.generate(class_ids, batch_size=size, temperature=0.0, return_logits=True)
    uncached, uncached_logits = model.generate(
        class_ids, batch_size=size, temperature=0.0, use_cache=False, return_logits=True
    )
    assert torch.equal(cached, uncached)
    assert (cached_logits - uncached_logits).abs().max() <= TOL
    # and both are what the parallel (teacher-forced) forward gives for the sampled codes
    with torch.no_grad():
        assert (model(cached, class_ids) - cached_logits).abs().max() <= TOL
    # random sampling with the same seed draws the same codes too
    draws = [
        model.generate(class_ids, batch_size=size, top_k=5, generator=torch.Generator().manual_seed(3), use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(*draws)


@pytest.mark.parametrize("rotary", [False, True])
def test_flat_cached_equals_uncached(rotary):
    model = make(flat_baseline(rq_config((2, 2, 3), spatial_rotary=rotary)))
    class_ids = torch.tensor([1, 2])
    a = model.generate(class_ids, temperature=0.0)
    b = model.generate(class_ids, temperature=0.0, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 2, 2, 3)
    with torch.no_grad():  # greedy codes are the argmax of the teacher-forced logits
        assert torch.equal(model.code_logits(a, class_ids).argmax(-1), a)


def test_generated_codes_follow_the_codebook_and_sampling_options():
    model = make(rq_config())
    codes = model.generate(torch.tensor([0, 1, 2]), top_p=0.5, temperature=0.7, generator=torch.Generator())
    assert codes.dtype == torch.long and codes.shape == (3, *model.config.code_shape)
    assert 0 <= int(codes.min()) and int(codes.max()) < K
    # top_k=1 is greedy
    greedy = model.generate(torch.tensor([0, 1, 2]), temperature=0.0)
    assert torch.equal(model.generate(torch.tensor([0, 1, 2]), top_k=1, generator=torch.Generator()), greedy)


def test_loss_counts_every_code_including_code_zero():
    model = make(rq_config())
    codes = torch.randint(0, K, (4, *model.config.code_shape))
    codes.view(-1)[::3] = 0  # plenty of code-0 targets
    logits = model(codes).detach().requires_grad_()
    loss = model.loss(logits, codes)
    # the mean of -log p over every code, code 0 included
    log_probs = probabilities(logits, log=True)
    expected = -log_probs.gather(-1, codes[..., None]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    # changing only the code-0 targets changes the loss, and their logits receive gradient
    other = torch.where(codes == 0, torch.ones_like(codes), codes)
    assert not torch.allclose(model.loss(logits, other), loss)
    loss.backward()
    assert (logits.grad[codes == 0].abs().sum(-1) > 0).all()


def test_label_smoothing_is_applied():
    codes = torch.randint(0, K, (2, 2, 3, 3))
    plain = make(rq_config())
    smooth = make(rq_config(label_smoothing=0.1))
    with torch.no_grad():
        logits = plain(codes)
        assert not torch.allclose(plain.loss(logits, codes), smooth.loss(logits, codes))


@pytest.mark.parametrize("conditioning", ["token", "film"])
def test_cfg_scale_one_equals_conditional_sampling(conditioning):
    model = make(rq_config(class_conditioning=conditioning))
    class_ids = torch.tensor([0, 1, 2, 3])

    def draw(**guidance):
        return model.generate(class_ids, generator=torch.Generator().manual_seed(7), return_logits=True, **guidance)

    codes, logits = draw()
    guided_codes, guided_logits = draw(cfg_scale=1.0)
    assert torch.equal(guided_codes, codes) and torch.equal(guided_logits, logits)
    # guidance does something at other scales: the first code's logits (same history) move
    _, strong = draw(cfg_scale=4.0)
    assert (strong[:, 0, 0, 0] - logits[:, 0, 0, 0]).abs().max() > 1e-4


def test_training_mode_drops_classes_and_eval_mode_does_not():
    model = make(rq_config(class_dropout=0.5))
    codes = torch.randint(0, K, (64, *model.config.code_shape))
    class_ids = torch.randint(0, 4, (64,))
    with torch.no_grad():
        conditional = model(codes, class_ids)
        null = model(codes)
        assert torch.equal(model(codes, class_ids), conditional)  # eval: deterministic, no dropout
        model.train()
        torch.manual_seed(1)
        trained = model(codes, class_ids)
    dropped = (trained - null).flatten(1).abs().amax(-1) < 1e-6
    kept = (trained - conditional).flatten(1).abs().amax(-1) < 1e-6
    assert (dropped | kept).all() and 10 < int(dropped.sum()) < 54


def test_bad_input_names_the_argument():
    model = make(rq_config())
    codes = torch.randint(0, K, (2, *model.config.code_shape))
    with pytest.raises(ValueError, match="^codes: ids must lie in"):
        model(torch.full_like(codes, K))
    with pytest.raises(ValueError, match="^codes: expected shape"):
        model(codes[:, :1])
    with pytest.raises(TypeError, match="^codes:"):
        model(codes.float())
    with pytest.raises(ValueError, match="^class_ids: ids must lie in"):
        model(codes, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="^class_ids: ids must lie in"):
        model.generate(torch.tensor([-1]))
    with pytest.raises(ValueError, match="^class_ids: expected one class id per sample"):
        model(codes, torch.tensor([0]))
    with pytest.raises(ValueError, match="^class_ids: pass either"):
        model.generate(torch.tensor([0]), batch_size=1)
    with pytest.raises(ValueError, match="^batch_size:"):
        model.generate(batch_size=0)
    with pytest.raises(ValueError, match="^cfg_scale:"):
        model.generate(batch_size=2, cfg_scale=2.0)  # guidance needs classes to steer to
    with pytest.raises(ValueError, match="^temperature:"):
        model.generate(torch.tensor([0]), temperature=-1.0)
    unconditional = make(rq_config(num_classes=0, class_dropout=0.0))
    with pytest.raises(ValueError, match="^cfg_scale: classifier-free guidance needs a class-conditional"):
        unconditional.generate(batch_size=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match="^class_ids: this model is unconditional"):
        unconditional(codes, torch.tensor([0, 1]))
    no_dropout = make(rq_config(class_dropout=0.0))
    with pytest.raises(ValueError, match="^cfg_scale: this model was trained without class dropout"):
        no_dropout.generate(torch.tensor([0]), cfg_scale=2.0)
    flat = make(flat_baseline(rq_config()))
    with pytest.raises(ValueError, match="^ids: position 0 must hold a start token"):
        flat(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="^ids: positions after the start token"):
        flat(torch.tensor([[K, K]]))
    with pytest.raises(ValueError, match="^ids: expected 1 to"):
        flat(torch.full((1, flat.config.num_codes + 1), K))


@pytest.mark.parametrize(
    "field, value",
    [
        ("code_shape", (2, 3)),
        ("code_shape", (2, 0, 3)),
        ("codebook_size", 1),
        ("depth_input", "sum"),
        ("class_conditioning", "prefix"),
        ("class_dropout", 1.0),
        ("spatial_layers", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        rq_config(**{field: value})


def test_flat_baseline_matches_parameters():
    config = rq_config((4, 4, 4), dim=64, spatial_layers=4, depth_layers=2)
    rq, flat = RQTransformer(config), FlatCodeLM(flat_baseline(config))
    assert abs(count_parameters(flat) / count_parameters(rq) - 1) < 0.1
    assert flat.config.layers in (5, 6, 7)
    with pytest.raises(TypeError, match="^config:"):
        flat_baseline(flat.config)


@pytest.mark.parametrize(
    "config",
    [
        rq_config((3, 3, 4)),
        rq_config((2, 4, 2), class_conditioning="film"),
        flat_baseline(rq_config((2, 2, 4))),
    ],
    ids=["rq-token", "rq-film", "flat"],
)
def test_analytic_flops_match_the_counter(config):
    model = make(config).train()
    config = dataclasses.replace(config, class_dropout=0.0)
    codes = torch.randint(0, K, (3, *config.code_shape))
    class_ids = torch.tensor([0, 1, 2])

    def step():
        model.loss(logits_of(model, codes, class_ids), codes).backward()

    counted = count_flops(step)
    assert abs(model.flops_per_sample() * 3 / counted - 1) < 0.1, (model.flops_per_sample() * 3, counted)


@pytest.mark.parametrize(
    "config", [rq_config(class_conditioning="film"), flat_baseline(rq_config())], ids=["rq", "flat"]
)
def test_save_load_exact(config, tmp_path):
    model = make(config)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config == model.config
    codes = torch.randint(0, K, (2, *config.code_shape))
    class_ids = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(logits_of(model, codes, class_ids), logits_of(loaded, codes, class_ids))
    # a checkpoint of the other prior is refused with the library's clear error
    other = FlatCodeLM if isinstance(model, RQTransformer) else RQTransformer
    with pytest.raises(CheckpointError, match="holds a"):
        other.from_pretrained(tmp_path)


def test_flat_config_derives_its_vocabulary():
    config = FlatCodeLMConfig(codebook_size=K, code_shape=(2, 2, 4), num_classes=3)
    assert config.num_tokens == K + 4 and config.max_seq_len == 17
