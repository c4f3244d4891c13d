from dataclasses import replace

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

from quintet.data import write_episodes
from quintet.qtransformer import (
    ActionDiscretiser,
    Episode,
    QLearner,
    QTransformer,
    QTransformerConfig,
    ReplayDataset,
    ReplaySpec,
    RewardScaler,
    StateEncoderConfig,
    collect_episodes,
    from_minari,
    to_minari,
)
from quintet.qtransformer.data import discounted_returns, rollout


def episode(length, obs_dim=3, num_actions=2, terminated=True, start=0.0, text=None):
    observations = start + np.arange((length + 1) * obs_dim, dtype=np.float32).reshape(length + 1, obs_dim)
    ends = np.zeros(length, dtype=bool)
    ends[-1] = True
    return Episode(
        observations=observations,
        actions=np.arange(length * num_actions).reshape(length, num_actions) % 4,
        rewards=np.linspace(0.0, 1.0, length, dtype=np.float32),
        terminated=ends if terminated else np.zeros(length, dtype=bool),
        truncated=np.zeros(length, dtype=bool) if terminated else ends,
        attributes={} if text is None else {"text_embed": text},
    )


SPEC = ReplaySpec(reward_scaler=RewardScaler(low=0.0, high=1.0), gamma=0.5, action_bins=4)


def write(tmp_path, episodes, **kwargs):
    return ReplayDataset.write(tmp_path / "replay", episodes, SPEC, **kwargs)


def test_round_trip(tmp_path):
    episodes = [episode(4, text=np.ones(2)), episode(3, terminated=False, start=100.0, text=np.zeros(2))]
    dataset = write(tmp_path, episodes)
    reopened = ReplayDataset(tmp_path / "replay")
    assert len(reopened) == 7 and reopened.num_episodes == 2
    for index, original in enumerate(episodes):
        loaded = reopened.episode(index)
        for name in ("observations", "actions", "rewards", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(original, name))
        np.testing.assert_array_equal(loaded.attributes["text_embed"], original.attributes["text_embed"])
    batch = reopened.batch([0, 5])
    assert batch["text_embeds"].dtype == torch.float32 and batch["text_embeds"].tolist() == [[1, 1], [0, 0]]
    np.testing.assert_allclose(dataset.returns_to_go[:4], discounted_returns(episodes[0].rewards, 0.5), rtol=1e-6)
    np.testing.assert_allclose(dataset.episode_returns(), [e.rewards.sum() for e in episodes], rtol=1e-6)


def test_single_step_batch_keeps_termination_and_truncation_apart(tmp_path):
    dataset = write(tmp_path, [episode(4), episode(3, terminated=False, start=100.0)])
    batch = dataset.batch([0, 3, 6])
    # transition 3 ends episode 0 (terminated), transition 6 ends episode 1 (truncated: not done)
    assert batch["dones"].tolist() == [False, True, False]
    torch.testing.assert_close(batch["obs"][:, 0], torch.tensor(dataset.observations[[0, 3, 7]]))
    torch.testing.assert_close(batch["next_obs"][:, 0], torch.tensor(dataset.observations[[1, 4, 8]]))
    assert batch["obs"].shape == (3, 1, 3) and batch["rewards"].shape == (3,)
    assert batch["actions"].shape == (3, 2)


def test_frame_stacking_repeats_the_first_frame_at_episode_start(tmp_path):
    write(tmp_path, [episode(4), episode(3, start=100.0)])
    dataset = ReplayDataset(tmp_path / "replay", frames=3)
    batch = dataset.batch([5])  # second transition of episode 1 (observation rows 5, 6, ...)
    obs = dataset.observations
    torch.testing.assert_close(batch["obs"][0], torch.tensor(obs[[5, 5, 6]]))
    torch.testing.assert_close(batch["next_obs"][0], torch.tensor(obs[[5, 6, 7]]))


def test_n_step_windows_stop_at_the_episode_end(tmp_path):
    write(tmp_path, [episode(4), episode(3, terminated=False, start=100.0)])
    dataset = ReplayDataset(tmp_path / "replay", n_step=3)
    batch = dataset.batch([0, 2, 5])
    rewards = dataset.reward_scaler(dataset.rewards)
    assert batch["horizon"].tolist() == [3, 2, 2]
    torch.testing.assert_close(batch["rewards"][1], torch.tensor([rewards[2], rewards[3], 0.0], dtype=torch.float32))
    assert batch["dones"].tolist() == [False, True, False]
    torch.testing.assert_close(batch["next_obs"][:, 0], torch.tensor(dataset.observations[[3, 4, 8]]))


def test_learner_trains_on_dataset_batches(tmp_path):
    encoder = StateEncoderConfig(state_dim=8, dim=16, depth=1, num_tokens=2)
    config = QTransformerConfig(num_actions=2, action_bins=4, encoder=encoder, dim=16, depth=1, heads=2, dim_head=8)
    model = QTransformer(replace(config, frames=2, num_learned_tokens=2, q_head_depth=1, q_head_dim_head=8))
    write(
        tmp_path,
        [episode(6, obs_dim=8, text=None), episode(5, obs_dim=8, terminated=False)],
    )
    dataset = ReplayDataset(tmp_path / "replay", frames=2, n_step=2)
    loss, metrics = QLearner(model, n_step=2).loss(dataset.batch(np.arange(len(dataset))))
    loss.backward()
    assert torch.isfinite(loss) and metrics["target_mean"] >= 0


def test_bad_data(tmp_path):
    with pytest.raises(ValueError, match="observations"):
        Episode(
            observations=np.zeros((3, 2)),
            actions=np.zeros((3, 1), dtype=int),
            rewards=np.zeros(3),
            terminated=np.zeros(3, bool),
            truncated=np.zeros(3, bool),
        )
    with pytest.raises(ValueError, match=r"episodes\[0\]: actions: bins must lie in \[0, 2\)"):
        ReplayDataset.write(tmp_path / "bad", [episode(3)], replace(SPEC, action_bins=2))
    with pytest.raises(ValueError, match="actions: expected integer bins"):
        ReplayDataset.write(tmp_path / "bad", [replace(episode(3), actions=np.zeros(3, dtype=int))], SPEC)
    with pytest.raises(TypeError, match="spec"):
        ReplayDataset.write(tmp_path / "bad", [episode(3)], None)
    with pytest.raises(ValueError, match="action_bins"):
        replace(SPEC, discretiser=ActionDiscretiser.from_space(gym.spaces.Discrete(3)))
    with pytest.raises(FileNotFoundError, match="episode store"):
        ReplayDataset(tmp_path / "missing")
    write_episodes(tmp_path / "plain", [episode(3)])  # a store without Q-learning targets
    with pytest.raises(ValueError, match="ReplaySpec"):
        ReplayDataset(tmp_path / "plain")
    dataset = write(tmp_path, [episode(3)])
    with pytest.raises(ValueError, match="indices"):
        dataset.batch([3])


def test_discretiser_round_trip():
    discretiser = ActionDiscretiser.from_space(gym.spaces.Box(-1.0, 1.0, (2,)), bins=5)
    bins = discretiser.to_bins(np.array([[-1.0, 0.26], [1.0, -0.3]]))
    assert bins.tolist() == [[0, 3], [4, 1]]
    np.testing.assert_allclose(discretiser.from_bins(bins), [[-1.0, 0.5], [1.0, -0.5]])
    discrete = ActionDiscretiser.from_space(gym.spaces.Discrete(3))
    assert discrete.to_bins(np.array([2, 0])).tolist() == [[2], [0]]
    assert discrete.from_bins(np.array([[1]])).tolist() == [1]
    with pytest.raises(ValueError, match="bins"):
        discretiser.from_bins(np.array([[5, 0]]))
    with pytest.raises(ValueError, match="bins"):
        ActionDiscretiser.from_space(gym.spaces.Box(-1.0, 1.0, (2,)))


def test_a_shifted_reward_scale_continues_terminated_returns_in_an_absorbing_state():
    scaler = RewardScaler.for_discount(-10.0, 10.0, gamma=0.9)
    assert scaler.terminal_value(0.9) == pytest.approx(0.5)  # raw 0 scales to 0.05 a step: 0.05 / (1 - 0.9)
    assert RewardScaler(low=0.0, high=1.0).terminal_value(0.9) == 0.0  # success rewards: nothing to continue
    with pytest.raises(ValueError, match="reward_scaler"):
        RewardScaler(low=-1.0, high=1.0).terminal_value(0.9)  # 0.5 a step is worth 5 > 1
    spec = ReplaySpec.for_discretiser(ActionDiscretiser.from_space(gym.spaces.Discrete(2)), scaler, 0.9)
    assert spec.terminal_value == pytest.approx(0.5)
    ended, cut = episode(3), episode(3, terminated=False)
    ended.actions, cut.actions = ended.actions[:, :1] % 2, cut.actions[:, :1] % 2
    returns = spec.step_arrays(ended)["returns_to_go"]
    plain = discounted_returns(scaler(ended.rewards), 0.9)
    np.testing.assert_allclose(returns, plain + 0.9 ** np.array([3, 2, 1]) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(spec.step_arrays(cut)["returns_to_go"], plain, rtol=1e-6)  # truncated: bootstrapped


def test_reward_scaler_bounds_discounted_returns():
    scaler = RewardScaler.for_discount(-1.0, 1.0, gamma=0.9)
    rewards = scaler(np.ones(500))
    assert discounted_returns(rewards, 0.9).max() <= 1.0 + 1e-9
    assert scaler(np.array([-5.0]))[0] == 0.0


def test_collect_episodes_from_gymnasium(tmp_path):
    envs = [gym.make("CartPole-v1", max_episode_steps=30) for _ in range(3)]
    discretiser = ActionDiscretiser.from_space(envs[0].action_space)
    rng = np.random.default_rng(0)
    dataset = collect_episodes(
        envs,
        lambda obs: rng.integers(0, 2, size=(len(obs), 1)),
        7,
        tmp_path / "cartpole",
        discretiser=discretiser,
        reward_scaler=RewardScaler.for_discount(0.0, 1.0, 0.98),
        gamma=0.98,
    )
    assert dataset.num_episodes == 7 and dataset.meta["env_id"] == "CartPole-v1"
    ends = dataset.terminated | dataset.truncated
    assert ends.sum() == 7 and not (dataset.terminated & dataset.truncated).any()
    assert dataset.episode_returns().max() <= 30
    # the same seeds reproduce the same first episode
    single = collect_episodes(
        gym.make("CartPole-v1", max_episode_steps=30),
        lambda obs: np.zeros((len(obs), 1), dtype=int),
        1,
        tmp_path / "single",
        discretiser=discretiser,
        reward_scaler=RewardScaler.for_discount(0.0, 1.0, 0.98),
        gamma=0.98,
    )
    first, _ = gym.make("CartPole-v1").reset(seed=0)
    np.testing.assert_array_equal(single.observations[0], first)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_minari_import_and_export(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    rng = np.random.default_rng(0)
    buffers = []
    for index, length in enumerate((5, 8)):
        terminations = [False] * length
        truncations = [False] * length
        (terminations if index == 0 else truncations)[-1] = True
        buffers.append(
            EpisodeBuffer(
                id=index,
                observations=rng.standard_normal((length + 1, 8)).astype(np.float32),
                actions=rng.uniform(-1, 1, (length, 2)).astype(np.float32),
                rewards=list(rng.uniform(-2, 2, length)),
                terminations=terminations,
                truncations=truncations,
                infos={},
            )
        )
    minari.create_dataset_from_buffers(
        "quintet/test-v0", buffers, env="LunarLanderContinuous-v3", data_format="arrow", algorithm_name="random"
    )
    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path / "cache"))
    replay = from_minari("quintet/test-v0", bins=9, gamma=0.9)
    assert replay.path == tmp_path / "cache" / "minari" / "quintet--test-v0"
    assert replay.num_episodes == 2 and len(replay) == 13 and replay.num_actions == 2
    assert replay.terminated.tolist().count(True) == 1 and replay.truncated[-1]
    np.testing.assert_array_equal(replay.episode(1).observations, buffers[1].observations)
    np.testing.assert_array_equal(replay.actions[:5], replay.discretiser.to_bins(buffers[0].actions))
    np.testing.assert_allclose(replay.rewards[5:], buffers[1].rewards, rtol=1e-6)

    exported = to_minari(replay, "quintet/export-v0")
    assert exported.total_episodes == 2 and exported.total_steps == 13
    episode_data = next(iter(exported.iterate_episodes()))
    np.testing.assert_allclose(episode_data.actions, replay.discretiser.from_bins(replay.actions[:5]))
    np.testing.assert_array_equal(episode_data.terminations, replay.terminated[:5])


def test_image_observations_stack_as_channels_frames_height_width(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 8, 8), dtype=np.uint8)
    ends = np.array([False, False, False, True])
    image_episode = Episode(
        observations=images,
        actions=np.zeros((4, 1), dtype=np.int64),
        rewards=np.zeros(4, dtype=np.float32),
        terminated=ends,
        truncated=np.zeros(4, dtype=bool),
    )
    write(tmp_path, [image_episode])
    batch = ReplayDataset(tmp_path / "replay", frames=2).batch([2])
    assert batch["obs"].shape == (1, 3, 2, 8, 8) and batch["obs"].dtype == torch.float32
    torch.testing.assert_close(batch["obs"][0, :, 1], torch.from_numpy(images[2]).float() / 255)
    torch.testing.assert_close(batch["obs"][0, :, 0], torch.from_numpy(images[1]).float() / 255)


class CounterEnv(gym.Env):
    """Observation = the step number; episodes last ``length`` steps."""

    observation_space = gym.spaces.Box(0.0, 100.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int = 4):
        self.length, self.t = length, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([float(self.t)], dtype=np.float32), 1.0, self.t >= self.length, False, {}


def test_rollout_shows_the_policy_stacked_frames_like_the_dataset(tmp_path):
    seen = []

    def policy(observations):
        seen.append(observations[0, :, 0].tolist())
        return np.zeros((len(observations), 1), dtype=np.int64)

    discretiser = ActionDiscretiser.from_space(CounterEnv.action_space)
    dataset = collect_episodes(
        CounterEnv(),
        policy,
        1,
        tmp_path / "counter",
        discretiser=discretiser,
        reward_scaler=RewardScaler(low=0.0, high=1.0),
        gamma=0.9,
        frames=3,
    )
    assert seen == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3]]
    # the dataset stacks the frames the policy saw
    assert dataset.batch(np.arange(4))["obs"][:, :, 0].tolist() == seen
    with pytest.raises(ValueError, match="frames"):
        rollout(CounterEnv(), policy, 1, discretiser=discretiser, frames=0)
