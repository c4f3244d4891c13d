"""The Q-Transformer's demo section: CartPole online-offline, then LunarLander fully offline."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from quintet.qtransformer.data import ReplayDataset, rollout
from quintet.qtransformer.envs import EVAL_SEED, lunar_heuristic_policy, make_env
from quintet.qtransformer.online import REPLAY_DIR
from quintet.qtransformer.presets import RL_SETTINGS
from quintet.qtransformer.system import lunarlander_dataset
from quintet.training import Trainer
from quintet.training.report import plot_series
from quintet.training.task import ReportSection


def train_preset(system, preset, out_dir: Path, *, budget_s: float, seed: int = 0):
    """Train ``preset`` with the Trainer for at most ``budget_s`` seconds; the result and its return curve."""
    settings = replace(preset.settings, seed=seed, time_budget_s=max(1.0, budget_s))
    torch.manual_seed(seed)
    task = system.make_task(preset, settings=settings)
    run_config = {"system": system.name, "preset": preset.name, "demo": True}
    result = Trainer(task, run_dir=out_dir, device="cpu", run_config=run_config).fit()
    curve = [(event["step"], event["eval_return_mean"]) for event in result.history if event["kind"] == "eval"]
    return result, curve


def train_cartpole(system, preset, out_dir: Path, *, budget_s: float) -> dict:
    """The online-offline rounds: greedy return after each round and the mean return of each round's data."""
    started = time.perf_counter()
    result, curve = train_preset(system, preset, out_dir, budget_s=budget_s)
    rl = RL_SETTINGS[preset.name]
    rounds = [ReplayDataset(path) for path in sorted((out_dir / REPLAY_DIR).glob("round-*"))]
    return {
        "curve": curve,
        "data_returns": [(i * rl.steps_per_round, float(r.episode_returns().mean())) for i, r in enumerate(rounds)],
        "final_return": result.eval_metrics["eval_return_mean"],
        "target": rl.target_return,
        "episodes": sum(r.num_episodes for r in rounds),
        "seconds": time.perf_counter() - started,
        "steps": result.step,
    }


def train_offline_lunarlander(system, preset, out_dir: Path, *, budget_s: float) -> dict:
    """Offline training on the fixed noisy-heuristic dataset (generated once, cached); greedy returns on the way."""
    started = time.perf_counter()
    rl = RL_SETTINGS[preset.name]
    dataset = lunarlander_dataset(rl, preset.model_config.action_bins)
    result, curve = train_preset(system, preset, out_dir, budget_s=budget_s - (time.perf_counter() - started))
    envs = make_env(rl.env_id, rl.eval_episodes)
    clean = rollout(
        envs,
        lunar_heuristic_policy(envs[0], 0.0, np.random.default_rng(0), dataset.discretiser),
        rl.eval_episodes,
        discretiser=dataset.discretiser,
        seed=EVAL_SEED,
    )
    return {
        "curve": curve,
        "final_return": result.eval_metrics["eval_return_mean"],
        "dataset_return": float(dataset.episode_returns().mean()),
        "heuristic_return": float(np.mean([e.raw_return for e in clean])),
        "episodes": dataset.num_episodes,
        "seconds": time.perf_counter() - started,
        "steps": result.step,
    }


def run_demo(system, out_dir: Path, *, budget_s: float, quick: bool = False) -> ReportSection:
    out_dir.mkdir(parents=True, exist_ok=True)
    presets = system.presets()
    cartpole_budget = budget_s * 2 / 3  # CartPole's target takes about 4 minutes; LunarLander gets the rest
    cart = train_cartpole(system, presets["demo"], out_dir / "cartpole", budget_s=cartpole_budget)
    lunar = train_offline_lunarlander(
        system, presets["lunarlander-offline"], out_dir / "lunarlander", budget_s=max(10.0, budget_s - cart["seconds"])
    )
    figures = [
        plot_series(
            out_dir / "cartpole_returns.png",
            {"greedy policy (10 seeds)": cart["curve"], "collected episodes": cart["data_returns"]},
            xlabel="optimizer step",
            ylabel="return",
            title="CartPole-v1: online-offline rounds",
        ),
        plot_series(
            out_dir / "lunarlander_returns.png",
            {
                "greedy policy (20 seeds)": lunar["curve"],
                "dataset mean": [(0, lunar["dataset_return"]), (lunar["steps"], lunar["dataset_return"])],
                "noise-free heuristic": [(0, lunar["heuristic_return"]), (lunar["steps"], lunar["heuristic_return"])],
            },
            xlabel="optimizer step",
            ylabel="return",
            title="LunarLanderContinuous: offline Q-Transformer",
        ),
    ]
    lunar_final = lunar["final_return"]
    table = [
        {"policy": "noise-free heuristic (20 eval seeds)", "mean return": round(lunar["heuristic_return"], 1)},
        {
            "policy": f"dataset ({lunar['episodes']} noisy-heuristic episodes)",
            "mean return": round(lunar["dataset_return"], 1),
        },
        {"policy": "Q-Transformer greedy (20 eval seeds)", "mean return": round(lunar_final, 1)},
    ]
    cart_final = cart["final_return"]
    reached = "reached" if cart_final >= cart["target"] else "not reached"
    summary = (
        f"CartPole-v1: {cart['episodes']} episodes collected in online-offline rounds (epsilon-greedy), "
        f"{cart['steps']} optimizer steps in {cart['seconds']:.0f}s; greedy return over 10 seeds {cart_final:.1f} "
        f"(target {cart['target']:.0f}: {reached}). LunarLanderContinuous (2 dims x 32 bins), offline from "
        f"{lunar['episodes']} noisy heuristic episodes, {lunar['steps']} steps in {lunar['seconds']:.0f}s: greedy "
        f"return {lunar_final:.1f} vs dataset mean {lunar['dataset_return']:.1f} and noise-free heuristic "
        f"{lunar['heuristic_return']:.1f}."
    )
    return ReportSection(
        title="Q-Transformer: offline RL with autoregressive Q-functions",
        summary=summary,
        train_seconds=cart["seconds"] + lunar["seconds"],
        metrics={
            "cartpole_return": cart_final,
            "cartpole_seconds": cart["seconds"],
            "lunarlander_return": lunar_final,
            "lunarlander_dataset_return": lunar["dataset_return"],
            "lunarlander_heuristic_return": lunar["heuristic_return"],
        },
        figures=[str(figure) for figure in figures],
        tables={"LunarLanderContinuous: offline Q-Transformer vs its data": table},
    )
