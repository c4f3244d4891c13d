import pytest
import torch

from quintet.core import Attention, KVCache, RotaryEmbedding, Transformer

torch.manual_seed(0)
TOL = 1e-5


def decode_stepwise(model, x, steps, **kwargs):
    """Feed ``x`` through ``model`` in chunks of ``steps`` tokens with a KVCache."""
    cache = KVCache()
    outs, start = [], 0
    for size in steps:
        out, cache = model(x[:, start : start + size], cache=cache, **kwargs)
        outs.append(out)
        start += size
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rotary": True},
        {"num_mem_kv": 3},
        {"rotary": True, "num_mem_kv": 2, "value_gates": True, "qk_norm": True},
        {"norm": "layer", "ff_activation": "gelu"},
    ],
)
def test_cached_decoding_equals_full_causal_forward(options):
    model = Transformer(32, 2, heads=4, dim_head=8, causal=True, **options).eval()
    x = torch.randn(2, 13, 32)
    full = model(x)
    stepwise, cache = decode_stepwise(model, x, [1] * 13)
    assert cache.length == 13
    assert (stepwise - full).abs().max() <= TOL
    chunked, _ = decode_stepwise(model, x, [5, 1, 4, 3])
    assert (chunked - full).abs().max() <= TOL


def test_cached_decoding_with_cross_attention_and_padding_mask():
    model = Transformer(32, 2, heads=4, dim_head=8, causal=True, dim_context=24, rotary=True).eval()
    x, context = torch.randn(2, 9, 32), torch.randn(2, 5, 24)
    context_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :2] = False  # row 1 is left-padded
    full = model(x, context=context, context_mask=context_mask, key_padding_mask=padding)
    cache = KVCache()
    outs = []
    for t in range(9):
        # context is given once; later steps reuse its cached keys/values
        out, cache = model(
            x[:, t : t + 1],
            context=context if t == 0 else None,
            context_mask=context_mask,
            key_padding_mask=padding[:, : t + 1],
            cache=cache,
        )
        outs.append(out)
    assert (torch.cat(outs, 1)[:, 2:] - full[:, 2:]).abs().max() <= TOL
    assert (torch.cat(outs, 1)[0] - full[0]).abs().max() <= TOL


def test_crop_then_redo_equals_fresh_decode():
    model = Transformer(32, 2, heads=4, dim_head=8, causal=True, rotary=True).eval()
    x, other = torch.randn(1, 10, 32), torch.randn(1, 4, 32)
    _, cache = decode_stepwise(model, x, [10])
    cache.crop(6)
    assert cache.length == 6
    redo, _ = model(other, cache=cache)
    fresh = model(torch.cat((x[:, :6], other), dim=1))[:, 6:]
    assert (redo - fresh).abs().max() <= TOL


def test_batch_reorder_matches_reordered_inputs():
    model = Transformer(32, 2, heads=4, dim_head=8, causal=True, dim_context=16).eval()
    x, context = torch.randn(3, 7, 32), torch.randn(3, 4, 16)
    _, cache = decode_stepwise(model, x[:, :5], [5], context=context)
    order = torch.tensor([2, 0, 0])
    cache.reorder(order)
    out, _ = model(x[order, 5:], cache=cache)
    expected = model(x[order], context=context[order])[:, 5:]
    assert (out - expected).abs().max() <= TOL


def test_cache_growth_is_amortised():
    attn = Attention(16, heads=2, dim_head=8, causal=True).eval()
    cache = KVCache()
    layer = cache.layer(0)
    reallocations, capacity = 0, 0
    with torch.no_grad():
        for _ in range(1000):
            attn(torch.randn(1, 1, 16), cache=layer)
            if layer.capacity != capacity:
                reallocations, capacity = reallocations + 1, layer.capacity
    assert layer.length == 1000
    assert reallocations <= 6  # 64, 128, ..., 1024: doubling, never a copy per step


def test_changing_future_tokens_never_changes_the_past():
    model = Transformer(32, 2, heads=4, dim_head=8, causal=True, rotary=True, num_mem_kv=2).eval()
    x = torch.randn(2, 12, 32)
    for t in (0, 5, 11):
        perturbed = x.clone()
        perturbed[:, t:] += torch.randn_like(perturbed[:, t:])
        assert torch.equal(model(x)[:, :t], model(perturbed)[:, :t])
        assert not torch.allclose(model(x)[:, t], model(perturbed)[:, t])


def test_padded_keys_change_nothing():
    model = Transformer(32, 2, heads=4, dim_head=8).eval()
    x = torch.randn(2, 8, 32)
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[:, 5:] = False
    garbage = x.clone()
    garbage[:, 5:] = torch.randn(2, 3, 32) * 100
    a = model(x, key_padding_mask=padding)[:, :5]
    b = model(garbage, key_padding_mask=padding)[:, :5]
    assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("mask_kind", ["attn", "padding"])
def test_fully_masked_query_row_gives_zeros_and_finite_gradients(mask_kind):
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(2, 4, 16, requires_grad=True)
    kwargs = {}
    if mask_kind == "attn":
        mask = torch.ones(4, 4, dtype=torch.bool)
        mask[1] = False
        kwargs["attn_mask"] = mask
    else:
        padding = torch.ones(2, 4, dtype=torch.bool)
        padding[1] = False
        kwargs["key_padding_mask"] = padding
    out = attn(x, **kwargs)
    blank = out[:, 1] if mask_kind == "attn" else out[1]
    # the output projection has no bias, so a query that attends nothing maps to exact zeros
    assert torch.equal(blank, torch.zeros_like(blank))
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_attention_mask_is_respected():
    attn = Attention(16, heads=2, dim_head=8).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:, :2] = True  # every query sees keys 0, 1 only
    changed = x.clone()
    changed[:, 2:] += 5.0
    # queries 0, 1 have the same inputs and the same visible keys
    assert (attn(x, attn_mask=mask)[:, :2] - attn(changed, attn_mask=mask)[:, :2]).abs().max() <= TOL


def _rotated_scores(rotary, q, k, q_pos, k_pos):
    from quintet.core import apply_rotary

    return (apply_rotary(q, rotary(q_pos)) * apply_rotary(k, rotary(k_pos))).sum(-1)


def test_rotary_1d_scores_depend_only_on_relative_offset():
    rotary = RotaryEmbedding(16)
    q, k = torch.randn(5, 16), torch.randn(5, 16)
    pos_q, pos_k = torch.tensor([0, 3, 7, 2, 9]), torch.tensor([4, 1, 7, 8, 0])
    base = _rotated_scores(rotary, q, k, pos_q, pos_k)
    shifted = _rotated_scores(rotary, q, k, pos_q + 37, pos_k + 37)
    assert (base - shifted).abs().max() <= 1e-4
    moved = _rotated_scores(rotary, q, k, pos_q + 1, pos_k)
    assert (base - moved).abs().max() > 1e-3


def test_rotary_2d_scores_depend_only_on_relative_dy_dx():
    rotary = RotaryEmbedding(16, axes=2)
    q, k = torch.randn(6, 16), torch.randn(6, 16)
    grid = RotaryEmbedding.grid(2, 3)
    other = grid.flip(0)
    base = _rotated_scores(rotary, q, k, grid, other)
    shift = torch.tensor([5, -2])
    assert (base - _rotated_scores(rotary, q, k, grid + shift, other + shift)).abs().max() <= 1e-4
    row_only = torch.tensor([1, 0])
    col_only = torch.tensor([0, 1])
    assert (base - _rotated_scores(rotary, q, k, grid + row_only, other)).abs().max() > 1e-3
    assert (base - _rotated_scores(rotary, q, k, grid + col_only, other)).abs().max() > 1e-3


def test_2d_rotary_transformer_uses_positions():
    model = Transformer(32, 1, heads=2, dim_head=8, rotary=True, rotary_axes=2).eval()
    x = torch.randn(1, 6, 32)
    positions = RotaryEmbedding.grid(2, 3)
    out = model(x, positions=positions)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="positions"):
        model(x)


def test_film_conditioning_starts_neutral_and_is_used():
    model = Transformer(32, 2, heads=2, dim_head=8, dim_cond=6).eval()
    x = torch.randn(2, 5, 32)
    cond = torch.randn(2, 6)
    plain = model(x, cond=cond)
    assert torch.allclose(plain, model(x, cond=torch.zeros(2, 6)))  # zero-initialised modulation
    for block in model.blocks:
        torch.nn.init.normal_(block.ff_norm.inner.to_scale_shift.weight)
    assert not torch.allclose(model(x, cond=cond), model(x, cond=-cond))
    with pytest.raises(ValueError, match="cond"):
        model(x)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda a: a(torch.randn(2, 16)), ValueError, "x: expected a 3-D"),
        (lambda a: a(torch.randn(2, 4, 15)), ValueError, "x: expected feature dim 16"),
        (lambda a: a(torch.randint(0, 3, (2, 4, 16))), TypeError, "x: expected a float"),
        (lambda a: a(torch.randn(2, 4, 16), attn_mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "attn_mask"),
        (lambda a: a(torch.randn(2, 4, 16), attn_mask=torch.ones(4, 4)), TypeError, "attn_mask"),
        (
            lambda a: a(torch.randn(2, 4, 16), key_padding_mask=torch.ones(2, 3, dtype=torch.bool)),
            ValueError,
            "key_padding_mask",
        ),
        (lambda a: a(torch.randn(2, 4, 16), torch.randn(2, 3, 16)), ValueError, "context"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(Attention(16, heads=2, dim_head=8))


def test_cross_attention_rejects_mismatched_context():
    attn = Attention(16, heads=2, dim_head=8, dim_context=12)
    with pytest.raises(ValueError, match="context"):
        attn(torch.randn(2, 4, 16), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="context"):
        attn(torch.randn(2, 4, 16))


def test_cache_crop_and_reorder_validate_arguments():
    cache = KVCache()
    with pytest.raises(ValueError, match="length"):
        cache.crop(3)
    with pytest.raises(TypeError, match="index"):
        cache.reorder(torch.tensor([0.5]))


def test_compiles_with_torch_compile():
    model = Transformer(32, 1, heads=2, dim_head=8, causal=True, rotary=True).eval()
    x = torch.randn(1, 8, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert (compiled(x) - model(x)).abs().max() <= TOL


def test_growing_context_appended_part_by_part_equals_the_whole_context():
    attn = Attention(16, heads=2, dim_head=8, dim_context=12, qk_norm=True).eval()
    x, context = torch.randn(2, 3, 16), torch.randn(2, 7, 12)
    cache = KVCache().layer(0)
    for part in (context[:, :4], context[:, 4:]):
        cache.context_kv = cache.append(*attn.context_kv(part))
    assert (attn(x, cache=cache) - attn(x, context)).abs().max() <= TOL
    with pytest.raises(ValueError, match="self-attention"):
        Attention(16, heads=2, dim_head=8).context_kv(context)
