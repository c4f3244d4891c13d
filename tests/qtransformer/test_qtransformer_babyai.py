"""The Q-Transformer from pixels and instructions (BabyAI): env, data, text path, task, HF encoder."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from quintet.qtransformer import QTransformer
from quintet.qtransformer.babyai import BabyAIWorld, family_of
from quintet.qtransformer.babyai_env import BabyAIEnv, bot_policy, make_envs
from quintet.qtransformer.config import InstructionEncoderConfig
from quintet.qtransformer.data import ActionDiscretiser, ReplayDataset, rollout
from quintet.qtransformer.datasets import babyai_dataset
from quintet.qtransformer.instructed import SuccessRates, deadlocked, evaluate_instructed, instruction_pool
from quintet.qtransformer.instructions import HFSentenceEncoder, InstructionEncoder
from quintet.qtransformer.presets import BABYAI_TINY, BABYAI_TINY_RL
from quintet.qtransformer.system import QTransformerSystem
from quintet.registry import TaskRequest
from quintet.training import Trainer

GO_TO = BabyAIWorld(levels=("BabyAI-GoToLocalS6N2-v0",), tile_size=4, max_steps=12)
DISCRETE = ActionDiscretiser(low=(0.0,), high=(6.0,), bins=7, discrete=True)


def tiny_model(seed=0, **overrides) -> QTransformer:
    torch.manual_seed(seed)
    model = QTransformer(replace(BABYAI_TINY, **overrides)).eval()
    with torch.no_grad():  # FiLM and the null embedding start at zero: perturb them, or text is a no-op
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def frames(batch=3, seed=1):
    return torch.rand(batch, 3, 2, 28, 28, generator=torch.Generator().manual_seed(seed))


MISSIONS = ["go to the red ball", "open the blue door", "pick up a key"]


# ---------------------------------------------------------------------------- the env and its bot


def test_env_observes_rgb_views_with_missions_and_retargets_the_same_start():
    env = BabyAIEnv(levels=GO_TO.levels, tile_size=4, max_steps=12)
    frame, info = env.reset(seed=3)
    assert frame.shape == (3, 28, 28) and frame.dtype == np.uint8 and env.observation_space.contains(frame)
    assert info["family"] == family_of(info["mission"]) == "go to" and info["seed"] == 3
    again, info_again = env.reset(seed=3)
    assert np.array_equal(frame, again) and info_again["mission"] == info["mission"]
    other_frame, other = env.reset(seed=3, options={"goal": "other"})
    assert np.array_equal(other_frame, frame) and other["mission"] != info["mission"]  # same start, new goal
    with pytest.raises(ValueError, match="action"):
        env.step(9)


def test_the_bot_solves_misdirected_bots_fail_and_noise_fails_some():
    env = BabyAIEnv(levels=GO_TO.levels, tile_size=4, max_steps=12)

    def success(noise, misdirected, seed=0):
        policy = bot_policy(env, np.random.default_rng(seed), noise=noise, misdirected=misdirected)
        episodes = rollout([env], policy, 8, discretiser=DISCRETE, seed=100)
        return np.mean([e.raw_return > 0 for e in episodes])

    assert success(0.0, 0.0) == 1.0
    # purposeful failures: the bot goes to another object (passing the instructed one on the way can count)
    assert success(0.0, 1.0) <= 0.25
    assert success(0.0, 0.0) > success(1.0, 0.0)
    with pytest.raises(TypeError, match="env"):
        bot_policy([env], np.random.default_rng(0), noise=0.1)


def test_distinct_objects_differ_in_colour_and_type_and_four_actions_suffice_the_bot():
    env = make_envs(BabyAIWorld(levels=("quintet/BabyAI-PickupDistinctS6N3-v0",), max_steps=20, num_actions=4))[0]
    assert env.action_space.n == 4
    for seed in range(3):
        env.reset(seed=seed)
        objs = [o for o in env.grid_env.grid.grid if o is not None and o.type in ("ball", "box", "key")]
        assert len(objs) == 3 and len({o.color for o in objs}) == 3 and len({o.type for o in objs}) == 3
        assert family_of(env.mission) == "pick up"
    four = ActionDiscretiser.from_space(env.action_space)
    policy = bot_policy(env, np.random.default_rng(0), noise=0.0)
    episodes = rollout([env], policy, 6, discretiser=four, seed=0)
    assert all(e.raw_return > 0 for e in episodes) and all(int(a) < 4 for e in episodes for a in e.actions.ravel())
    with pytest.raises(ValueError, match="action"):
        env.step(4)
    with pytest.raises(ValueError, match="num_actions"):
        BabyAIWorld(levels=GO_TO.levels, num_actions=8)


def test_random_episodes_fail_and_recovered_detours_succeed_more_than_misdirected_ones():
    env = BabyAIEnv(levels=("quintet/BabyAI-GoToDistinctS6N3-v0",), max_steps=20, num_actions=4)
    four = ActionDiscretiser.from_space(env.action_space)

    def success(**shares):
        policy = bot_policy(env, np.random.default_rng(0), noise=0.0, **shares)
        return np.mean([e.raw_return > 0 for e in rollout([env], policy, 12, discretiser=four, seed=50)])

    assert success(random_episodes=1.0) < success() == 1.0
    assert success(misdirected=1.0) < success(misdirected=1.0, recover=1.0)
    with pytest.raises(ValueError, match="random_episodes"):
        bot_policy(env, np.random.default_rng(0), noise=0.0, misdirected=0.6, random_episodes=0.6)


def test_patch_stem_sees_one_cell_per_position_and_film_output_reads_the_instruction():
    model = tiny_model(encoder=replace(BABYAI_TINY.encoder, patch_size=4, film_output=True))
    images = frames(batch=2)[:, :, 0]
    stem = model.encoder.conv_stem
    moved = images.clone()
    moved[:, :, 8:12, 4:8] += 1.0  # the cell at row 2, column 1
    change = (stem(moved) - stem(images)).abs().sum(dim=(0, 1))
    assert change.shape == (7, 7) and change[2, 1] > 0 and change.sum() == change[2, 1]
    with torch.no_grad():  # the blocks' FiLM off: what still reads the instruction is the output FiLM
        for block in model.encoder.blocks:
            block.film.to_scale_shift.weight.zero_()
    cond = torch.randn(2, 16)
    out = model.encoder(images, cond)
    assert out.shape == (2, 16, 7, 7) and not torch.allclose(out, model.encoder(images, cond.flip(0)))


def test_dataset_keeps_uint8_frames_memory_mapped_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path))
    encoder = InstructionEncoder(InstructionEncoderConfig(dim=8, heads=2, dim_head=4))
    dataset = babyai_dataset(BABYAI_TINY_RL, BABYAI_TINY, instructions=encoder.tokenize)
    assert isinstance(dataset.observations, np.memmap) and dataset.observations.dtype == np.uint8
    assert dataset.observations.shape[1:] == (3, 28, 28) and dataset.num_episodes == BABYAI_TINY_RL.dataset_episodes
    reopened = ReplayDataset(dataset.path, frames=2, instructions=encoder.tokenize)
    assert reopened.observations.tobytes() == dataset.observations.tobytes()
    batch = reopened.sample(5, np.random.default_rng(0))
    assert batch["obs"].shape == (5, 3, 2, 28, 28) and batch["text_ids"].dtype == torch.long
    episode = reopened.episode_of(np.array([0]))[0]
    assert torch.equal(reopened.batch([0])["text_ids"][0], encoder.tokenize([reopened.instructions()[episode]])[0])
    assert set(instruction_pool(dataset)) == {"go to"}


# ---------------------------------------------------------------------------- the text path of the model


def test_greedy_is_the_argmax_of_the_q_values_and_guidance_at_scale_one_is_the_plain_q():
    model = tiny_model()
    obs, ids = frames(), model.tokenize(MISSIONS)
    for scale in (1.0, 2.5):
        bins, q = model.get_optimal_actions(obs, cond_scale=scale, return_q_values=True, text_ids=ids)
        torch.testing.assert_close(q, model(obs, cond_scale=scale, text_ids=ids))
        assert torch.equal(bins, q.argmax(dim=-1))
    plain = model(obs, text_ids=ids)
    torch.testing.assert_close(model(obs, cond_scale=1.0, text_ids=ids), plain)
    null = model.null_text_embed.expand(len(obs), -1)
    # eq.: guided logits = null + s (text - null)
    guided = torch.logit(model(obs, text_ids=ids, cond_scale=3.0))
    unconditioned = torch.logit(model(obs, text_embeds=null))
    expected = unconditioned + 3.0 * (torch.logit(plain) - unconditioned)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-4)


def test_instruction_perturbation_changes_the_q_values():
    model = tiny_model()
    obs = frames()
    q = model(obs, text_ids=model.tokenize(MISSIONS))
    assert not torch.allclose(q, model(obs, text_ids=model.tokenize(["go to the green box"] * 3)))


def test_condition_dropout_uses_the_null_embedding():
    model = tiny_model(cond_drop_prob=0.5)
    obs, ids = frames(6), model.tokenize(MISSIONS * 2)
    torch.manual_seed(5)
    dropped = torch.rand(6, 1) < 0.5  # the first draw of a training forward (no dropout layers)
    assert 0 < dropped.sum() < 6
    torch.manual_seed(5)
    trained = model.train()(obs, text_ids=ids)
    model.eval()
    with_text = model(obs, text_ids=ids)
    without = model(obs, text_embeds=model.null_text_embed.expand(6, -1))
    torch.testing.assert_close(trained, torch.where(dropped, without, with_text))


def test_missing_instructions_and_unwindowable_images_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="text_ids"):
        model(frames())
    with pytest.raises(ValueError, match="text_ids"):
        model(frames(), text_ids=model.tokenize(MISSIONS), text_embeds=torch.zeros(3, 16))
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(3, 3, 2, 24, 24), text_ids=model.tokenize(MISSIONS))
    with pytest.raises(ValueError, match="instruction_encoder"):
        replace(BABYAI_TINY, text_embed_dim=8)
    with pytest.raises(TypeError, match="instructions"):
        model.tokenize("go to the red ball")
    assert model.tokenize(["Go to THE red zebra"])[0, :5].tolist()[-1] == 1  # unknown words share one id


def test_instruction_encoder_saves_and_loads_with_the_model(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = QTransformer.from_pretrained(tmp_path).eval()
    obs, ids = frames(), model.tokenize(MISSIONS)
    torch.testing.assert_close(loaded(obs, text_ids=ids), model(obs, text_ids=ids))


# ---------------------------------------------------------------------------- the task


def test_babyai_tiny_trains_through_the_trainer_and_reports_success_rates(tmp_path, monkeypatch):
    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path / "cache"))
    system = QTransformerSystem()
    preset = system.presets()["babyai-tiny"]
    task = system.make_task(TaskRequest.for_stage(preset))
    assert not (tmp_path / "cache").exists()  # no data before training starts
    torch.manual_seed(0)
    result = Trainer(task, run_dir=tmp_path / "run", device="cpu", live_progress=False).fit()
    losses = [event["loss"] for event in result.history if event["kind"] == "train"]
    assert losses[-1] < losses[0]
    metrics = result.eval_metrics
    for name in ("eval_success_rate", "eval_success_rate_go_to", "eval_success_rate_guided",
                 "eval_success_rate_shuffled", "eval_success_rate_other_goal", "data_success_rate",
                 "eval_deadlock_rate"):
        assert 0.0 <= metrics[name] <= 1.0, name


def test_a_policy_walking_into_a_wall_forever_is_deadlocked_and_a_turning_one_is_not():
    env = make_envs(GO_TO)[0]
    forward, turn = (lambda obs: np.full((len(obs), 1), 2)), (lambda obs: np.full((len(obs), 1), 0))
    walker, = rollout([env], forward, 1, discretiser=DISCRETE, seed=3)
    turner, = rollout([env], turn, 1, discretiser=DISCRETE, seed=3)
    assert walker.raw_return == 0 and turner.raw_return == 0  # both fail: neither reaches the object
    assert deadlocked(walker) and not deadlocked(turner)  # the walker's view stopped changing at a wall
    rates = SuccessRates.of([walker, turner], ["go to", "go to"])
    assert rates.overall == 0.0 and rates.deadlocked == 0.5


def test_evaluation_reads_shuffled_instructions_from_the_pool():
    model = tiny_model()
    rl = replace(BABYAI_TINY_RL, eval_episodes=2)
    with pytest.raises(ValueError, match="pool"):
        evaluate_instructed(model, rl, model.instruction_encoder.tokenize, shown="shuffled")
    seen = []

    def spy(texts):
        seen.extend(texts)
        return model.instruction_encoder.tokenize(texts)

    rates = evaluate_instructed(model, rl, spy, shown="shuffled", pool={"go to": ["go to the purple key"]})
    assert set(seen) == {"go to the purple key"} and len(rates.episodes) == 2


# ---------------------------------------------------------------------------- a Hugging Face encoder


def tiny_bert(folder):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *InstructionEncoderConfig().vocab]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return folder


def test_a_local_hugging_face_sentence_encoder_feeds_text_embeds(tmp_path, monkeypatch):
    folder = tiny_bert(tmp_path / "bert")
    encoder = HFSentenceEncoder(str(folder), dim=16)
    embeds = encoder(MISSIONS)
    assert embeds.shape == (3, 16) and not torch.allclose(embeds[0], embeds[1])
    torch.testing.assert_close(encoder(MISSIONS[:1])[0], embeds[0])
    with pytest.raises(ValueError, match="text_encoder"):
        HFSentenceEncoder(str(folder), dim=32)(MISSIONS)
    with pytest.raises(ValueError, match="text_encoder"):
        HFSentenceEncoder(str(tmp_path / "missing"))(MISSIONS)

    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path / "cache"))
    system = QTransformerSystem()
    base = system.presets()["babyai-tiny"]
    config = replace(BABYAI_TINY, instruction_encoder=None)
    preset = replace(base, recipe=replace(base.recipe, text_encoder=str(folder)))
    preset = preset.replace_stage(base.stages[0].name, model_config=config)
    task = system.make_task(TaskRequest.for_stage(preset))
    task.start(type("Run", (), {"run_dir": tmp_path / "run", "resumed": False, "rank": 0, "world_size": 1})())
    batch = task.train_batch(0)
    assert batch["text_embeds"].shape == (8, 16) and "text_ids" not in batch
    loss, _ = task.loss(task.model, batch)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_babyai_data_round_trips_through_minari_with_its_instructions(tmp_path, monkeypatch):
    from quintet.qtransformer import RewardScaler, from_minari, to_minari

    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    dataset = babyai_dataset(BABYAI_TINY_RL, BABYAI_TINY)
    exported = to_minari(dataset, "quintet/babyai-test-v0", env=make_envs(BABYAI_TINY_RL.world)[0])
    assert exported.total_episodes == dataset.num_episodes
    scaler = RewardScaler(low=0.0, high=1.0)
    back = from_minari("quintet/babyai-test-v0", tmp_path / "back", gamma=0.9, reward_scaler=scaler)
    assert back.observations.dtype == np.uint8 and back.observations.tobytes() == dataset.observations.tobytes()
    assert back.instructions() == dataset.instructions() and back.attributes["family"].tolist()[0] == "go to"
    np.testing.assert_array_equal(back.actions, dataset.actions)
    np.testing.assert_array_equal(back.returns_to_go, dataset.returns_to_go)


def test_online_rounds_collect_instructed_episodes_with_the_policy(tmp_path, monkeypatch):
    from quintet.qtransformer.online import OnlineReplay
    from quintet.qtransformer.system import build_task
    from quintet.training import TrainSettings

    monkeypatch.setenv("QUINTET_CACHE", str(tmp_path / "cache"))
    rl = replace(BABYAI_TINY_RL, steps_per_round=2, dataset_episodes=3, episodes_per_round=2, eval_episodes=2)
    model = QTransformer(BABYAI_TINY)
    with pytest.raises(ValueError, match="instruction"):
        OnlineReplay(model, rl)
    settings = TrainSettings(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=0, checkpoint_every=0)
    online = OnlineReplay(model, rl, instructions=model.instruction_encoder.tokenize)
    task = build_task(model, online, rl, settings, instructions=model.instruction_encoder.tokenize)
    task.evaluate = None  # success rates are tested above; here the rounds are
    Trainer(task, run_dir=tmp_path / "run", device="cpu", live_progress=False).fit()
    rounds = [ReplayDataset(path) for path in sorted((tmp_path / "run" / "replay").glob("round-*"))]
    assert [r.num_episodes for r in rounds] == [3, 2]
    assert all(family_of(text) == "go to" for r in rounds for text in r.instructions())
    assert "text_ids" in task.train_batch(3)
