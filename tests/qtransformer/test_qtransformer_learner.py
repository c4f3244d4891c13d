import pytest
import torch

from quintet.qtransformer import QLearner, QTransformer, QTransformerConfig, StateEncoderConfig
from quintet.qtransformer.learner import q_losses, td_targets

# ---------------------------------------------------------------- hand-built 2-dimension, 3-bin example

# target network's Q(s', a_1) over the first dimension's bins, two samples
NEXT_Q_FIRST = torch.tensor([[0.2, 0.7, 0.4], [0.9, 0.1, 0.3]])
# target network's Q(s, .) for dimension 1 and Q(s, a_1, .) for dimension 2 (teacher-forced on data)
Q_ALONG = torch.tensor(
    [
        [[0.5, 0.6, 0.1], [0.3, 0.8, 0.2]],
        [[0.4, 0.2, 0.9], [0.6, 0.5, 0.55]],
    ]
)
REWARDS = torch.tensor([0.1, 0.0])
DONES = torch.tensor([False, True])
GAMMA = 0.9


def test_eq1_targets_hand_built():
    targets = td_targets(NEXT_Q_FIRST, Q_ALONG, REWARDS, DONES, gamma=GAMMA)
    expected = torch.tensor(
        [
            # dim 1 -> max_a2 Q(s, a_1, a2); dim 2 -> r + gamma max_a1 Q(s', a1)
            [0.8, 0.1 + 0.9 * 0.7],
            # terminated: no bootstrap on the last dimension
            [0.6, 0.0],
        ]
    )
    torch.testing.assert_close(targets, expected)


def test_mc_lower_bound_and_n_step():
    targets = td_targets(NEXT_Q_FIRST, Q_ALONG, REWARDS, DONES, gamma=GAMMA, returns_to_go=torch.tensor([0.75, 0.5]))
    torch.testing.assert_close(targets, torch.tensor([[0.8, 0.75], [0.6, 0.5]]))
    # 3-step returns; the second sample's episode ended (truncated) after 2 steps: bootstrap gamma^2
    rewards = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.1, 0.0]])
    targets = td_targets(
        NEXT_Q_FIRST, None, rewards, torch.tensor([False, False]), gamma=GAMMA, horizon=torch.tensor([3, 2])
    )
    expected = torch.tensor([[0.1 + 0.9 * 0.2 + 0.81 * 0.3 + 0.729 * 0.7], [0.5 + 0.9 * 0.1 + 0.81 * 0.9]])
    torch.testing.assert_close(targets, expected)


def test_a_termination_bootstraps_the_absorbing_value_of_a_shifted_reward_scale():
    targets = td_targets(NEXT_Q_FIRST, Q_ALONG, REWARDS, DONES, gamma=GAMMA, terminal_value=0.5)
    # the terminated sample continues in a state worth 0.5 (raw reward 0 forever); the other is unchanged
    torch.testing.assert_close(targets, torch.tensor([[0.8, 0.1 + 0.9 * 0.7], [0.6, 0.9 * 0.5]]))
    with pytest.raises(ValueError, match="terminal_value"):
        model = QTransformer(QTransformerConfig(num_actions=1, action_bins=2, encoder=STATE, dim=16))
        QLearner(model, terminal_value=2.0)


def test_eq2_losses_hand_built():
    q = torch.tensor([[[0.5, 0.6, 0.1], [0.3, 0.8, 0.2]]])
    actions = torch.tensor([[1, 0]])
    targets = torch.tensor([[0.7, 0.5]])
    td, conservative = q_losses(q, actions, targets)
    torch.testing.assert_close(td, torch.tensor(0.5 * ((0.6 - 0.7) ** 2 + (0.3 - 0.5) ** 2) / 2))
    # not-taken bins pushed to 0: dim 1 {0.5, 0.1}, dim 2 {0.8, 0.2}
    expected = 0.5 * ((0.25 + 0.01) / 2 + (0.64 + 0.04) / 2) / 2
    torch.testing.assert_close(conservative, torch.tensor(expected))


# ---------------------------------------------------------------- with the model

STATE = StateEncoderConfig(state_dim=3, dim=16, depth=1, num_tokens=2)


def make(num_actions=2, text=False, seed=0) -> QTransformer:
    torch.manual_seed(seed)
    return QTransformer(
        QTransformerConfig(
            num_actions=num_actions,
            action_bins=3,
            encoder=StateEncoderConfig(state_dim=4, dim=16, depth=1, num_tokens=2),
            dim=16,
            depth=1,
            heads=2,
            dim_head=8,
            num_learned_tokens=2,
            q_head_depth=1,
            q_head_heads=2,
            q_head_dim_head=8,
            condition_on_text=text,
            text_embed_dim=5 if text else None,
            cond_drop_prob=0.0,
        )
    )


def batch(model: QTransformer, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = model.config.num_actions
    out = {
        "obs": torch.randn(size, 1, 4, generator=g),
        "actions": torch.randint(3, (size, d) if d > 1 else (size,), generator=g),
        "rewards": torch.rand(size, generator=g) * 0.1,
        "next_obs": torch.randn(size, 1, 4, generator=g),
        "dones": torch.rand(size, generator=g) < 0.3,
        "returns_to_go": torch.rand(size, generator=g) * 0.3,
    }
    if model.config.condition_on_text:
        out["text_embeds"] = torch.randn(size, 5, generator=g)
    return out


@pytest.mark.parametrize("num_actions, text", [(2, False), (3, True)])
def test_targets_come_from_the_target_network(num_actions, text):
    model = make(num_actions, text)
    learner = QLearner(model, gamma=GAMMA, mc_lower_bound=False)
    data = batch(model)
    with torch.no_grad():
        model.q_head.q_bias.add_(1.0)  # the online model moves, the target does not
    # each pass on its own: Q along the data's actions at s, and the first dimension's Q at s'
    text_embeds = data.get("text_embeds")
    q_along = learner.target(data["obs"], actions=data["actions"], text_embeds=text_embeds)
    next_q = learner.target(data["next_obs"], text_embeds=text_embeds)[:, 0]
    expected = td_targets(next_q, q_along, data["rewards"], data["dones"], gamma=GAMMA)
    torch.testing.assert_close(learner.targets(data), expected)


def test_target_is_an_ema_of_the_online_model():
    model = make()
    learner = QLearner(model, target_ema=0.75)
    before = learner.target.q_head.q_bias.clone()
    with torch.no_grad():
        model.q_head.q_bias.add_(1.0)
    learner.update_target()
    torch.testing.assert_close(learner.target.q_head.q_bias, 0.75 * before + 0.25 * model.q_head.q_bias)
    assert not any(p.requires_grad for p in learner.target.parameters())


@pytest.mark.parametrize("num_actions, text", [(1, False), (3, False), (2, True)])
def test_loss_falls_when_overfitting_one_batch(num_actions, text):
    model = make(num_actions=num_actions, text=text)
    learner = QLearner(model, target_ema=0.9)
    data = batch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first, metrics = learner.loss(data)
    assert set(metrics) == {"td_loss", "conservative_loss", "q_mean", "target_mean"}
    for _ in range(60):
        loss, _ = learner.loss(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.update_target()
    assert loss.item() < 0.5 * first.item()


def test_bad_batches():
    model = make()
    learner = QLearner(model)
    data = batch(model)
    with pytest.raises(ValueError, match="missing"):
        learner.loss({k: v for k, v in data.items() if k != "dones"})
    with pytest.raises(ValueError, match="actions"):
        learner.loss(dict(data, actions=data["actions"][:, :1]))
    with pytest.raises(ValueError, match="actions"):
        learner.loss(dict(data, actions=data["actions"] + 3))
    with pytest.raises(ValueError, match="rewards"):
        learner.loss(dict(data, rewards=data["rewards"][:3]))
    with pytest.raises(ValueError, match="n_step"):
        QLearner(model, n_step=3).loss(dict(data, rewards=data["rewards"][:, None].repeat(1, 2)))
    # (b,) rewards are one-step transitions whatever the n-step horizon
    torch.testing.assert_close(QLearner(model, n_step=3).targets(data), learner.targets(data))
    with pytest.raises(ValueError, match="next_obs"):
        learner.loss(dict(data, next_obs=data["next_obs"][:, :, :2]))
    with pytest.raises(ValueError, match="gamma"):
        QLearner(model, gamma=1.5)


def count_training_flops(fn) -> float:
    """FlopCounterMode's count of ``fn``, with its convolution backward counting groups: torch's formula
    counts a depthwise conv's gradients as a dense conv's (``groups`` times too many), which its
    forward formula does not."""
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

    from quintet.training.flops import _cpu_attention_flops

    def conv_backward(grad_out_shape, x_shape, w_shape, *args, **kwargs) -> int:
        output_mask = args[7]
        return sum(output_mask[:2]) * conv_flop_count(x_shape, w_shape, grad_out_shape)

    mapping = _cpu_attention_flops() | {torch.ops.aten.convolution_backward: conv_backward}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return float(counter.get_total_flops())


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", {}),
        ("tiny", {"num_actions": 1, "dueling": True}),
        ("babyai-tiny", {}),
        ("babyai-tiny", {"encoder_patch": 4}),
    ],
    ids=["states-2-dims", "states-1-dim-dueling", "pixels-conv-stem", "pixels-patch-stem"],
)
def test_batch_flops_formula_matches_a_count_of_the_training_step(preset, overrides):
    """MFU's numerator: the Task's batch_flops within 10 % of what FlopCounterMode counts in a step
    (the online forward + backward and the target network's forward)."""
    from dataclasses import replace

    from quintet.qtransformer.flops import training_step_flops
    from quintet.qtransformer.system import QTransformerSystem

    overrides = dict(overrides)
    system = QTransformerSystem()
    config = system.presets()[preset].stages[0].model_config
    if "encoder_patch" in overrides:
        config = replace(config, encoder=replace(config.encoder, patch_size=overrides.pop("encoder_patch")))
    config = replace(config, **overrides)
    torch.manual_seed(0)
    model = QTransformer(config)
    learner = QLearner(model)
    example = system.example_batch(model, batch_size=6, generator=torch.Generator().manual_seed(0))
    counted = count_training_flops(lambda: learner.loss(example)[0].backward())
    assert counted == pytest.approx(training_step_flops(config, example), rel=0.1)
