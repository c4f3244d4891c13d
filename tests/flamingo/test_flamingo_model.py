"""Flamingo on the quintet core: gates-at-0 identity, media masks, padding, caches, freezing, FLOPs, bad input."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from quintet.bench import count_flops
from quintet.core.config import CheckpointError
from quintet.flamingo import (
    Flamingo,
    FlamingoConfig,
    GatedCrossAttentionBlock,
    LanguageModelConfig,
    PerceiverResampler,
    VisionConfig,
    media_attention_mask,
)

IMAGE, EOC = 1, 2


VISION = {
    "conv": VisionConfig(image_size=8, kind="conv", dim=16, depth=2),
    "vit": VisionConfig(image_size=8, kind="vit", patch_size=4, dim=24, depth=1, heads=2, dim_head=12),
}


def _config(vision: str = "conv", **changes) -> FlamingoConfig:
    options = dict(
        lm=LanguageModelConfig(num_tokens=40, dim=32, depth=2, heads=2, dim_head=16, max_seq_len=64),
        vision=VISION[vision],
        media_token_id=IMAGE,
        end_of_chunk_token_id=EOC,
        num_latents=4,
        resampler_depth=1,
        cross_attn_heads=2,
        cross_attn_dim_head=16,
    )
    return FlamingoConfig(**{**options, **changes})


def _open_gates(model: Flamingo, value: float = 0.7) -> Flamingo:
    with torch.no_grad():
        for block in model.cross_attn.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(-value)
    return model


def _model(vision: str = "conv", **changes) -> Flamingo:
    torch.manual_seed(0)
    return _open_gates(Flamingo(_config(vision, **changes)).eval())


def _prompt(batch: int = 2, length: int = 16, images_at=(4, 9)) -> torch.Tensor:
    ids = torch.randint(3, 40, (batch, length), generator=torch.Generator().manual_seed(1))
    ids[:, list(images_at)] = IMAGE
    return ids


def _images(batch: int = 2, num: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.rand(batch, num, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vision", ["conv", "vit"])
@pytest.mark.parametrize("immediate", [True, False])
def test_gates_at_zero_give_the_base_language_model_exactly(immediate, vision):
    torch.manual_seed(0)
    model = Flamingo(_config(vision, only_attend_immediate_media=immediate)).eval()
    ids = _prompt()
    assert torch.equal(model(ids, _images()), model.lm(ids))
    # opened gates change the output, and text-only input is always the base LM's
    _open_gates(model)
    assert not torch.equal(model(ids, _images()), model.lm(ids))
    text = torch.randint(3, 40, (2, 10))
    assert torch.equal(model(text), model.lm(text))


@pytest.mark.parametrize("immediate", [True, False])
def test_media_mask_follows_image_positions(immediate):
    locations = torch.tensor([[0, 0, 1, 0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    mask, sees = media_attention_mask(locations, 3, 2, only_immediate=immediate)
    time = [0, 0, 1, 1, 1, 2, 2, 3, 3]
    for i, t in enumerate(time):
        visible = [j + 1 == t for j in range(3)] if immediate else [j + 1 <= t for j in range(3)]
        assert mask[0, i].tolist() == [v for v in visible for _ in range(2)], (i, mask[0, i])
        assert bool(sees[0, i]) == (t > 0)


@pytest.mark.parametrize("immediate", [True, False])
def test_block_text_before_the_first_image_gets_exactly_zero(immediate):
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, dim_media=8, heads=2, dim_head=8)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.ff_gate.fill_(1.0)
    locations = torch.zeros(2, 10, dtype=torch.bool)
    locations[0, [3, 6]] = True
    locations[1, [5, 6]] = True
    mask, sees = media_attention_mask(locations, 2, 4, only_immediate=immediate)
    x, media = torch.randn(2, 10, 16), torch.randn(2, 8, 8)
    out = block(x, media, attn_mask=mask, sees_media=sees)
    assert torch.equal(out[0, :3], x[0, :3]) and torch.equal(out[1, :5], x[1, :5])
    assert (out[0, 3:] != x[0, 3:]).any(dim=-1).all() and (out[1, 5:] != x[1, 5:]).any(dim=-1).all()


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_keeps_cross_attention_weights_whatever_the_scale_of_the_media(qk_norm):
    # the demo's loss spikes came from cross-attention logits growing with the scale of queries and keys;
    # with qk_norm the attention weights ignore that scale, so the (bias-free) output is linear in the media
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, dim_media=8, heads=2, dim_head=8, qk_norm=qk_norm)
    x, media = torch.randn(2, 5, 16), torch.randn(2, 8, 8)
    out, scaled = (block.attn(block.attn_norm(x), media * scale) for scale in (1.0, 100.0))
    assert torch.allclose(scaled, 100.0 * out, rtol=1e-4, atol=1e-4) == qk_norm


@pytest.mark.parametrize("immediate", [True, False])
def test_block_changing_image_i_changes_only_the_text_that_sees_it(immediate):
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, dim_media=8, heads=2, dim_head=8)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.ff_gate.fill_(1.0)
    locations = torch.zeros(1, 12, dtype=torch.bool)
    locations[0, [2, 5, 9]] = True  # image 0 covers 2..4, image 1 covers 5..8, image 2 covers 9..11
    mask, sees = media_attention_mask(locations, 3, 4, only_immediate=immediate)
    x, media = torch.randn(1, 12, 16), torch.randn(1, 3, 4, 8)
    changed = media.clone()
    changed[0, 1] += torch.randn(4, 8)
    out, other = (block(x, m.flatten(1, 2), attn_mask=mask, sees_media=sees) for m in (media, changed))
    touched = (out != other).any(dim=-1)[0].tolist()
    expected = [5 <= i < 9 for i in range(12)] if immediate else [i >= 5 for i in range(12)]
    assert touched == expected


@pytest.mark.parametrize("immediate", [True, False])
def test_model_text_never_depends_on_a_later_image(immediate):
    model = _model(only_attend_immediate_media=immediate)
    ids, images = _prompt(images_at=(4, 9)), _images()
    out = model(ids, images)
    assert torch.equal(out[:, :4], model.lm(ids)[:, :4])  # before the first image: exactly the base LM
    changed = images.clone()
    changed[:, 1] = torch.rand(2, 3, 8, 8)
    other = model(ids, changed)
    assert torch.equal(out[:, :9], other[:, :9])  # image 1 stands at position 9
    assert not torch.allclose(out[:, 9:], other[:, 9:])


def test_model_is_causal_in_the_text():
    model = _model()
    ids, images = _prompt(), _images()
    changed = ids.clone()
    changed[:, 12:] = torch.randint(3, 40, (2, 4))
    assert torch.equal(model(ids, images)[:, :12], model(changed, images)[:, :12])


@pytest.mark.parametrize("immediate", [True, False])
def test_padding_media_never_change_real_outputs(immediate):
    model = _model(only_attend_immediate_media=immediate)
    full = _prompt(batch=1, images_at=(2, 6, 11))
    short = _prompt(batch=1, images_at=(3,))
    images = _images(batch=2, num=3)
    media_mask = torch.tensor([[True, True, True], [True, False, False]])
    batched = model(torch.cat((full, short)), images, media_mask=media_mask)
    alone = model(short, images[1:, :1])
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=0)
    noisy = images.clone()
    noisy[1, 1:] = torch.rand(2, 3, 8, 8)
    assert torch.equal(batched, model(torch.cat((full, short)), noisy, media_mask=media_mask))


@pytest.mark.parametrize("immediate", [True, False])
def test_cached_decoding_in_chunks_equals_the_full_forward(immediate):
    model = _model(only_attend_immediate_media=immediate)
    ids, images = _prompt(length=22, images_at=(0, 5, 12)), _images(num=3)
    full = model(ids, images)
    cache = model.new_cache()
    chunks = [model(ids[:, :14], images, cache=cache)]
    for position in range(14, 22, 3):
        chunks.append(model(ids[:, position : position + 3], cache=cache))
    assert cache.num_media == 3 and cache.length == 22
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_cached_logits_and_greedy_tokens_equal_uncached():
    for immediate in (True, False):
        model = _model(only_attend_immediate_media=immediate)
        prompt, images = _prompt(length=14, images_at=(1, 6, 10)), _images(num=3)
        cache = model.new_cache()
        logits = [model(prompt, images, cache=cache)[:, -1]]
        ids = prompt
        for _ in range(6):
            token = logits[-1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, token), dim=1)
            logits.append(model(token, cache=cache)[:, -1])
        for step, cached in enumerate(logits):
            uncached = model(ids[:, : prompt.shape[1] + step], images)[:, -1]
            torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)
        greedy = dict(temperature=0.0, images=images)
        tokens = model.generate(prompt, 12, **greedy)
        assert torch.equal(tokens, model.generate(prompt, 12, use_cache=False, **greedy))
        assert not (tokens == IMAGE).any()


def test_bad_input_names_the_argument():
    model = _model()
    ids, images = _prompt(), _images()
    with pytest.raises(ValueError, match="^images: row 0 of ids holds 2 <image>"):
        model(ids, _images(num=3))
    with pytest.raises(ValueError, match="^images: row 0 of ids holds 0"):
        model(torch.randint(3, 40, (2, 8)), images)
    with pytest.raises(ValueError, match="^images: expected"):
        model(ids, torch.rand(2, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="^images: expected batch 2"):
        model(ids, _images(batch=3))
    with pytest.raises(TypeError, match="^images:"):
        model(ids, torch.zeros(2, 2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="^ids: expected at least one token"):
        model(ids[:, :0], images)
    with pytest.raises(ValueError, match="^prompt: expected at least one token"):
        model.generate(ids[:, :0], 4, images=images)
    with pytest.raises(ValueError, match="^images: row 0"):
        model.generate(ids, 4, images=_images(num=1))
    with pytest.raises(ValueError, match="^media_mask: real media must come first"):
        model(ids, _images(num=3), media_mask=torch.tensor([[True, False, True]] * 2))
    with pytest.raises(ValueError, match="^ids: ids must lie in"):
        model(ids + 40, images)
    cache = model.new_cache()
    model(ids, images, cache=cache)
    with pytest.raises(ValueError, match="^images: a prompt's images come with the first call"):
        model(ids[:, :1], images, cache=cache)
    with pytest.raises(ValueError, match="^ids: an <image> token while decoding"):
        model(torch.full((2, 1), IMAGE), cache=cache)
    with pytest.raises(ValueError, match="^media_token_id: must lie in the LM's vocabulary"):
        _config(media_token_id=40)
    with pytest.raises(ValueError, match="^cross_attn_every"):
        _config(cross_attn_every=3)


def test_resampler_shapes_frames_and_padding():
    torch.manual_seed(0)
    resampler = PerceiverResampler(16, depth=2, num_latents=5, heads=2, dim_head=8, max_frames=3).eval()
    features = torch.randn(2, 3, 2, 7, 16)  # (b, m, f, p, d)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = resampler(features, mask)
    assert out.shape == (2, 3, 5, 16)
    assert torch.equal(out[1, 2], torch.zeros(5, 16))
    # media are resampled one by one: another item's features never matter
    changed = features.clone()
    changed[0, 1] = torch.randn(2, 7, 16)
    assert torch.allclose(resampler(changed, mask)[0, [0, 2]], out[0, [0, 2]], atol=1e-6)
    # the time embeddings tell frames apart: swapping two frames changes the tokens
    swapped = features[:, :, [1, 0]]
    assert not torch.allclose(resampler(swapped, mask)[0, 0], out[0, 0], atol=1e-4)
    with pytest.raises(ValueError, match="^features: 4 frames"):
        resampler(torch.randn(1, 1, 4, 7, 16))


def test_video_media_with_frames():
    model = _model(max_frames=2)
    ids = _prompt()
    video = torch.rand(2, 2, 2, 3, 8, 8)
    assert model(ids, video).shape == (2, 16, 40)
    with pytest.raises(ValueError, match="^images: 3 frames"):
        model(ids, torch.rand(2, 2, 3, 3, 8, 8))


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_only_unfrozen_parameters_change(freeze_vision):
    torch.manual_seed(0)
    model = Flamingo(_config(freeze_lm=True, freeze_vision=freeze_vision))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, images = _prompt(), _images()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1], images).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        frozen = name.startswith("lm.") or (freeze_vision and name.startswith("vision."))
        assert torch.equal(p, before[name]) == frozen, name


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = Flamingo.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids, images = _prompt(), _images()
    assert torch.equal(model(ids, images), loaded(ids, images))
    assert not any(p.requires_grad for p in loaded.lm.parameters())
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError):
        Flamingo.from_pretrained(tmp_path)


@pytest.mark.parametrize("vision", ["conv", "vit"])
@pytest.mark.parametrize("freeze", [(True, True), (True, False), (False, False)])
def test_train_flops_match_the_counted_flops(freeze, vision):
    torch.manual_seed(0)
    model = Flamingo(_config(vision, freeze_lm=freeze[0], freeze_vision=freeze[1], cross_attn_every=1))
    ids, images = _prompt(length=16), _images()
    with sdpa_kernel(SDPBackend.MATH):  # FlopCounterMode counts no fused CPU attention kernel
        counted = count_flops(lambda: model(ids, images).sum().backward())
    predicted = model.train_flops(2, 16, 2)
    assert abs(predicted - counted) <= 0.1 * counted, (predicted, counted)


@pytest.mark.parametrize("vision", ["conv", "vit"])
def test_precomputed_vision_features_give_the_same_output(vision):
    model = _model(vision)
    ids, images = _prompt(), _images()
    features = model.encode_images(images)
    assert torch.equal(model(ids, images), model(ids, vision_features=features))
    greedy = dict(temperature=0.0, use_cache=True)
    assert torch.equal(
        model.generate(ids, 4, images=images, **greedy), model.generate(ids, 4, vision_features=features, **greedy)
    )
    with pytest.raises(ValueError, match="^vision_features: give images or their features, not both"):
        model(ids, images, vision_features=features)
    with pytest.raises(ValueError, match="^vision_features: row 0 of ids holds 2"):
        model(ids, vision_features=features[:, :1])


def test_gate_scale_keeps_the_identity_and_scales_the_gates():
    torch.manual_seed(0)
    model = Flamingo(_config(gate_scale=20.0)).eval()
    ids, images = _prompt(), _images()
    assert torch.equal(model(ids, images), model.lm(ids))
    block = model.cross_attn["0"]
    with torch.no_grad():
        block.attn_gate.fill_(0.01)
    x = torch.randn(2, 16, 32)
    media = model.encode_media(images).flatten(1, 2)
    mask = torch.ones(2, 16, media.shape[1], dtype=torch.bool)
    sees = torch.ones(2, 16, dtype=torch.bool)
    attended = block.attn(block.attn_norm(x), media, attn_mask=mask)
    with torch.no_grad():
        block.ff_gate.zero_()
    torch.testing.assert_close(
        block(x, media, attn_mask=mask, sees_media=sees), x + torch.tanh(torch.tensor(0.2)) * attended
    )
