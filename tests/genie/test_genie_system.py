"""The Genie system: recording, token caches and batches, the tiny preset end to end, play through the task."""

import dataclasses

import numpy as np
import pytest
import torch

from quintet import registry
from quintet.genie.data import GameRecording, HeldRandomPolicy, Recorded, load_recording, make_game_env, tokenize_rows
from quintet.genie.system import GenieSystem
from quintet.genie.tokenizer import FrameTokenizer
from quintet.registry import TaskRequest
from quintet.training.pipeline import TrainerOptions, train_preset
from quintet.training.task import PlayOptions

SYSTEM = registry.register(GenieSystem()) if "genie" not in registry.systems() else registry.get_system("genie")
TINY = SYSTEM.presets()["tiny"]


def test_held_random_policy_holds_actions():
    policy = HeldRandomPolicy(18, hold_steps=6.0, seed=0)
    actions = np.concatenate([policy(np.zeros((1, 1))) for _ in range(3000)])
    runs = np.diff(np.flatnonzero(np.diff(actions) != 0))
    assert 4.5 < runs.mean() < 8.0  # a switch draws the same action 1/18 of the time: runs a little longer
    assert set(np.unique(actions)) == set(range(18))
    again = HeldRandomPolicy(18, hold_steps=6.0, seed=0)
    assert np.array_equal(actions[:50], np.concatenate([again(np.zeros((1, 1))) for _ in range(50)]))
    some = HeldRandomPolicy(18, hold_steps=2.0, seed=0, choices=(0, 2, 5))
    assert set(np.concatenate([some(np.zeros((2, 1))) for _ in range(200)])) == {0, 2, 5}
    with pytest.raises(ValueError, match="^choices"):
        HeldRandomPolicy(4, hold_steps=2.0, choices=(0, 7))


def test_recording_settings_name_their_cache_and_the_crop_applies():
    a, b = GameRecording(), GameRecording(seed=1)
    assert a.path != b.path and a.path == GameRecording().path
    env = make_game_env(GameRecording(crop=(30, 184, 24, 136)))
    observation, _ = env.reset(seed=0)
    assert observation.shape == (154, 112, 3)
    env.close()
    with pytest.raises(ValueError, match="^crop"):
        GameRecording(crop=(10, 5, 0, 3))
    with pytest.raises(ValueError, match="^hold_steps"):
        GameRecording(hold_steps=0.5)


@pytest.fixture(scope="module")
def recorded():
    recipe = TINY.recipe
    return Recorded(load_recording(recipe.recording), recipe.val_episodes)


def test_recorded_clips_align_actions_with_frames(recorded):
    store = recorded.store
    starts = recorded.clip_starts(4, "train")
    rows = recorded.rows(starts[[0, 5, -1]], 4)
    expected = store.clips(starts[[0, 5, -1]], 4)
    assert torch.equal(recorded.frames(rows), torch.from_numpy(expected["observations"]))
    assert torch.equal(recorded.actions(rows), torch.from_numpy(expected["actions"]).long())
    val = recorded.clip_starts(4, "val")
    owner = np.searchsorted(recorded.obs_starts, val, side="right") - 1
    assert set(owner) == set(recorded.val_episodes) and not set(owner) & set(recorded.train_episodes)


def test_tokens_of_chunked_episodes_equal_whole_episode_encoding(recorded):
    torch.manual_seed(0)
    config = dataclasses.replace(TINY.stage("tokenizer").model_config, temporal_convs=True, temporal_kernel=3)
    tokenizer = FrameTokenizer(config)
    for conv in (tokenizer.pre_temporal, tokenizer.post_temporal):
        torch.nn.init.normal_(conv.conv.weight, std=0.3)
    tokenizer.train()
    tokenizer(recorded.frames(recorded.rows(recorded.clip_starts(2, "train")[:8], 2)))
    tokenizer.eval()
    chunked = tokenize_rows(tokenizer, recorded, batch_size=7)
    first, end = int(recorded.obs_starts[1]), int(recorded.obs_starts[2])
    whole = tokenizer.encode(recorded.frames(np.arange(first, end))[None])[0]
    assert torch.equal(chunked[first:end], whole)


def test_presets_fit_together():
    for preset in SYSTEM.presets().values():
        tokenizer = preset.stage("tokenizer").model_config
        dynamics = preset.stage("dynamics").model_config
        assert dynamics.token_grid == tokenizer.token_grid and dynamics.num_codes == tokenizer.codebook_size
        assert preset.recipe.clip_frames <= dynamics.max_frames
        if preset.recipe.action_source == "latent":
            assert dynamics.num_actions == preset.stage("latent_actions").model_config.num_latent_actions
            assert "latent_actions" in preset.stage("dynamics").needs
    quick = SYSTEM.demo_runs(quick=True)[0].preset
    assert quick.stage_names == ("tokenizer", "dynamics")


def test_dynamics_task_checks_its_inputs():
    stage = TINY.stage("dynamics")
    with pytest.raises(ValueError, match="^inputs: the dynamics stage needs the trained tokenizer"):
        SYSTEM.make_task(TaskRequest.for_stage(TINY, stage))
    tokenizer = SYSTEM.build_model(TINY.stage("tokenizer"))
    wrong = dataclasses.replace(stage.model_config, num_codes=64)
    with pytest.raises(ValueError, match="^model_config: the dynamics model takes"):
        SYSTEM.make_task(
            TaskRequest.for_stage(TINY, dataclasses.replace(stage, model_config=wrong), inputs={"tokenizer": tokenizer})
        )


def test_tiny_preset_trains_end_to_end_and_plays(tmp_path):
    run = train_preset(
        SYSTEM, TINY, run_dir=tmp_path / "run", options=TrainerOptions(device="cpu", live_progress=False)
    )
    assert set(run.stages) == {"tokenizer", "latent_actions", "dynamics"}
    metrics = {k: v for stage in run.stages.values() for k, v in stage.result.eval_metrics.items()}
    for name in ("recon_psnr", "latent_action_nmi", "val_loss", "val_token_accuracy", "rollout_psnr_k", "delta_psnr"):
        assert np.isfinite(metrics[name]), name
    assert 0.0 <= metrics["latent_action_nmi"] <= 1.0 and 0.0 <= metrics["val_token_accuracy"] <= 1.0

    dynamics = run.stages["dynamics"]
    task, model = dynamics.task, dynamics.model
    assert torch.equal(task.train_batch(3).tokens, task.train_batch(3).tokens)  # exact resume
    assert task.batch_flops(task.train_batch(0)) > 0
    samples = task.sample(model)
    assert samples["images"] and all(str(tmp_path) in path for path in samples["images"])
    assert samples["gif"].endswith(".gif") and samples["imagined_fps"] > 0

    out = tmp_path / "play.gif"
    written = task.play(model, PlayOptions(headless=True, actions=(3, 3, 5), out=out))
    assert written["gif"] == str(out) and out.is_file()
    with pytest.raises(ValueError, match=r"^actions\[1\]: action 18 is not in \[0, 18\)"):
        task.play(model, PlayOptions(headless=True, actions=(3, 18), out=tmp_path / "bad.gif"))


@pytest.mark.parametrize("source", ["latent", "none"])
def test_dynamics_trains_on_latent_actions_or_none(source):
    torch.manual_seed(0)
    dynamics = TINY.stage("dynamics")
    if source == "latent":
        config = dataclasses.replace(
            dynamics.model_config, num_actions=TINY.stage("latent_actions").model_config.num_latent_actions
        )
        needs = ("tokenizer", "latent_actions")
    else:
        config = dataclasses.replace(
            dynamics.model_config, num_actions=None, action_dropout=0.0, action_loss_weight=0.0
        )
        needs = ("tokenizer",)
    preset = dataclasses.replace(TINY, recipe=dataclasses.replace(TINY.recipe, action_source=source))
    preset = preset.replace_stage("dynamics", model_config=config, needs=needs)
    inputs = {need: SYSTEM.build_model(preset.stage(need)).eval() for need in needs}
    task = SYSTEM.make_task(TaskRequest.for_stage(preset, "dynamics", inputs=inputs))
    batch = task.train_batch(0)
    if source == "latent":
        assert (
            batch.actions.shape == (batch.tokens.shape[0], batch.tokens.shape[1] - 1) and int(batch.actions.min()) >= 0
        )
        assert int(batch.actions.max()) < config.num_actions
    else:
        assert batch.actions is None
    loss, _ = task.loss(task.model, batch)
    loss.backward()
    metrics = task.evaluate(task.model.eval())
    assert np.isfinite(metrics["rollout_psnr_k"]) and ("delta_psnr" in metrics) == (source == "latent")
