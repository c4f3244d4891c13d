"""Frame tokenizer and latent action model: round trips, temporal causality, learning, bad input, FLOPs."""

import dataclasses

import numpy as np
import pytest
import torch

from quintet.bench import count_flops
from quintet.genie import LatentActionConfig, TokenizerConfig
from quintet.genie.latent_actions import LatentActionModel, normalized_mutual_information
from quintet.genie.tokenizer import FrameTokenizer

SIZE = (16, 16)


def tokenizer(**overrides) -> FrameTokenizer:
    torch.manual_seed(0)
    options = dict(image_size=SIZE, channels=(8, 16), codebook_size=16, codebook_dim=8)
    return FrameTokenizer(TokenizerConfig(**{**options, **overrides}))


def frames(batch=2, t=3, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, t, 3, *SIZE), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("temporal", [False, True])
def test_encode_decode_round_trip_equals_the_forward_reconstruction(temporal):
    model = tokenizer(temporal_convs=temporal)
    x = frames()
    model.train()
    model(x)  # initialises the codebook from data
    model.eval()
    with torch.no_grad():
        out = model(x)
    tokens = model.encode(x)
    assert tokens.shape == (2, 3, 4, 4) and tokens.dtype == torch.long
    assert torch.equal(tokens, out.tokens)
    assert torch.allclose(model.decode(tokens), out.reconstruction.clamp(0, 1), atol=1e-6)
    assert torch.allclose(model.decode(tokens, last=1), model.decode(tokens)[:, -1:], atol=1e-6)
    # decoding the codes again and re-encoding the result is stable for the code of every position
    assert torch.equal(model.encode(x.float() / 255), tokens)


def test_temporal_convolutions_are_causal():
    model = tokenizer(temporal_convs=True, temporal_kernel=2)
    for conv in (model.pre_temporal, model.post_temporal):  # a fresh layer is the identity: give it weight
        torch.nn.init.normal_(conv.conv.weight, std=0.3)
    model.eval()
    x = frames(batch=1, t=4)
    changed = x.clone()
    changed[:, 2] = 255 - changed[:, 2]
    with torch.no_grad():
        a, b = model._latents(x.float() / 255), model._latents(changed.float() / 255)
    assert torch.equal(a[:, :2], b[:, :2]), "a frame's latent never reads later frames"
    assert not torch.equal(a[:, 3], b[:, 3]), "it does read the frame before it"
    tokens = model.encode(x)
    later = tokens.clone()
    later[:, 3] = (later[:, 3] + 1) % 16
    assert torch.equal(model.decode(tokens)[:, :3], model.decode(later)[:, :3])


def test_tokenizer_learns_a_few_frames():
    model = tokenizer(codebook_size=32, dead_code_threshold=5)
    x = frames(batch=4, t=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first if first is not None else float(out.metrics["recon_psnr"])
    assert float(out.metrics["recon_psnr"]) > first + 1.5


def test_tokenizer_save_load_is_exact(tmp_path):
    model = tokenizer(temporal_convs=True)
    model.train()
    model(frames())
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = FrameTokenizer.from_pretrained(tmp_path)
    assert torch.equal(model.encode(frames()), loaded.encode(frames()))
    assert torch.equal(model.decode(model.encode(frames())), loaded.decode(loaded.encode(frames())))


def test_tokenizer_bad_input_names_the_argument():
    model = tokenizer()
    with pytest.raises(ValueError, match=r"^frames: expected \(b, t, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^frames: expected \(b, t, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="^frames: expected uint8"):
        model.encode(torch.zeros(1, 1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="^frames: expected a 5-D"):
        model.encode(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^tokens: ids must lie in \[0, 16\)"):
        model.decode(torch.full((1, 1, 4, 4), 16))
    with pytest.raises(ValueError, match=r"^tokens: expected \(b, t, 4, 4\)"):
        model.decode(torch.zeros(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="^image_size"):
        TokenizerConfig(image_size=(18, 16), channels=(8, 16))


@pytest.mark.parametrize("temporal", [False, True])
def test_tokenizer_flops_match_the_counter(temporal):
    model = tokenizer(temporal_convs=temporal).train()
    x = frames(batch=2, t=2)
    counted = count_flops(lambda: model(x).loss.backward())
    assert abs(4 * model.flops_per_frame() / counted - 1) < 0.1


# ---------------------------------------------------------------------------- latent actions


def latent_model() -> LatentActionModel:
    torch.manual_seed(0)
    return LatentActionModel(LatentActionConfig(image_size=SIZE, channels=(8, 16), num_latent_actions=4, action_dim=8))


def moving_square(actions: np.ndarray) -> torch.Tensor:
    """A white square on black moved by actions 0..3 (up, down, left, right): ``(1, t, 3, 16, 16)`` uint8."""
    moves = {0: (-2, 0), 1: (2, 0), 2: (0, -2), 3: (0, 2)}
    y, x, images = 6, 6, []
    for action in [None, *actions]:
        if action is not None:
            dy, dx = moves[int(action)]
            y, x = int(np.clip(y + dy, 0, 12)), int(np.clip(x + dx, 0, 12))
        image = torch.zeros(3, *SIZE, dtype=torch.uint8)
        image[:, y : y + 4, x : x + 4] = 255
        images.append(image)
    return torch.stack(images)[None]


def test_latent_actions_learn_the_moves_of_a_square():
    model = latent_model()
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        actions = rng.integers(0, 4, size=(8, 1))
        clips = torch.cat([moving_square(a) for a in actions])
        out = model(clips)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    actions = rng.integers(0, 4, size=(64, 1))
    codes = model.infer(torch.cat([moving_square(a) for a in actions]))
    assert codes.shape == (64, 1)
    assert normalized_mutual_information(actions, codes.numpy()) > 0.3


def test_latent_action_model_bad_input_and_save_load(tmp_path):
    model = latent_model()
    with pytest.raises(ValueError, match="^frames: a transition needs >= 2 frames"):
        model(torch.zeros(1, 1, 3, *SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^frames: expected \(b, t, 3, 16, 16\)"):
        model(torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8))
    model.train()
    model(frames())
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = LatentActionModel.from_pretrained(tmp_path)
    assert torch.equal(model.infer(frames()), loaded.infer(frames()))


def test_latent_action_flops_match_the_counter():
    model = latent_model().train()
    x = frames(batch=2, t=2)
    counted = count_flops(lambda: model(x).loss.backward())
    assert abs(2 * model.flops_per_transition() / counted - 1) < 0.1


def test_normalized_mutual_information():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3] * 4)
    assert normalized_mutual_information(labels, labels) == pytest.approx(1.0)
    assert normalized_mutual_information(labels, (labels + 1) % 4 + 10) == pytest.approx(1.0)  # names do not matter
    assert normalized_mutual_information(labels, np.zeros_like(labels)) == pytest.approx(0.0)
    independent = np.tile([0, 1], 16)
    assert normalized_mutual_information(np.repeat([0, 1], 16), independent) == pytest.approx(0.0, abs=1e-9)
    merged = labels // 2  # a coarser labeling: some, not all, of the information
    assert 0.3 < normalized_mutual_information(labels, merged) < 1.0
    with pytest.raises(ValueError, match="^codes"):
        normalized_mutual_information(labels, labels[:3])


def test_configs_validate():
    with pytest.raises(ValueError, match="^num_latent_actions"):
        LatentActionConfig(num_latent_actions=1)
    with pytest.raises(ValueError, match=r"^channels\[1\]"):
        TokenizerConfig(channels=(8, 0))
    config = TokenizerConfig()
    assert config.token_grid == (8, 8)
    assert dataclasses.replace(config, channels=(8, 8)).token_grid == (16, 16)
