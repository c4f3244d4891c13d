"""The Hugging Face adapter on tiny GPT-2 / Llama / CLIP models built locally from configs (no download)."""

import pytest
import safetensors.torch
import torch

from quintet.core.config import WEIGHTS_FILE, CheckpointError
from quintet.flamingo import Flamingo
from quintet.flamingo.hf import HFFlamingo, decoder_layers

transformers = pytest.importorskip("transformers")

VOCAB, SIZE = 60, 16


def _language_model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _vision_model():
    torch.manual_seed(1)
    config = transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE, patch_size=8
    )
    return transformers.CLIPVisionModel(config).eval()


def _adapter(kind: str, *, open_gates: bool = True, **options) -> HFFlamingo:
    options = dict(num_latents=3, resampler_depth=1, resampler_heads=2, resampler_dim_head=8, **options)
    xattn = dict(cross_attn_heads=2, cross_attn_dim_head=8)
    model = Flamingo.from_hf(_language_model(kind), _vision_model(), **xattn, **options)
    if open_gates:
        with torch.no_grad():
            for block in model.cross_attn.values():
                block.attn_gate.fill_(0.8)
                block.ff_gate.fill_(0.5)
    return model.eval()


def _prompt(model: HFFlamingo, length: int = 14, images_at=(3, 8)) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))
    ids[:, list(images_at)] = model.media_token_id
    ids[:, -2] = model.end_of_chunk_token_id
    return ids


def _images(num: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.rand(2, num, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gates_at_zero_give_the_base_language_model_exactly(kind):
    model = _adapter(kind, open_gates=False)
    base = model.language_model
    assert model.num_tokens == VOCAB + 2 and model.media_token_id == VOCAB
    assert len(model.cross_attn) == 3
    assert decoder_layers(base) is (base.transformer.h if kind == "gpt2" else base.model.layers)
    ids = _prompt(model)
    with torch.no_grad():
        logits = model(ids, _images())
        assert torch.equal(logits[..., :VOCAB], base(inputs_embeds=model.embed(ids)).logits)
        text = torch.randint(0, VOCAB, (2, 9))
        assert torch.equal(model(text)[..., :VOCAB], base(input_ids=text).logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("immediate", [True, False])
def test_masks_text_never_sees_a_later_image(kind, immediate):
    model = _adapter(kind, only_attend_immediate_media=immediate)
    ids, images = _prompt(model, images_at=(3, 8)), _images()
    with torch.no_grad():
        out = model(ids, images)
        base = model.language_model(inputs_embeds=model.embed(ids)).logits
        assert torch.equal(out[:, :3, :VOCAB], base[:, :3])  # text before the first image: the base LM's
        assert not torch.allclose(out[:, 3:, :VOCAB], base[:, 3:])
        changed = images.clone()
        changed[:, 1] = torch.rand(2, 3, SIZE, SIZE)
        other = model(ids, changed)
    assert torch.equal(out[:, :8], other[:, :8]) and not torch.allclose(out[:, 8:], other[:, 8:])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_decoding_equals_uncached(kind):
    model = _adapter(kind)
    ids, images = _prompt(model, length=16, images_at=(0, 5)), _images()
    with torch.no_grad():
        full = model(ids, images)
        cache = model.new_cache()
        chunks = [model(ids[:, :7], images, cache=cache)]
        chunks += [model(ids[:, i : i + 1], cache=cache) for i in range(7, 16)]
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    prompt = ids[:, :7]
    tokens = model.generate(prompt, 8, images=images, temperature=0.0)
    assert torch.equal(tokens, model.generate(prompt, 8, images=images, temperature=0.0, use_cache=False))


def test_bad_input_names_the_argument():
    model = _adapter("gpt2")
    ids = _prompt(model)
    with pytest.raises(ValueError, match="^images: row 0 of ids holds 2"):
        model(ids, _images(num=1))
    with pytest.raises(ValueError, match="^images: expected"):
        model(ids, torch.rand(2, 2, 3, 8, 8))
    with pytest.raises(ValueError, match="^ids: expected at least one token"):
        model(ids[:, :0])
    with pytest.raises(ValueError, match="^ids: ids must lie in"):
        model(ids + VOCAB)


def test_training_changes_only_the_added_weights():
    model = _adapter("llama").train()
    base_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    added = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(trainable) == len(added)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _prompt(model)
    for _ in range(2):
        logits = model(ids[:, :-1], _images())
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, model.language_model.state_dict()[k]) for k, v in base_before.items())
    assert all(torch.equal(v, model.vision_model.state_dict()[k]) for k, v in vision_before.items())
    assert all(not torch.equal(v, model.state_dict()[k]) for k, v in added.items())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_save_saves_only_the_adapter_and_load_rebuilds_the_whole(kind, tmp_path):
    _language_model(kind).save_pretrained(tmp_path / "lm")
    _vision_model().save_pretrained(tmp_path / "vision")
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    vision = transformers.AutoModel.from_pretrained(tmp_path / "vision")
    model = HFFlamingo.from_hf(lm, vision, num_latents=3, resampler_depth=1, cross_attn_every=2).eval()
    with torch.no_grad():
        for p in model.state_dict().values():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    saved = safetensors.torch.load_file(str(tmp_path / "adapter" / WEIGHTS_FILE))
    assert set(saved) == set(model.state_dict()) and not any(k.startswith("language_model") for k in saved)
    assert set(model.state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}

    loaded = HFFlamingo.from_pretrained(tmp_path / "adapter", local_files_only=True)
    assert loaded.config == model.config
    ids, images = _prompt(model), _images()
    with torch.no_grad():
        assert torch.equal(loaded(ids, images), model(ids, images))

    other = _language_model(kind)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(3.0)
    with pytest.raises(CheckpointError, match="language_model is not the base model"):
        HFFlamingo.from_pretrained(tmp_path / "adapter", language_model=other)
