import pytest
import torch

from quintet.qtransformer import MaxViTConfig, QTransformer, QTransformerConfig, StateEncoderConfig

STATE = StateEncoderConfig(state_dim=5, dim=16, depth=1, num_tokens=3)
IMAGE = MaxViTConfig(channels=3, dim=16, depth=(1,), window_size=2, heads=2, dim_head=8)


def make(encoder=STATE, seed=0, **overrides) -> QTransformer:
    kwargs = dict(
        num_actions=3,
        action_bins=6,
        encoder=encoder,
        dim=16,
        depth=1,
        heads=2,
        dim_head=8,
        frames=3,
        num_learned_tokens=2,
        q_head_depth=1,
        q_head_heads=2,
        q_head_dim_head=8,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = QTransformer(QTransformerConfig(**kwargs)).eval()
    # zero-initialised parts (FiLM, null text embedding, biases) would make conditioning a no-op
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def observations(model: QTransformer, batch: int = 4, frames: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    frames = frames or config.frames
    if config.is_image:
        return torch.randn(batch, 3, frames, 8, 8, generator=generator)
    return torch.randn(batch, frames, config.encoder.state_dim, generator=generator)


def text(model: QTransformer, batch: int = 4):
    if not model.config.condition_on_text:
        return None
    return torch.randn(batch, model.config.text_embed_dim, generator=torch.Generator().manual_seed(2))


TEXT = dict(condition_on_text=True, text_embed_dim=7)
CONFIGS = [
    (dict(), 1.0),
    (dict(dueling=True), 1.0),
    (dict(weight_tie_action_bin_embed=False), 1.0),
    (dict(dueling=True, weight_tie_action_bin_embed=False), 1.0),
    (dict(num_actions=1), 1.0),
    (dict(num_actions=1, dueling=True), 1.0),
    (TEXT, 1.0),
    (TEXT, 3.0),
    (dict(TEXT, dueling=True, num_actions=1), 3.0),
    (dict(encoder=IMAGE, dueling=True), 1.0),
]


@pytest.mark.parametrize("overrides, cond_scale", CONFIGS)
def test_greedy_actions_are_the_argmax_of_the_trained_q_values(overrides, cond_scale):
    model = make(**overrides)
    obs, embeds = observations(model), text(model)
    bins, q_decoded = model.get_optimal_actions(obs, embeds, cond_scale=cond_scale, return_q_values=True)
    q_forward = model(obs, bins if model.config.num_actions > 1 else None, embeds, cond_scale=cond_scale)
    assert torch.equal(q_forward.argmax(dim=-1), bins)
    torch.testing.assert_close(q_decoded, q_forward)
    assert q_forward.min() >= 0 and q_forward.max() <= 1
    expected = (4,) if model.config.num_actions == 1 else (4, model.config.num_actions)
    assert bins.shape == expected and q_forward.shape == (*expected, model.config.action_bins)


@pytest.mark.parametrize("overrides", [dict(), dict(dueling=True), dict(condition_on_text=True, text_embed_dim=7)])
def test_cached_decoder_equals_uncached(overrides):
    model = make(num_actions=8, action_bins=32, **overrides)
    obs, embeds = observations(model), text(model)
    cached, q_cached = model.get_optimal_actions(obs, embeds, return_q_values=True, use_cache=True)
    uncached, q_uncached = model.get_optimal_actions(obs, embeds, return_q_values=True, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(q_cached, q_uncached)


def test_greedy_decoding_is_deterministic_in_training_mode():
    model = make(condition_on_text=True, text_embed_dim=7, dropout=0.3, cond_drop_prob=0.5).train()
    obs, embeds = observations(model), text(model)
    first = model.get_optimal_actions(obs, embeds)
    assert all(torch.equal(first, model.get_optimal_actions(obs, embeds)) for _ in range(3))
    assert model.training


def test_q_at_dimension_i_depends_only_on_earlier_actions():
    model = make()
    obs = observations(model)
    actions = torch.randint(6, (4, 3), generator=torch.Generator().manual_seed(3))
    changed = actions.clone()
    changed[:, 1] = (changed[:, 1] + 1) % 6
    q, q_changed = model(obs, actions), model(obs, changed)
    torch.testing.assert_close(q[:, :2], q_changed[:, :2])
    assert not torch.allclose(q[:, 2], q_changed[:, 2])


@pytest.mark.parametrize("encoder", [STATE, IMAGE])
def test_frame_causal_mask(encoder):
    model = make(encoder=encoder)
    obs = observations(model)
    changed = obs.clone()
    frame_axis = 2 if model.config.is_image else 1
    changed.select(frame_axis, 2).add_(1.0)
    tokens = model.encode_state(obs, None)
    tokens_changed = model.encode_state(changed, None)
    torch.testing.assert_close(tokens[:, :2], tokens_changed[:, :2])
    assert not torch.allclose(tokens[:, 2], tokens_changed[:, 2])
    # a shorter clip gives the same tokens for the frames it has
    torch.testing.assert_close(model.encode_state(obs.narrow(frame_axis, 0, 2), None), tokens[:, :2])


def test_epsilon_greedy_exploration():
    model = make(num_actions=4, action_bins=50)
    obs = observations(model, batch=64)
    greedy = model.get_optimal_actions(obs)
    assert torch.equal(model.get_actions(obs, 0.0), greedy)
    explored = model.get_actions(obs, 1.0, generator=torch.Generator().manual_seed(0))
    assert (explored != greedy).float().mean() > 0.8
    partial = model.get_actions(obs, 1.0, random_dims_fraction=0.25, generator=torch.Generator().manual_seed(0))
    # one random dimension per sample; the first dimension stays greedy wherever it was not the one
    assert (partial[:, 0] == greedy[:, 0]).float().mean() > 0.5
    again = model.get_actions(obs, 1.0, random_dims_fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(partial, again)


def test_text_conditioning_changes_q_and_guidance_extrapolates():
    model = make(condition_on_text=True, text_embed_dim=7)
    obs, embeds = observations(model), text(model)
    q = model(obs, None, embeds)
    assert not torch.allclose(q, model(obs, None, torch.randn_like(embeds)))
    assert not torch.allclose(q, model(obs, None, embeds, cond_scale=2.0))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, o, a, t: m(o[:, :, :4], a, t), "obs"),
        (lambda m, o, a, t: m(o[0], a, t), "obs"),
        (lambda m, o, a, t: m(torch.cat((o, o), dim=1), a, t), "obs"),
        (lambda m, o, a, t: m(o, a + 6, t), "actions"),
        (lambda m, o, a, t: m(o, torch.cat((a, a), dim=1), t), "actions"),
        (lambda m, o, a, t: m(o, a.float(), t), "actions"),
        (lambda m, o, a, t: m(o, a, None), "text_embeds"),
        (lambda m, o, a, t: m(o, a, t[:, :3]), "text_embeds"),
        (lambda m, o, a, t: m.get_actions(o, 1.5, text_embeds=t), "epsilon"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    model = make(condition_on_text=True, text_embed_dim=7)
    obs, embeds = observations(model), text(model)
    actions = torch.randint(6, (4, 3))
    with pytest.raises((ValueError, TypeError), match=message):
        call(model, obs, actions, embeds)


def test_text_embeds_rejected_without_conditioning():
    model = make()
    with pytest.raises(ValueError, match="text_embeds"):
        model(observations(model), None, torch.randn(4, 7))


def test_bad_configs():
    with pytest.raises(ValueError, match="dim"):
        QTransformerConfig(num_actions=2, action_bins=4, encoder=STATE, dim=32)
    with pytest.raises(ValueError, match="text_embed_dim"):
        QTransformerConfig(num_actions=2, action_bins=4, encoder=STATE, dim=16, condition_on_text=True)
    with pytest.raises(ValueError, match="action_bins"):
        QTransformerConfig(num_actions=2, action_bins=1, encoder=STATE, dim=16)
    with pytest.raises(ValueError, match="dim_head"):
        MaxViTConfig(dim_head=6)
    with pytest.raises(ValueError, match="mbconv_norm"):
        MaxViTConfig(mbconv_norm="layer")


def test_image_size_checked():
    model = make(encoder=IMAGE)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 3, 6, 6))


def test_save_load_round_trip(tmp_path):
    model = make(condition_on_text=True, text_embed_dim=7, dueling=True)
    model.save_pretrained(tmp_path)
    loaded = QTransformer.from_pretrained(tmp_path)
    obs, embeds = observations(model), text(model)
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(obs, None, embeds), model(obs, None, embeds))
    image = make(encoder=IMAGE)
    image.save_pretrained(tmp_path / "image")
    torch.testing.assert_close(
        QTransformer.from_pretrained(tmp_path / "image")(observations(image)), image(observations(image))
    )


class ConvEncoder(torch.nn.Module):
    embed_dim = 16

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)

    def forward(self, images):
        return self.conv(images)


def test_custom_encoder_with_embed_dim():
    torch.manual_seed(0)
    config = make(encoder=IMAGE).config
    model = QTransformer.with_encoder(config, ConvEncoder()).eval()
    obs = torch.randn(2, 3, 3, 6, 6)  # any size the custom encoder accepts
    bins = model.get_optimal_actions(obs)
    assert torch.equal(model(obs, bins).argmax(dim=-1), bins)
    with pytest.raises(ValueError, match="embed_dim"):
        QTransformer.with_encoder(config, torch.nn.Conv2d(3, 16, 1))
