"""Genie dynamics: causality, action alignment, length masks, no-action training, cached == uncached
decoding, parallel decoding, the action head, bad input, FLOPs."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from quintet.bench import count_flops
from quintet.genie import ClipBatch, FrameDecoder, Genie, GenieConfig, dynamics_loss, imagine, training_choices
from quintet.genie.dynamics import NO_KEY
from quintet.genie.objectives import key_sets_to_multi_hot

TOL = 1e-5
CODES, ACTIONS, GRID, FRAMES = 13, 5, (2, 3), 4
S = GRID[0] * GRID[1]
OBJECTIVES = ["autoregressive", "maskgit"]


def make(objective="maskgit", **overrides) -> Genie:
    torch.manual_seed(0)
    options = dict(
        num_codes=CODES,
        token_grid=GRID,
        max_frames=6,
        dim=32,
        depth=2,
        heads=2,
        dim_head=16,
        objective=objective,
        num_actions=ACTIONS,
        num_meta_tokens=2,
    )
    options.update(overrides)
    return Genie(GenieConfig(**options)).eval()


def clip(batch=1, frames=FRAMES, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CODES, (batch, frames, *GRID), generator=g)
    actions = torch.randint(0, ACTIONS, (batch, frames - 1), generator=g)
    return tokens, actions


def flat_logits(model, tokens, actions, **kwargs):
    with torch.no_grad():
        return model(tokens, actions, **kwargs).logits.flatten(1, 3)  # (b, (t-1) S, v): frames 1.. in raster order


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_changing_a_token_never_changes_earlier_logits(objective):
    model = make(objective)
    tokens, actions = clip()
    # maskgit: a partial mask, so the masked copies do read some of their own frame's tokens
    mask = torch.zeros(1, FRAMES - 1, *GRID, dtype=torch.bool)
    mask[..., 0, :] = True
    kwargs = {"token_mask": mask} if objective == "maskgit" else {}
    reference = flat_logits(model, tokens, actions, **kwargs)[0]
    for frame in range(FRAMES):
        for index in range(S):
            changed = tokens.clone()
            changed.view(1, FRAMES, S)[0, frame, index] = (changed.view(1, FRAMES, S)[0, frame, index] + 1) % CODES
            logits = flat_logits(model, changed, actions, **kwargs)[0]
            # logits[p] predicts token p + S of the clip (frame 0 is given, not predicted)
            position = frame * S + index
            if objective == "autoregressive":
                unchanged = position - S + 1  # predictions of this token and all before it
            else:
                unchanged = (frame - 1) * S  # predictions of every earlier frame (frame-causal)
            if unchanged > 0:
                assert (logits[:unchanged] - reference[:unchanged]).abs().max() <= 1e-6, (frame, index)
            if frame < FRAMES - 1 and unchanged < len(reference):  # not vacuous: later predictions move
                assert (logits[max(unchanged, 0) :] - reference[max(unchanged, 0) :]).abs().max() > 1e-4


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_action_conditions_every_token_of_the_next_frame_and_nothing_before(objective):
    model = make(objective)
    tokens, actions = clip()
    reference = flat_logits(model, tokens, actions)[0].view(FRAMES - 1, S, -1)
    for step in range(FRAMES - 1):
        changed = actions.clone()
        changed[0, step] = (changed[0, step] + 1) % ACTIONS
        logits = flat_logits(model, tokens, changed)[0].view(FRAMES - 1, S, -1)
        # logits[i] predict frame i + 1; a_step leads to frame step + 1 = logits[step]
        assert (logits[:step] - reference[:step]).abs().max() <= 1e-6 if step else True
        moved = (logits[step] - reference[step]).abs().amax(-1)
        assert moved[0] > 1e-4, "the first token of the next frame must see the action that produced it"
        assert (moved > 1e-4).all(), "every token of the next frame sees the action"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_padding_never_changes_real_outputs_and_loss_ignores_it(objective):
    model = make(objective)
    tokens, actions = clip(batch=2, frames=5)
    lengths = torch.tensor([3, 5])
    padded = flat_logits(model, tokens, actions, lengths=lengths)
    short = flat_logits(model, tokens[:1, :3], actions[:1, :2])
    assert (padded[0, : 2 * S] - short[0]).abs().max() <= TOL
    junk = tokens.clone()
    junk[0, 3:] = (junk[0, 3:] + 7) % CODES
    junk_actions = actions.clone()
    junk_actions[0, 2:] = (junk_actions[0, 2:] + 1) % ACTIONS
    again = flat_logits(model, junk, junk_actions, lengths=lengths)
    assert (again[0, : 2 * S] - padded[0, : 2 * S]).abs().max() <= TOL
    assert (again[1] - padded[1]).abs().max() <= TOL

    config = model.config
    token_mask, _ = training_choices(config, 2, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = dynamics_loss(
            model, config, ClipBatch(tokens=tokens, actions=actions, lengths=lengths, token_mask=token_mask)
        )
        trimmed, _ = dynamics_loss(
            model,
            config,
            ClipBatch(
                tokens=junk,
                actions=junk_actions,
                lengths=lengths,
                token_mask=token_mask,
            ),
        )
    assert torch.allclose(full, trimmed, atol=1e-6), "padded frames must not enter the loss"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_model_without_actions_trains_and_imagines(objective):
    model = make(objective, num_actions=None).train()
    config = model.config
    tokens = torch.randint(0, CODES, (1, 4, *GRID)).repeat(4, 1, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        token_mask, hide = training_choices(config, 4, 4, generator=torch.Generator().manual_seed(step))
        assert hide is None
        loss, _ = dynamics_loss(model, config, ClipBatch(tokens=tokens, token_mask=token_mask))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    new = imagine(model.eval(), tokens[:1, :2], None, 3, temperature=0.0)
    assert new.shape == (1, 3, *GRID)
    with pytest.raises(ValueError, match="^actions: this model was built without actions"):
        model(tokens, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="^cfg_scale"):
        FrameDecoder(model, cfg_scale=2.0)


CACHE_CASES = [
    pytest.param(objective, options, id=f"{objective}-{name}")
    for objective in OBJECTIVES
    for name, options in {
        "plain": {},
        "guided": {"cfg_scale": 2.5},
        "window": {"window": 3},
        "sampled": {"temperature": 1.0, "top_k": 5, "min_p": 0.05},
    }.items()
]


@pytest.mark.parametrize("objective, options", CACHE_CASES)
def test_cached_decoding_equals_uncached_at_every_step(objective, options):
    model = make(objective, action_dropout=0.1)
    tokens, actions = clip(batch=2, frames=2)
    steps = torch.randint(0, ACTIONS, (2, 4), generator=torch.Generator().manual_seed(3))
    options = {"temperature": 0.0, **options}
    runs = {}
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(7)
        decoder = FrameDecoder(model, use_cache=use_cache, keep_logits=True, generator=generator, **options)
        decoder.reset(tokens, actions)
        frames = [decoder.step(steps[:, i]) for i in range(steps.shape[1])]
        runs[use_cache] = (torch.stack(frames, 1), decoder.logits)
    assert torch.equal(runs[True][0], runs[False][0])
    for cached, uncached in zip(runs[True][1], runs[False][1]):
        assert (cached - uncached).abs().max() <= TOL


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_decoding_sees_what_training_sees(objective):
    """The logits a greedy decode uses equal the teacher-forced forward's on the decoded clip."""
    model = make(objective)
    tokens, actions = clip(frames=2)
    decoder = FrameDecoder(model, temperature=0.0, keep_logits=True, steps=1)
    decoder.reset(tokens, actions[:, :1])
    action = torch.tensor([2])
    new = decoder.step(action)
    whole = torch.cat((tokens, new[:, None]), dim=1)
    forward = model(whole, torch.cat((actions[:, :1], action[:, None]), dim=1)).logits[:, -1].flatten(1, 2)
    used = decoder.logits[0] if objective == "autoregressive" else decoder.logits[0][:, 0]  # maskgit: all masked
    assert (forward - used).abs().max() <= TOL


def test_parallel_decoding_is_deterministic_at_temperature_zero_and_seeded_otherwise():
    model = make("maskgit")
    tokens, actions = clip(frames=2)
    steps = torch.tensor([[1, 4, 0]])
    greedy = [imagine(model, tokens, torch.cat((actions[:, :1], steps), 1), 3, temperature=0.0) for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])

    def sampled(seed):
        g = torch.Generator().manual_seed(seed)
        return imagine(model, tokens, torch.cat((actions[:, :1], steps), 1), 3, temperature=1.5, generator=g)

    assert torch.equal(sampled(1), sampled(1))
    assert not torch.equal(sampled(1), sampled(2))


def test_multi_key_actions_are_sets():
    model = make("autoregressive", max_keys=3)
    tokens, _ = clip(frames=3)
    keys = torch.tensor([[[0, 2, NO_KEY], [NO_KEY, NO_KEY, NO_KEY]]])
    one_fewer = torch.tensor([[[0, 2], [NO_KEY, NO_KEY]]])  # fewer columns than max_keys: fine
    a = flat_logits(model, tokens, keys)
    assert torch.allclose(a, flat_logits(model, tokens, one_fewer), atol=1e-6)
    other = torch.tensor([[[1, 2, NO_KEY], [NO_KEY, NO_KEY, NO_KEY]]])
    assert (flat_logits(model, tokens, other)[0, :S] - a[0, :S]).abs().max() > 1e-4
    assert torch.equal(key_sets_to_multi_hot(keys[0], ACTIONS), torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="^actions: at most max_keys=3"):
        model(tokens, torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="^actions: the keys of a step must be sorted"):
        model(tokens, torch.tensor([[[2, 0, NO_KEY], [NO_KEY, NO_KEY, NO_KEY]]]))
    with pytest.raises(ValueError, match="^actions: padding"):
        model(tokens, torch.tensor([[[NO_KEY, 0, NO_KEY], [NO_KEY, NO_KEY, NO_KEY]]]))
    with pytest.raises(ValueError, match=r"^actions: keys must lie in \[0, 5\)"):
        model(tokens, torch.tensor([[[0, 5, NO_KEY], [NO_KEY, NO_KEY, NO_KEY]]]))


@pytest.mark.parametrize("max_keys", [1, 2])
def test_action_head_learns_only_where_the_action_was_hidden(max_keys):
    model = make("autoregressive", max_keys=max_keys, action_dropout=0.5, action_loss_weight=1.0)
    tokens, actions = clip(batch=2, frames=4)
    if max_keys == 2:
        actions = torch.stack((actions, torch.full_like(actions, NO_KEY)), dim=-1)
    hidden = torch.zeros(2, 3, dtype=torch.bool)
    hidden[:, 1] = True
    with torch.no_grad():
        base = model(tokens, actions, hide_actions=hidden).action_logits
        changed = actions.clone()
        first_key = changed[:, 1] if max_keys == 1 else changed[:, 1, 0]
        first_key.add_(1).remainder_(ACTIONS)  # a different (hidden) action at step 1
        again = model(tokens, changed, hide_actions=hidden).action_logits
    # the head predicting a hidden action never sees it
    assert (again[:, 1] - base[:, 1]).abs().max() <= 1e-6
    _, metrics = dynamics_loss(model, model.config, ClipBatch(tokens=tokens, actions=actions, hide_actions=hidden))
    assert "action_loss" in metrics and metrics["action_loss"] > 0
    _, none_hidden = dynamics_loss(
        model, model.config, ClipBatch(tokens=tokens, actions=actions, hide_actions=torch.zeros_like(hidden))
    )
    assert none_hidden["action_loss"] == 0


def test_bad_input_names_the_argument():
    model = make("maskgit")
    tokens, actions = clip()
    with pytest.raises(ValueError, match=r"^tokens: expected \(b, t, 2, 3\)"):
        model(torch.zeros(1, 4, 3, 3, dtype=torch.long), actions)
    with pytest.raises(ValueError, match=r"^tokens: ids must lie in \[0, 13\)"):
        model(tokens + CODES, actions)
    with pytest.raises(TypeError, match="^tokens: expected a int tensor"):
        model(tokens.float(), actions)
    with pytest.raises(ValueError, match=r"^actions: ids must lie in \[0, 5\)"):
        model(tokens, actions + ACTIONS)
    with pytest.raises(ValueError, match="^actions: expected"):
        model(tokens, actions[:, :1])
    with pytest.raises(ValueError, match="^tokens: at most max_frames=6"):
        model(torch.zeros(1, 7, *GRID, dtype=torch.long))
    with pytest.raises(ValueError, match="^tokens: a clip needs >= 2 frames"):
        model(tokens[:, :1])
    with pytest.raises(ValueError, match="^lengths: expected clip lengths"):
        model(tokens, actions, lengths=torch.tensor([0]))
    with pytest.raises(ValueError, match="^token_mask: expected shape"):
        model(tokens, actions, token_mask=torch.ones(1, 4, *GRID, dtype=torch.bool))
    with pytest.raises(ValueError, match="^token_mask: only the maskgit"):
        make("autoregressive")(tokens, actions, token_mask=torch.ones(1, 3, *GRID, dtype=torch.bool))
    decoder = FrameDecoder(model)
    with pytest.raises(ValueError, match="^step: call reset"):
        decoder.step(torch.tensor([0]))
    decoder.reset(tokens[:, :2], actions[:, :1])
    with pytest.raises(ValueError, match=r"^action: ids must lie in \[0, 5\)"):
        decoder.step(torch.tensor([9]))
    with pytest.raises(ValueError, match="^cfg_scale"):
        FrameDecoder(model, cfg_scale=-1.0)
    with pytest.raises(ValueError, match="^action_loss_weight"):
        dataclasses.replace(model.config, action_loss_weight=0.1)
    with pytest.raises(ValueError, match="^objective"):
        dataclasses.replace(model.config, objective="diffusion")


def test_save_load_is_exact(tmp_path):
    model = make("maskgit", max_keys=2, action_dropout=0.2, action_loss_weight=0.1)
    model.save_pretrained(tmp_path)
    loaded = Genie.from_pretrained(tmp_path)
    assert loaded.config == model.config
    tokens, _ = clip()
    keys = torch.tensor([[[0, 1], [2, NO_KEY], [NO_KEY, NO_KEY]]])
    assert torch.equal(model(tokens, keys).logits, loaded(tokens, keys).logits)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_flops_formula_matches_the_flop_counter(objective):
    model = make(objective, action_dropout=0.5, action_loss_weight=0.1).train()
    tokens, actions = clip(batch=2)
    # the math backend spells attention out as matmuls the counter sees (CPU's fused kernel it does not)
    with sdpa_kernel(SDPBackend.MATH):
        counted = count_flops(lambda: model(tokens, actions).logits.sum().backward())
    assert abs(counted - 2 * model.flops_per_clip(FRAMES)) <= 0.1 * counted


def test_changed_tokens_can_weigh_more_in_the_loss():
    plain = make("autoregressive")
    heavy = make("autoregressive", changed_token_weight=5.0)
    heavy.load_state_dict(plain.state_dict())
    tokens, actions = clip(batch=2)
    tokens[:, 2] = tokens[:, 1]  # frame 2 repeats frame 1: none of its tokens changed
    batch = ClipBatch(tokens=tokens, actions=actions)
    with torch.no_grad():
        loss_plain, metrics_plain = dynamics_loss(plain, plain.config, batch)
        loss_heavy, metrics_heavy = dynamics_loss(heavy, heavy.config, batch)
        ce = torch.nn.functional.cross_entropy(
            plain(tokens, actions).logits.flatten(0, -2), tokens[:, 1:].flatten(), reduction="none"
        ).view(tokens[:, 1:].shape)
    weight = torch.where(tokens[:, 1:] != tokens[:, :-1], 5.0, 1.0)
    assert torch.allclose(loss_heavy, (ce * weight).sum() / weight.sum(), atol=1e-5)
    assert torch.allclose(loss_plain, ce.mean(), atol=1e-5)
    assert torch.allclose(metrics_heavy["token_loss"], metrics_plain["token_loss"])  # reported unweighted
