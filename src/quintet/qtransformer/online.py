"""Online-offline rounds inside one Trainer run: the replay data grows while the model trains.

Round 0 is ``initial_episodes`` uniform-random episodes (BabyAI presets: ``dataset_episodes`` of the
noisy, sometimes misdirected bot, the offline data). At the first optimizer step of round
``r >= 1`` (step ``r * steps_per_round``) the model as it is then collects ``episodes_per_round``
epsilon-greedy episodes, epsilon decaying linearly over the run's rounds, and training goes on
over everything collected so far (offline Q-learning on a growing dataset).

Each round is a :class:`ReplayDataset` folder of the run (``replay/round-0003``), written before the
round's first batch and collected with environment seeds and an exploration generator fixed by the
round. A resumed run reads the rounds it already has and collects the later ones exactly as an
uninterrupted run would, since checkpoint resume restores the very model a round collects with.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from quintet.qtransformer.data import META_FILE, ActionDiscretiser, Episode, ReplayDataset, rollout
from quintet.qtransformer.envs import greedy_policy, make_env, random_policy, write_dataset
from quintet.qtransformer.model import QTransformer
from quintet.qtransformer.presets import BabyAISettings, RLSettings
from quintet.training.task import RunInfo

REPLAY_DIR = "replay"
COLLECT_SEED = 100_000
"""collection episodes of run seed ``s`` use env seeds from ``COLLECT_SEED * (s + 1)`` on (evaluation: 10_000)"""


class OnlineReplay:
    """The growing replay data of one run; :meth:`dataset_for` serves micro-batch ``index``'s dataset."""

    def __init__(
        self,
        model: QTransformer,
        rl: RLSettings,
        *,
        seed: int = 0,
        instructions: Callable[[list[str]], torch.Tensor] | None = None,
    ):
        if rl.steps_per_round < 1:
            raise ValueError(f"steps_per_round: an online run needs >= 1, got {rl.steps_per_round}")
        self.instructed = isinstance(rl, BabyAISettings)
        if model.config.condition_on_text and not (self.instructed and instructions is not None):
            raise ValueError(
                "model: online collection acts without an instruction; use condition_on_text=False "
                "(or a BabyAI preset, whose episodes carry one)"
            )
        self.model, self.rl, self.seed, self.instructions = model, rl, seed, instructions
        if self.instructed:
            from quintet.qtransformer.babyai_env import make_envs

            self.envs = make_envs(rl.world, rl.collect_envs)
        else:
            self.envs = make_env(rl.env_id, rl.collect_envs)
        self.discretiser = ActionDiscretiser.from_space(self.envs[0].action_space, model.config.action_bins)
        if (self.discretiser.num_actions, self.discretiser.bins) != (
            model.config.num_actions,
            model.config.action_bins,
        ):
            raise ValueError(
                f"model: {rl.env_id} acts in {self.discretiser.num_actions} x {self.discretiser.bins} bins, the model "
                f"in {model.config.num_actions} x {model.config.action_bins}"
            )
        self.run: RunInfo | None = None
        self.folder: Path | None = None
        self.episodes: list[Episode] = []
        self.rounds_loaded = 0
        self.dataset: ReplayDataset | None = None

    def start(self, run: RunInfo) -> None:
        """Bind to a Trainer run: a fresh run replaces the rounds an earlier run left in the folder."""
        self.run = run
        replay = run.run_dir / REPLAY_DIR
        if not run.resumed and run.rank == 0 and replay.is_dir():
            shutil.rmtree(replay)
        if run.world_size > 1:
            dist.barrier()  # no rank writes before rank 0 has cleared the folder
        # under several processes every rank collects the same episodes (same weights, same seeds)
        # and keeps its own copy
        self.folder = replay if run.world_size == 1 else replay / f"rank-{run.rank}"
        self.episodes, self.rounds_loaded, self.dataset = [], 0, None

    def epsilon(self, round_index: int) -> float:
        """Round 1 explores at ``epsilon[0]``, round ``epsilon_rounds`` and later at ``epsilon[1]``."""
        start, end = self.rl.epsilon
        progress = (round_index - 1) / max(1, self.rl.epsilon_rounds - 1)
        return start + (end - start) * min(1.0, progress)

    def dataset_for(self, index: int) -> ReplayDataset:
        if self.run is None:
            raise RuntimeError("replay: an online task collects inside a Trainer run (Task.start names its folder)")
        step = self.run.step_of(index)
        current = step // self.rl.steps_per_round
        while self.rounds_loaded <= current:
            self.episodes += self._round(self.rounds_loaded, step)
            self.rounds_loaded += 1
            self.dataset = None
        if self.dataset is None:
            self.dataset = write_dataset(
                self.folder / "all",
                self.episodes,
                self.rl,
                self.discretiser,
                frames=self.model.config.frames,
                instructions=self.instructions,
            )
        return self.dataset

    def _round(self, round_index: int, step: int) -> list[Episode]:
        path = self.folder / f"round-{round_index:04d}"
        if (path / META_FILE).is_file():  # the meta file is written last: its presence means complete
            saved = ReplayDataset(path)
            return [saved.episode(i) for i in range(saved.num_episodes)]
        first_step = round_index * self.rl.steps_per_round
        if step != first_step:
            raise RuntimeError(
                f"replay: {path} is missing; round {round_index} is collected at step {first_step} and this run "
                f"is at step {step} (resume needs the run folder's replay/ beside its checkpoints)"
            )
        episodes = self._collect(round_index)
        write_dataset(path, episodes, self.rl, self.discretiser)
        return episodes

    def _collect(self, round_index: int) -> list[Episode]:
        rl = self.rl
        first_seed = COLLECT_SEED * (self.seed + 1)
        frames = self.model.config.frames
        # an instructed episode keeps its mission (and family) as attributes; its policy reads them
        instructed = dict(attributes=_mission, policy_sees_attributes=True) if self.instructed else {}
        if round_index == 0:
            rng = np.random.default_rng((self.seed, 0))
            if self.instructed:  # the offline data: the noisy bot, which drives one env
                from quintet.qtransformer.babyai_env import bot_policy

                policy = bot_policy(
                    self.envs[0],
                    rng,
                    noise=rl.action_noise,
                    misdirected=rl.misdirected,
                    recover=rl.recover,
                    random_episodes=rl.random_episodes,
                )
                return rollout(
                    self.envs[:1],
                    policy,
                    rl.dataset_episodes,
                    discretiser=self.discretiser,
                    seed=first_seed,
                    frames=frames,
                    attributes=_mission,
                )
            policy = random_policy(self.discretiser, rng)
            return rollout(
                self.envs, policy, rl.initial_episodes, discretiser=self.discretiser, seed=first_seed, frames=frames
            )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        policy = greedy_policy(
            self.model, epsilon=self.epsilon(round_index), generator=generator, instructions=self.instructions
        )
        first = rl.dataset_episodes if self.instructed else rl.initial_episodes
        seed = first_seed + first + (round_index - 1) * rl.episodes_per_round
        # the global RNG belongs to training (dropout, ...): collecting must not move it
        with torch.random.fork_rng(devices=[]):
            return rollout(
                self.envs,
                policy,
                rl.episodes_per_round,
                discretiser=self.discretiser,
                seed=seed,
                frames=frames,
                **instructed,
            )


def _mission(observation: np.ndarray, info: dict) -> dict[str, str]:
    return {"instruction": info["mission"], "family": info["family"]}
