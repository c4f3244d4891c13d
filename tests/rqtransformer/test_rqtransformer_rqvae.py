"""The RQ-VAE tokenizer: shapes, coarse-to-fine decoding, gradients, bad input, FLOPs, save/load."""

import pytest
import torch

from quintet.bench import count_flops
from quintet.core import CheckpointError
from quintet.rqtransformer import RQVAE, RQTransformer, RQVAEConfig
from quintet.rqtransformer.rqvae import psnr_from_mse


def make(**overrides) -> RQVAE:
    fields = dict(image_size=16, channels=(8, 16), latent_dim=8, codebook_size=16, depth=3, res_blocks=1)
    fields.update(overrides)
    torch.manual_seed(0)
    return RQVAE(RQVAEConfig(**fields))


def test_shapes_and_decode_of_encode_is_the_reconstruction():
    model = make()
    images = torch.rand(3, 3, 16, 16)
    model.train()
    model(images)  # one training step initialises the codebook from data
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out.reconstruction.shape == images.shape and out.codes.shape == (3, 8, 8, 3)
    codes = model.encode(images)
    assert codes.dtype == torch.long and torch.equal(codes, out.codes)
    assert torch.allclose(model.decode(codes), out.reconstruction.clamp(0, 1), atol=1e-6)
    assert torch.allclose(model.decode(codes, depth=3), model.decode(codes))
    assert model.decode(codes, depth=1).shape == images.shape
    # any size divisible by the downsampling factor encodes, not only the training size
    assert model.encode(torch.rand(1, 3, 8, 24)).shape == (1, 4, 12, 3)


def test_gradients_reach_encoder_and_decoder():
    model = make()
    images = torch.rand(2, 3, 16, 16)
    model.train()
    loss, metrics = model.loss(model(images), images)
    loss.backward()
    for part in (model.encoder, model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert {"recon_mse", "recon_psnr", "codebook_usage", "perplexity", "dead_codes"} <= set(metrics)
    assert all(not value.requires_grad for value in metrics.values())


def test_bad_input_names_the_argument():
    model = make()
    with pytest.raises(ValueError, match="^images: height and width must be positive multiples of"):
        model(torch.rand(1, 3, 15, 16))
    with pytest.raises(ValueError, match="^images: expected 3 channels"):
        model.encode(torch.rand(1, 1, 16, 16))
    with pytest.raises(TypeError, match="^images:"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="^codes: ids must lie in"):
        model.decode(torch.full((1, 8, 8, 3), 16))
    with pytest.raises(ValueError, match="^codes: expected depth 3"):
        model.decode(torch.zeros(1, 8, 8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="^depth:"):
        model.decode(torch.zeros(1, 8, 8, 3, dtype=torch.long), depth=4)
    with pytest.raises(ValueError, match="^image_size: 30 is not divisible by the downsampling factor 4"):
        RQVAEConfig(image_size=30, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="^channels:"):
        RQVAEConfig(image_size=32, channels=(8,))
    with pytest.raises(ValueError, match="^distance:"):
        RQVAEConfig(image_size=32, distance="manhattan")


@pytest.mark.parametrize("overrides", [dict(), dict(channels=(8, 16, 16), res_blocks=2, depth=2)], ids=["f2", "f4"])
def test_analytic_flops_match_the_counter(overrides):
    model = make(**overrides).train()
    images = torch.rand(2, 3, 16, 16)
    model(images)  # initialise the codebook outside the count

    def step():
        loss, _ = model.loss(model(images), images)
        loss.backward()

    counted = count_flops(step)
    assert abs(2 * model.flops_per_sample(16) / counted - 1) < 0.1, (2 * model.flops_per_sample(16), counted)


def test_save_load_exact(tmp_path):
    model = make()
    images = torch.rand(4, 3, 16, 16)
    model.train()
    for _ in range(3):  # EMA statistics and usage counters move: they are saved too
        model(images)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = RQVAE.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(loaded.encode(images), model.encode(images))
    with pytest.raises(CheckpointError, match="holds a RQVAEConfig"):
        RQTransformer.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        RQVAE.from_pretrained(tmp_path)


def test_psnr():
    assert psnr_from_mse(0.01) == pytest.approx(20.0)
    assert float(psnr_from_mse(torch.tensor(0.001))) == pytest.approx(30.0)
