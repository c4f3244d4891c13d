import dataclasses
import math

import pytest
import torch

from quintet.hourglass import (
    FlatConfig,
    FlatLM,
    HourglassConfig,
    HourglassLM,
    HourglassTransformer,
    count_parameters,
    flat_baseline,
)

TOL = 1e-5
VOCAB = 19
LENGTH = 23  # divisible by none of 2, 3, 4, 6

LEVELS = {
    "k2": dict(depth=(1, 1, 1), shorten_factor=2),
    "k3": dict(depth=(1, 2, 1), shorten_factor=3),
    "k4": dict(depth=(1, 1, 1), shorten_factor=4),
    "k2x3": dict(depth=(1, (1, 1, 1), 1), shorten_factor=(2, 3)),
}
CONFIGS = [
    pytest.param(level, resampling, attn, id=f"{name}-{resampling}-{'attn' if attn else 'noattn'}")
    for name, level in LEVELS.items()
    for resampling in ("naive", "linear")
    for attn in (True, False)
]


def make_lm(level, resampling="naive", attn_resampling=True, **overrides) -> HourglassLM:
    torch.manual_seed(0)
    config = HourglassConfig(
        num_tokens=VOCAB,
        dim=32,
        heads=2,
        dim_head=16,
        max_seq_len=64,
        resampling=resampling,
        attn_resampling=attn_resampling,
        **level,
        **overrides,
    )
    return HourglassLM(config).eval()


def perturbed_copies(ids: torch.Tensor) -> torch.Tensor:
    """Row t is ``ids[0]`` with token t changed: ``(n, n)``."""
    n = ids.shape[1]
    copies = ids[:1].repeat(n, 1)
    positions = torch.arange(n)
    copies[positions, positions] = (copies[positions, positions] + 1) % VOCAB
    return copies


@pytest.mark.parametrize("level, resampling, attn", CONFIGS)
@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_changing_a_token_never_changes_earlier_logits(level, resampling, attn, positions):
    model = make_lm(level, resampling, attn, positions=positions)
    ids = torch.randint(0, VOCAB, (1, LENGTH))
    with torch.no_grad():
        reference = model(ids)[0]
        perturbed = model(perturbed_copies(ids))
    for t in range(LENGTH):
        past = (perturbed[t, :t] - reference[:t]).abs().max() if t else torch.tensor(0.0)
        assert past <= 1e-6, f"token {t} changed the logits of an earlier position by {past}"
        # the property is not vacuous: the changed token does reach its own and later positions
        assert (perturbed[t, t:] - reference[t:]).abs().max() > 1e-4


@pytest.mark.parametrize("level, resampling, attn", CONFIGS)
def test_non_causal_padding_never_changes_real_outputs(level, resampling, attn):
    torch.manual_seed(0)
    model = HourglassTransformer(
        32, heads=2, dim_head=16, causal=False, resampling=resampling, attn_resampling=attn, **level
    ).eval()
    x = torch.randn(3, LENGTH, 32)
    mask = torch.rand(3, LENGTH) < 0.6
    mask[:, 0] = True
    mask[2, 15:] = False  # trailing padding, the common case
    noise = torch.randn_like(x) * 3
    with torch.no_grad():
        clean = model(x, mask=mask)
        noisy = model(torch.where(mask[..., None], x, noise), mask=mask)
        unmasked = model(x)
    assert (clean - noisy)[mask].abs().max() <= 1e-5
    # padding does matter when not masked: the test can fail
    assert (clean - unmasked)[mask].abs().max() > 1e-4


def decode_in_chunks(model, ids, chunks):
    cache = model.new_cache()
    outputs, start = [], 0
    with torch.no_grad():
        for size in chunks:
            outputs.append(model(ids[:, start : start + size], cache=cache))
            start += size
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("level, resampling, attn", CONFIGS)
def test_cached_decoding_logits_equal_full_forward(level, resampling, attn):
    model = make_lm(level, resampling, attn)
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        full = model(ids)
    stepwise = decode_in_chunks(model, ids, [1] * LENGTH)
    assert (stepwise - full).abs().max() <= TOL
    prefilled = decode_in_chunks(model, ids, [7, 1, 1, 5, 2, 1, 6])
    assert (prefilled - full).abs().max() <= TOL


@pytest.mark.parametrize("level, resampling, attn", CONFIGS)
def test_greedy_cached_and_uncached_generation_are_identical(level, resampling, attn):
    model = make_lm(level, resampling, attn)
    prompt = torch.randint(0, VOCAB, (2, 5))
    cached = model.generate(prompt, 20, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)


def test_sampled_generation_is_reproducible_and_equal_with_and_without_cache():
    model = make_lm(LEVELS["k2x3"])
    prompt = torch.randint(0, VOCAB, (2, 4))
    runs = [
        model.generate(prompt, 16, top_k=8, top_p=0.9, generator=torch.Generator().manual_seed(1), use_cache=cache)
        for cache in (True, False, True)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_flat_lm_cached_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = FlatLM(FlatConfig(num_tokens=VOCAB, dim=32, depth=2, heads=2, dim_head=16, max_seq_len=64)).eval()
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        full = model(ids)
    assert (decode_in_chunks(model, ids, [1] * LENGTH) - full).abs().max() <= TOL
    prompt = ids[:, :6]
    cached = model.generate(prompt, 10, temperature=0.0)
    assert torch.equal(cached, model.generate(prompt, 10, temperature=0.0, use_cache=False))


def test_flat_baseline_matches_the_parameter_count():
    config = HourglassConfig(num_tokens=256, dim=64, depth=(2, 4, 2), shorten_factor=3, heads=4, dim_head=16)
    flat = flat_baseline(config)
    hourglass_params = count_parameters(HourglassLM(config))
    one_layer = count_parameters(FlatLM(dataclasses.replace(flat, depth=2))) - count_parameters(
        FlatLM(dataclasses.replace(flat, depth=1))
    )
    assert (flat.dim, flat.heads, flat.dim_head) == (64, 4, 16)
    assert abs(count_parameters(FlatLM(flat)) - hourglass_params) <= one_layer / 2


def test_save_load_round_trip_reproduces_logits(tmp_path):
    model = make_lm(LEVELS["k2x3"], "linear")
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    model.save_pretrained(tmp_path)
    loaded = HourglassLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize(
    "ids, argument",
    [
        (torch.tensor([[0, 1, VOCAB]]), "ids"),
        (torch.tensor([[-1, 1]]), "ids"),
        (torch.zeros(1, 4), "ids"),
        (torch.zeros(1, 4, dtype=torch.bool), "ids"),
        (torch.zeros(1, 0, dtype=torch.long), "ids"),
        (torch.zeros(1, 65, dtype=torch.long), "ids"),
    ],
)
def test_bad_ids_raise_value_error_naming_the_argument(ids, argument):
    model = make_lm(LEVELS["k2"])
    with pytest.raises(ValueError, match=argument):
        model(ids)


@pytest.mark.parametrize(
    "prompt, max_new_tokens, argument",
    [
        (torch.zeros(1, 0, dtype=torch.long), 4, "prompt"),
        (torch.zeros(1, 65, dtype=torch.long), 1, "prompt"),
        (torch.zeros(1, 60, dtype=torch.long), 10, "max_seq_len"),
        (torch.zeros(1, 4), 4, "prompt"),
        (torch.full((1, 4), VOCAB), 4, "prompt"),
        (torch.zeros(4, dtype=torch.long), 4, "prompt"),
        (torch.zeros(1, 4, dtype=torch.long), 0, "max_new_tokens"),
    ],
)
def test_bad_generation_input_raises_value_error(prompt, max_new_tokens, argument):
    model = make_lm(LEVELS["k2"])
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=argument):
            model.generate(prompt, max_new_tokens, use_cache=use_cache)


@pytest.mark.parametrize(
    "changes, argument",
    [
        (dict(depth=(1, 1)), "depth"),
        (dict(depth=[1, 1, 1]), "depth"),
        (dict(depth=(1, 0, 1)), "depth"),
        (dict(depth=(-1, 1, 1)), "depth"),
        (dict(depth=(1, (1, 1), 1)), "depth"),
        (dict(depth=(1, 1, 1), shorten_factor=1), "shorten_factor"),
        (dict(depth=(1, 1, 1), shorten_factor=(2, 2)), "shorten_factor"),
        (dict(depth=(1, (1, 1, 1), 1), shorten_factor=(2, 1)), "shorten_factor"),
        (dict(depth=(1, (1, 1, 1), 1), shorten_factor=(2,)), "shorten_factor"),
        (dict(resampling="conv"), "resampling"),
        (dict(positions="alibi"), "positions"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(changes, argument):
    fields = dict(num_tokens=VOCAB, dim=32, depth=(1, 1, 1), shorten_factor=2, heads=2, dim_head=16)
    with pytest.raises(ValueError, match=argument):
        HourglassConfig(**{**fields, **changes})


def test_non_causal_model_refuses_cache_and_generation():
    model = make_lm(LEVELS["k2"], causal=False)
    with pytest.raises(ValueError, match="cache"):
        model.new_cache()
    with pytest.raises(ValueError, match="non-causal"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2)


def test_shortened_level_advances_once_every_k_tokens():
    model = make_lm(LEVELS["k2x3"])
    cache = model.new_cache()
    lengths = []
    with torch.no_grad():
        for token in torch.randint(0, VOCAB, (1, 13)).unbind(dim=1):
            model(token[:, None], cache=cache)
            lengths.append((cache.length, cache.valley.length, cache.valley.valley.length))
    # the valley of level 1 holds ceil(n / 2) tokens, that of level 2 ceil(ceil(n / 2) / 3)
    assert lengths == [(n, math.ceil(n / 2), math.ceil(math.ceil(n / 2) / 3)) for n in range(1, 14)]


@pytest.mark.parametrize(
    "config",
    [
        dict(num_tokens=256, depth=(1, (1, 1, 1), 1), shorten_factor=(2, 3)),
        dict(num_tokens=64, depth=(1, 2, 1), shorten_factor=3, resampling="linear"),
        dict(num_tokens=64, depth=(1, 1, 1), shorten_factor=4, attn_resampling=False),
    ],
    ids=["nested", "linear", "no-attention-resampling"],
)
def test_training_flops_formula_matches_a_count_of_the_matmuls(config):
    """MFU's numerator: the config's formula within 10 % of what FlopCounterMode counts (here: exactly)."""
    from quintet.training.flops import count_flops

    config = HourglassConfig(dim=32, heads=2, dim_head=16, **config)
    ids = torch.randint(0, config.num_tokens, (2, 37))
    for model in (HourglassLM(config), FlatLM(flat_baseline(config))):
        counted = count_flops(lambda model=model: model(ids).sum().backward())
        assert counted == pytest.approx(2 * model.training_flops(37), rel=0.1), type(model).__name__
