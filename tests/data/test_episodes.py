from dataclasses import dataclass, replace

import gymnasium as gym
import numpy as np
import pytest

from quintet.data import (
    Episode,
    EpisodeSpec,
    EpisodeStore,
    read_minari,
    record,
    resize_frames,
    rollout,
    write_episodes,
    write_minari,
)
from quintet.data import episodes as episodes_module


def image_episode(length, *, seed=0, instruction="go to the red ball", success=True, float_actions=False):
    rng = np.random.default_rng(seed)
    ends = np.zeros(length, dtype=bool)
    ends[-1] = True
    actions = rng.uniform(-1, 1, (length, 2)).astype(np.float32) if float_actions else rng.integers(0, 7, length)
    return Episode(
        observations=rng.integers(0, 256, (length + 1, 3, 8, 8), dtype=np.uint8),
        actions=actions,
        rewards=rng.standard_normal(length).astype(np.float32),
        terminated=ends,
        truncated=np.zeros(length, dtype=bool),
        attributes={"instruction": instruction, "success": success, "embedding": rng.standard_normal(4)},
    )


def counting_episode(length, start):
    """Observation t of the episode is ``start + t``; action t is ``start + t`` too (the frame it follows)."""
    ends = np.zeros(length, dtype=bool)
    ends[-1] = True
    return Episode(
        observations=start + np.arange(length + 1, dtype=np.int64)[:, None],
        actions=start + np.arange(length),
        rewards=np.ones(length, dtype=np.float32),
        terminated=np.zeros(length, dtype=bool),
        truncated=ends,
    )


def test_round_trip_keeps_uint8_images_attributes_and_maps_memory(tmp_path):
    episodes = [image_episode(5, seed=0), image_episode(3, seed=1, instruction="pick up the key", success=False)]
    store = EpisodeStore(write_episodes(tmp_path / "store", episodes, env_id="BabyAI-GoToLocal-v0"))
    assert isinstance(store.observations, np.memmap) and isinstance(store.actions, np.memmap)
    assert store.observations.dtype == np.uint8 and store.observations.shape == (10, 3, 8, 8)
    assert (tmp_path / "store" / "observations.npy").stat().st_size < 10 * 3 * 8 * 8 + 256  # one byte a pixel
    assert len(store) == 8 and store.num_episodes == 2 and store.lengths.tolist() == [5, 3]
    assert store.env_id == "BabyAI-GoToLocal-v0"
    for index, original in enumerate(episodes):
        loaded = store.episode(index)
        for name in ("observations", "actions", "rewards", "terminated", "truncated"):
            assert getattr(loaded, name).dtype == getattr(original, name).dtype
            assert getattr(loaded, name).tobytes() == getattr(original, name).tobytes()
        assert loaded.attributes["instruction"] == original.attributes["instruction"]
        assert loaded.attributes["success"] is original.attributes["success"]
        np.testing.assert_array_equal(loaded.attributes["embedding"], original.attributes["embedding"])
    assert store.attributes["instruction"].tolist() == ["go to the red ball", "pick up the key"]
    np.testing.assert_allclose(store.episode_returns(), [e.rewards.sum() for e in episodes], rtol=1e-6)

    floats = EpisodeStore(write_episodes(tmp_path / "floats", [image_episode(4, float_actions=True)]))
    assert floats.actions.dtype == np.float32 and floats.actions.shape == (4, 2)


def test_transitions_pair_each_observation_with_the_next_inside_its_episode(tmp_path):
    store = EpisodeStore(write_episodes(tmp_path / "store", [counting_episode(3, 0), counting_episode(2, 100)]))
    batch = store.transitions([0, 2, 3, 4])
    assert batch["observations"][:, 0].tolist() == [0, 2, 100, 101]
    assert batch["next_observations"][:, 0].tolist() == [1, 3, 101, 102]
    assert batch["episode"].tolist() == [0, 0, 1, 1] and batch["truncated"].tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="indices"):
        store.transitions([5])


def test_clips_stay_inside_episodes_unless_padded_with_a_mask(tmp_path):
    episodes = [counting_episode(4, 0), counting_episode(1, 100), counting_episode(3, 200)]  # 5, 2 and 4 frames
    store = EpisodeStore(write_episodes(tmp_path / "store", episodes))
    starts = store.clip_starts(3)
    assert len(starts) == (5 - 2) + 0 + (4 - 2)  # the 2-frame episode holds no 3-frame clip
    clips = store.clips(starts, 3)
    assert clips["mask"].all() and clips["observations"].shape == (5, 3, 1) and clips["actions"].shape == (5, 2)
    frames, actions = clips["observations"][..., 0], clips["actions"]
    assert (np.diff(frames, axis=1) == 1).all()  # consecutive frames of one episode, never two
    np.testing.assert_array_equal(actions, frames[:, :-1])  # action j is the one taken after frame j
    assert clips["step"].tolist() == [0, 1, 2, 0, 1] and clips["episode"].tolist() == [0, 0, 0, 2, 2]

    padded = store.clip_starts(3, pad=True)
    assert len(padded) == 5 + 2 + 4
    clips = store.clips(padded, 3)
    short = clips["episode"] == 1
    assert clips["mask"][short].tolist() == [[True, True, False], [True, False, False]]
    assert clips["observations"][short][..., 0].tolist() == [[100, 101, 0], [101, 0, 0]]  # zeros past the end
    assert clips["actions"][short].tolist() == [[100, 0], [0, 0]]  # action j is real where frame j + 1 is
    assert clips["mask"].sum(axis=1).min() == 1

    first = store.sample_clips(4, 3, np.random.default_rng(0))
    again = store.sample_clips(4, 3, np.random.default_rng(0))
    assert all(np.array_equal(first[k], again[k]) for k in first) and first["mask"].all()
    with pytest.raises(ValueError, match="frames: no clip of 6 frames"):
        store.sample_clips(2, 6, np.random.default_rng(0))
    assert store.sample_clips(2, 6, np.random.default_rng(0), pad=True)["mask"].shape == (2, 6)
    with pytest.raises(ValueError, match="starts"):
        store.clips([11], 2)
    with pytest.raises(ValueError, match="frames"):
        store.clip_starts(0)


@dataclass(frozen=True)
class DoubledRewards(EpisodeSpec):
    """A spec for the test: rewards must be non-negative; stores doubled rewards per step."""

    factor: float = 2.0

    def check(self, episode):
        if episode.rewards.min() < 0:
            raise ValueError("rewards: expected >= 0")

    def step_arrays(self, episode):
        return {"doubled": episode.rewards * self.factor}


def test_the_writer_applies_a_spec_and_saves_it(tmp_path):
    store = EpisodeStore(write_episodes(tmp_path / "store", [counting_episode(3, 0)], DoubledRewards(factor=3.0)))
    assert store.spec_json == {"type": "DoubledRewards", "factor": 3.0}
    assert store.step_arrays["doubled"].tolist() == [3.0, 3.0, 3.0]
    assert store.transitions([1])["doubled"].tolist() == [3.0]
    negative = replace(counting_episode(2, 0), rewards=np.array([1.0, -1.0], dtype=np.float32))
    with pytest.raises(ValueError, match=r"episodes\[1\]: rewards: expected >= 0"):
        write_episodes(tmp_path / "store", [counting_episode(3, 0), negative], DoubledRewards())
    assert EpisodeStore(tmp_path / "store").step_arrays["doubled"].tolist() == [3.0, 3.0, 3.0]  # untouched
    with pytest.raises(TypeError, match="spec"):
        write_episodes(tmp_path / "other", [counting_episode(3, 0)], spec={"factor": 2})


def test_a_new_write_replaces_arrays_under_readers_of_the_old_ones(tmp_path, monkeypatch):
    path = tmp_path / "store"
    old = EpisodeStore(write_episodes(path, [image_episode(4, seed=0)]))
    old_pixels = np.array(old.observations)
    new_episode = replace(image_episode(6, seed=1), attributes={"instruction": "open the door"})
    new = EpisodeStore(write_episodes(path, [new_episode]))
    assert old.observations.tobytes() == old_pixels.tobytes()  # the old reader's mapping is intact
    assert new.observations.tobytes() == new_episode.observations.tobytes() and len(new) == 6
    assert not (path / "episode.embedding.npy").exists()  # an attribute only the old store had is gone
    assert not list(path.glob("*.tmp"))

    # a crash mid-write leaves no store (the meta file goes first, comes back last), never a mixed one
    calls = []

    def crash_on_second_array(tmp, parts):
        calls.append(tmp)
        if len(calls) == 2:
            raise OSError("disk full")
        return save(tmp, parts)

    save = episodes_module._save_concatenated
    monkeypatch.setattr(episodes_module, "_save_concatenated", crash_on_second_array)
    with pytest.raises(OSError, match="disk full"):
        write_episodes(path, [image_episode(2, seed=2)])
    with pytest.raises(FileNotFoundError, match="write did not finish"):
        EpisodeStore(path)
    assert not list(path.glob(".*.tmp"))


def test_a_reader_notices_arrays_that_do_not_match_the_meta_file(tmp_path):
    path = write_episodes(tmp_path / "store", [counting_episode(3, 0)])
    np.save(path / "rewards.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="rewards.npy"):
        EpisodeStore(path)
    (path / "meta.json").write_text('{"obs_shape": [3]}')  # a folder of the pre-store ReplayDataset
    with pytest.raises(ValueError, match="older quintet"):
        EpisodeStore(path)
    assert len(EpisodeStore(write_episodes(path, [counting_episode(2, 0)]))) == 2  # writing over it works


def test_bad_episodes_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="observations"):
        replace(counting_episode(3, 0), observations=np.zeros((3, 1)))
    with pytest.raises(ValueError, match="terminated/truncated"):
        replace(counting_episode(3, 0), truncated=np.array([True, False, False]))
    with pytest.raises(ValueError, match="attributes"):
        replace(counting_episode(3, 0), attributes={"Bad Name": 1})
    with pytest.raises(TypeError, match="actions"):
        replace(counting_episode(3, 0), actions=np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="episodes"):
        write_episodes(tmp_path / "empty", [])
    with pytest.raises(ValueError, match=r"episodes\[1\]: observations"):
        write_episodes(tmp_path / "mixed", [image_episode(3), counting_episode(3, 0)])
    with pytest.raises(ValueError, match=r"episodes\[1\]: attributes"):
        write_episodes(tmp_path / "mixed", [image_episode(3), replace(image_episode(3), attributes={})])
    with pytest.raises(ValueError, match=r"episodes\[1\]: attribute 'embedding'"):
        bad = image_episode(3)
        bad.attributes["embedding"] = np.zeros(5)
        write_episodes(tmp_path / "mixed", [image_episode(3), bad])
    with pytest.raises(ValueError, match="index"):
        EpisodeStore(write_episodes(tmp_path / "ok", [counting_episode(3, 0)])).episode(1)


def test_rollout_transforms_observations_and_maps_actions_to_the_env():
    envs = [gym.make("CartPole-v1", max_episode_steps=12) for _ in range(2)]
    seen = []

    def policy(observations):
        seen.append(observations.shape)
        return np.arange(len(observations)) % 2 + 10  # stored ids 10/11, sent as 0/1

    episodes = rollout(
        envs,
        policy,
        3,
        to_env=lambda actions: actions - 10,
        observation_transform=lambda obs: (obs * 100).astype(np.int16),
        frames=2,
        attributes=lambda observation, info: {"start_angle": float(observation[2])},
    )
    assert len(episodes) == 3 and seen[0] == (2, 2, 4)  # two envs in lockstep, two stacked frames
    # seeds 0, 1, 2 in the order episodes start (episodes are listed in the order they end)
    starts = [gym.make("CartPole-v1").reset(seed=seed)[0] for seed in range(3)]
    by_start = sorted(episodes, key=lambda e: [s[2] for s in starts].index(e.attributes["start_angle"]))
    for start, episode in zip(starts, by_start):
        assert episode.observations.dtype == np.int16 and episode.attributes == {"start_angle": float(start[2])}
        np.testing.assert_array_equal(episode.observations[0], (start * 100).astype(np.int16))
    assert set(np.concatenate([e.actions for e in episodes]).tolist()) <= {10, 11}
    with pytest.raises(ValueError, match="policy"):
        rollout(envs[0], lambda obs: np.zeros(3), 1)


def test_record_renders_downscaled_uint8_frames_of_a_state_env(tmp_path):
    store = record("CartPole-v1", tmp_path / "cartpole", 3, max_steps=6, num_envs=2, size=32, seed=5)
    assert store.observations.dtype == np.uint8 and store.observations.shape[1:] == (3, 32, 32)
    assert store.actions.dtype == np.int64 and store.actions.ndim == 1 and store.num_episodes == 3
    assert store.env_id == "CartPole-v1" and store.truncated.sum() + store.terminated.sum() == 3
    frames = np.asarray(store.observations[:7], dtype=np.int16)
    assert np.abs(np.diff(frames, axis=0)).max() > 0  # the pole moves
    again = record("CartPole-v1", tmp_path / "again", 3, max_steps=6, num_envs=2, size=32, seed=5)
    assert again.observations.tobytes() == store.observations.tobytes()  # seeds reproduce the recording
    with pytest.raises(ValueError, match="render_mode"):
        record(gym.make("CartPole-v1"), tmp_path / "no-render", 1)


def test_record_keeps_rgb_observations_of_an_atari_game(tmp_path):
    pytest.importorskip("ale_py")
    store = record("ALE/Breakout-v5", tmp_path / "breakout", 1, max_steps=8)
    assert store.observations.shape == (9, 3, 64, 64) and store.observations.dtype == np.uint8
    assert store.actions.max() < 4 and store.truncated[-1]


def test_resize_frames_averages_areas_and_rejects_non_rgb():
    frame = np.zeros((4, 4, 3), dtype=np.uint8)
    frame[:2, :2] = 200  # the top-left quarter
    small = resize_frames(2)(frame)
    assert small.shape == (3, 2, 2) and small[:, 0, 0].tolist() == [200] * 3 and small[:, 1, 1].tolist() == [0] * 3
    assert resize_frames(1)(frame)[:, 0, 0].tolist() == [50] * 3  # the mean of the whole frame
    with pytest.raises(ValueError, match="frame"):
        resize_frames(2)(np.zeros((4, 4), dtype=np.uint8))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_minari_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    episodes = rollout([gym.make("CartPole-v1", max_episode_steps=9)], lambda obs: np.zeros(len(obs), int), 2)
    store = EpisodeStore(write_episodes(tmp_path / "store", episodes, env_id="CartPole-v1"))
    dataset = write_minari(store, "quintet/cartpole-test-v0")
    assert dataset.total_episodes == 2 and dataset.total_steps == len(store)
    back = read_minari("quintet/cartpole-test-v0")
    for original, loaded in zip(episodes, back):
        for name in ("observations", "actions", "rewards", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(original, name))
