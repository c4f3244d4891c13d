import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quintet.core import sampling

logit_rows = st.lists(
    st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40),
    min_size=1,
    max_size=4,
).map(lambda rows: [row[: min(len(r) for r in rows)] for row in rows])


def _draw_many(logits, n=64, **kwargs):
    generator = torch.Generator().manual_seed(1)
    return torch.stack([sampling.sample(logits, generator=generator, **kwargs) for _ in range(n)], dim=-1)


@settings(max_examples=40, deadline=None)
@given(rows=logit_rows, k=st.integers(1, 10))
def test_top_k_never_chooses_outside_the_k_largest(rows, k):
    logits = torch.tensor(rows)
    kept = logits >= logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    chosen = _draw_many(logits, top_k=k)
    assert kept.gather(-1, chosen).all()


@settings(max_examples=40, deadline=None)
@given(rows=logit_rows, p=st.floats(0.05, 1.0))
def test_top_p_only_chooses_from_the_nucleus(rows, p):
    logits = torch.tensor(rows)
    probs = logits.softmax(-1)
    chosen = _draw_many(logits, top_p=p)
    # a chosen token's rank: the mass of strictly more probable tokens must be below p
    mass_above = torch.stack(
        [(probs * (probs > probs.gather(-1, chosen[:, i : i + 1]))).sum(-1) for i in range(chosen.shape[-1])], -1
    )
    assert (mass_above < p + 1e-5).all()


@settings(max_examples=40, deadline=None)
@given(rows=logit_rows, min_p=st.floats(0.0, 1.0))
def test_min_p_never_chooses_an_improbable_token(rows, min_p):
    logits = torch.tensor(rows)
    probs = logits.softmax(-1)
    chosen = _draw_many(logits, min_p=min_p)
    threshold = probs.amax(-1, keepdim=True) * min_p
    assert (probs.gather(-1, chosen) >= threshold - 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(rows=logit_rows)
def test_greedy_and_zero_temperature_are_argmax(rows):
    logits = torch.tensor(rows)
    assert torch.equal(sampling.greedy(logits), logits.argmax(-1))
    assert torch.equal(sampling.sample(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sampling.gumbel_sample(logits, temperature=0), logits.argmax(-1))


def test_same_seed_gives_same_samples_and_other_seeds_differ():
    logits = torch.randn(8, 50)
    draw = lambda seed: sampling.sample(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert any(not torch.equal(draw(3), draw(s)) for s in range(4, 10))


def test_gumbel_sampling_matches_softmax_frequencies():
    logits = torch.tensor([0.0, 1.0, 2.0]).log_softmax(-1)
    generator = torch.Generator().manual_seed(0)
    draws = sampling.gumbel_sample(logits.expand(20000, 3), generator=generator)
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert (freq - logits.exp()).abs().max() < 0.02


def test_batched_over_leading_dims():
    logits = torch.randn(2, 3, 7)
    assert sampling.sample(logits, top_k=2).shape == (2, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.2}, "min_p"),
    ],
)
def test_invalid_sampling_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(torch.randn(2, 5), **kwargs)


def test_non_float_logits_raise_type_error():
    with pytest.raises(TypeError, match="logits"):
        sampling.sample(torch.ones(2, 5, dtype=torch.long))


def test_probabilities_sum_to_one_and_log_matches():
    logits = torch.randn(3, 7)
    probs = sampling.probabilities(logits, temperature=0.5)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert torch.allclose(sampling.probabilities(logits, log=True).exp(), sampling.probabilities(logits), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        sampling.probabilities(logits, temperature=0)
