"""The Q-Transformer's demo section: CartPole online-offline, then LunarLander fully offline."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from quintet.qtransformer.data import rollout
from quintet.qtransformer.presets import RL_SETTINGS
from quintet.qtransformer.system import (
    EVAL_SEED,
    lunar_heuristic_policy,
    lunarlander_dataset,
    make_env,
    train_online_offline,
)
from quintet.training import Trainer
from quintet.training.report import plot_series
from quintet.training.task import ReportSection

CARTPOLE_TARGET = 475.0


def train_offline_lunarlander(system, preset, out_dir: Path, *, budget_s: float, seed: int = 0) -> dict:
    """Offline training on the fixed noisy-heuristic dataset with the Trainer; greedy returns on the way."""
    started = time.perf_counter()
    rl = RL_SETTINGS[preset.name]
    dataset = lunarlander_dataset(rl, preset.model_config.action_bins)
    settings = replace(preset.settings, seed=seed, time_budget_s=max(1.0, budget_s - (time.perf_counter() - started)))
    task = system.make_task(preset, settings=settings)
    result = Trainer(
        task, run_dir=out_dir, device="cpu", run_config={"system": system.name, "preset": preset.name}
    ).fit()
    curve = [(event["step"], event["eval_return_mean"]) for event in result.history if event["kind"] == "eval"]
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
    cartpole_budget = budget_s * (0.5 if not quick else 0.3)
    cart = train_online_offline(
        presets["demo"], out_dir / "cartpole", budget_s=cartpole_budget, target_return=CARTPOLE_TARGET
    )
    lunar = train_offline_lunarlander(
        system, presets["lunarlander-offline"], out_dir / "lunarlander", budget_s=max(10.0, budget_s - cart.seconds)
    )
    figures = [
        plot_series(
            out_dir / "cartpole_returns.png",
            {"greedy policy (10 seeds)": cart.eval_returns, "collected episodes": cart.data_returns},
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
    cart_final = cart.eval_returns[-1][1]
    summary = (
        f"CartPole-v1: {cart.episodes} episodes collected epsilon-greedily in rounds, {cart.steps} optimizer steps in "
        f"{cart.seconds:.0f}s; greedy return over 10 seeds {cart_final:.1f} (target {CARTPOLE_TARGET:.0f}: "
        f"{'reached' if cart.reached else 'not reached'}). LunarLanderContinuous (2 dims x 32 bins), offline from "
        f"{lunar['episodes']} noisy heuristic episodes, {lunar['steps']} steps in {lunar['seconds']:.0f}s: greedy "
        f"return {lunar_final:.1f} vs dataset mean {lunar['dataset_return']:.1f} and noise-free heuristic "
        f"{lunar['heuristic_return']:.1f}."
    )
    return ReportSection(
        title="Q-Transformer: offline RL with autoregressive Q-functions",
        summary=summary,
        train_seconds=cart.seconds + lunar["seconds"],
        metrics={
            "cartpole_return": cart_final,
            "cartpole_seconds": cart.seconds,
            "lunarlander_return": lunar_final,
            "lunarlander_dataset_return": lunar["dataset_return"],
            "lunarlander_heuristic_return": lunar["heuristic_return"],
        },
        figures=[str(figure) for figure in figures],
        tables={"LunarLanderContinuous: offline Q-Transformer vs its data": table},
    )
