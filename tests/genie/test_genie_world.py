"""Playing inside a world model: World, WorldModelEnv, the headless GIF and the pygame loop."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from quintet.genie import GenieConfig, TokenizerConfig
from quintet.genie.dynamics import Genie
from quintet.genie.play import action_for, play_headless, play_window
from quintet.genie.tokenizer import FrameTokenizer
from quintet.genie.world import World, WorldModelEnv

MEANINGS = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "UPFIRE", "RIGHTFIRE", "UPRIGHTFIRE"]


def build(num_actions=11, max_keys=1, objective="maskgit"):
    torch.manual_seed(0)
    tokenizer = FrameTokenizer(TokenizerConfig(image_size=(16, 16), channels=(8, 16), codebook_size=16, codebook_dim=8))
    tokenizer.train()
    tokenizer(torch.randint(0, 256, (4, 1, 3, 16, 16), dtype=torch.uint8))  # codebook from data
    dynamics = Genie(
        GenieConfig(
            num_codes=16,
            token_grid=(4, 4),
            max_frames=4,
            dim=32,
            depth=1,
            heads=2,
            dim_head=16,
            objective=objective,
            num_actions=num_actions,
            max_keys=max_keys if num_actions else 1,
            maskgit_steps=2,
        )
    )
    return tokenizer.eval(), dynamics.eval()


def start(t=2):
    frames = np.random.default_rng(0).integers(0, 256, (t, 3, 16, 16), dtype=np.uint8)
    return frames, [3] * (t - 1)


@pytest.mark.parametrize("objective", ["maskgit", "autoregressive"])
def test_world_imagines_frames_and_rejects_bad_actions(objective):
    world = World(*build(objective=objective))
    with pytest.raises(ValueError, match="^step: call reset"):
        world.step(0)
    first = world.reset(*start())
    assert first.shape == (3, 16, 16) and first.dtype == np.uint8
    frames = [world.step(a) for a in (0, 3, 3, 5, 5, 2)]  # past the window of 4 frames too
    assert all(f.shape == (3, 16, 16) and f.dtype == np.uint8 for f in frames)
    with pytest.raises(ValueError, match=r"^action: action 11 is not in \[0, 11\)"):
        world.step(11)
    with pytest.raises(ValueError, match="^action: expected an action id"):
        world.step(True)
    with pytest.raises(ValueError, match=r"^actions\[0\]: action 99"):
        world.reset(start()[0], [99])


def test_world_with_key_sets_and_without_actions():
    world = World(*build(num_actions=5, max_keys=2))
    world.reset(*start())
    world.step([3, 1])
    world.step([])
    with pytest.raises(ValueError, match="^action: at most max_keys=2 keys"):
        world.step([0, 1, 2])
    silent = World(*build(num_actions=None))
    silent.reset(start()[0])
    silent.step(None)
    with pytest.raises(ValueError, match="^action: this world model takes no actions"):
        silent.step(1)


def test_greedy_world_is_deterministic_and_cache_free_equal():
    tokenizer, dynamics = build()
    runs = []
    for use_cache in (True, False):
        world = World(tokenizer, dynamics, use_cache=use_cache)
        world.reset(*start())
        runs.append(np.stack([world.step(a) for a in (3, 3, 5, 1, 0)]))
    assert np.array_equal(runs[0], runs[1])


def test_world_model_env_is_a_gymnasium_env():
    from gymnasium.utils.env_checker import check_env

    world = World(*build())
    clips = np.random.default_rng(1).integers(0, 256, (3, 2, 3, 16, 16), dtype=np.uint8)
    rewards = []
    env = WorldModelEnv(
        world,
        (clips, np.full((3, 1), 3)),
        max_steps=5,
        reward_fn=lambda before, action, after: rewards.append(action) or 1.0,
    )
    check_env(env, skip_render_check=True)
    observation, info = env.reset(seed=0)
    assert observation.shape == (16, 16, 3) and observation.dtype == np.uint8 and "start" in info
    total, truncated, steps = 0.0, False, 0
    while not truncated:
        observation, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        total += reward
        steps += 1
        assert not terminated
    assert steps == 5 and total == 5.0
    with pytest.raises(ValueError, match="^action"):
        env.step(42)


def test_action_names_from_pressed_keys():
    assert MEANINGS[action_for({"UP", "RIGHT", "FIRE"}, MEANINGS)] == "UPRIGHTFIRE"
    assert MEANINGS[action_for({"LEFT", "UP"}, MEANINGS)] == "UPLEFT"
    assert MEANINGS[action_for({"DOWN", "FIRE"}, MEANINGS)] == "DOWN"  # no DOWNFIRE here: fire dropped
    assert MEANINGS[action_for({"LEFT", "RIGHT"}, MEANINGS)] == "NOOP"  # opposites cancel
    assert MEANINGS[action_for(set(), MEANINGS)] == "NOOP"


def test_headless_play_writes_a_gif_and_checks_actions_first(tmp_path):
    world = World(*build(), temperature=1.0)
    out = tmp_path / "play.gif"
    written = play_headless(world, [3, 3, 3, 5], out, fps=10, start=start())
    assert written["gif"] == str(out) and written["frames"] == 4 and written["imagined_fps"] > 0
    with Image.open(out) as gif:
        assert gif.n_frames >= 2 and gif.size == (64, 64)
    with pytest.raises(ValueError, match=r"^actions\[2\]: action 40 is not in"):
        play_headless(world, [1, 1, 40], tmp_path / "bad.gif", start=start())
    assert not (tmp_path / "bad.gif").exists()
    with pytest.raises(ValueError, match="^out"):
        play_headless(world, [1], tmp_path / "play.png", start=start())


def test_pygame_loop_follows_injected_keys(monkeypatch):
    pygame = pytest.importorskip("pygame")
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    world = World(*build())
    taken = []
    step = world.step
    monkeypatch.setattr(world, "step", lambda action: taken.append(action) or step(action))
    key = lambda kind, code: pygame.event.Event(kind, key=code)  # noqa: E731
    script = [
        [key(pygame.KEYDOWN, pygame.K_RIGHT)],
        [key(pygame.KEYDOWN, pygame.K_UP)],
        [key(pygame.KEYDOWN, pygame.K_SPACE)],
        [key(pygame.KEYUP, pygame.K_RIGHT), key(pygame.KEYUP, pygame.K_UP), key(pygame.KEYDOWN, pygame.K_x)],
        [key(pygame.KEYUP, pygame.K_SPACE)],
        [key(pygame.KEYDOWN, pygame.K_ESCAPE)],
    ]
    played = play_window(world, start=start(), meanings=MEANINGS, fps=1000, events=lambda: script.pop(0))
    assert [MEANINGS[a] for a in taken] == ["RIGHT", "UPRIGHT", "UPRIGHTFIRE", "FIRE", "NOOP"]
    assert played["frames"] == 5 and played["imagined_fps"] > 0
    assert os.environ["SDL_VIDEODRIVER"] == "dummy"


def test_pygame_loop_with_digits_for_unnamed_actions(monkeypatch):
    pygame = pytest.importorskip("pygame")
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    world = World(*build(num_actions=4))
    taken = []
    step = world.step
    monkeypatch.setattr(world, "step", lambda action: taken.append(action) or step(action))
    key = lambda code: pygame.event.Event(pygame.KEYDOWN, key=code)  # noqa: E731
    script = [[key(pygame.K_2)], [key(pygame.K_9)], [], [key(pygame.K_r)], [pygame.event.Event(pygame.QUIT)]]
    played = play_window(world, start=start(), meanings=None, fps=1000, events=lambda: script.pop(0))
    assert taken == [2, 2, 2, 2]  # 9 is no action of this model: a message, and the last choice stays
    assert played["frames"] == 4
