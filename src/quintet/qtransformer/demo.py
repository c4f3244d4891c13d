"""The Q-Transformer's demo section: CartPole online-offline, then LunarLander fully offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quintet.qtransformer.data import ReplayDataset, rollout
from quintet.qtransformer.datasets import lunarlander_dataset
from quintet.qtransformer.envs import EVAL_SEED, lunar_heuristic_policy, make_env
from quintet.qtransformer.online import REPLAY_DIR
from quintet.registry import DemoRun, Preset
from quintet.training.pipeline import RunResult
from quintet.training.report import plot_series
from quintet.training.task import ReportSection

METRIC_MEANINGS = {
    "eval_return_mean": "mean episode return of the greedy policy over the evaluation seeds (higher is better)",
    "eval_return_std": "spread (standard deviation) of those returns",
    "td_loss": "the temporal-difference loss of eq. 1 (Q-values vs their Bellman targets)",
    "conservative_loss": "eq. 2's penalty pushing the Q-values of actions the data never took towards 0",
    "cartpole_return": "CartPole-v1: greedy return over 10 seeds (500 is the maximum, 475 the target)",
    "lunarlander_return": "LunarLanderContinuous: greedy return over 20 seeds of the offline-trained policy",
    "lunarlander_dataset_return": "mean return of the noisy-heuristic episodes the LunarLander policy learned from",
    "lunarlander_heuristic_return": "mean return of gymnasium's noise-free heuristic controller on the same seeds",
}


def demo_runs(presets: dict[str, Preset]) -> list[DemoRun]:
    # CartPole's target takes about 4 minutes on 2 cores; LunarLander gets the rest of the budget
    return [
        DemoRun(label="cartpole", preset=presets["demo"], budget_share=2.0, device="cpu"),
        DemoRun(label="lunarlander", preset=presets["lunarlander-offline"], budget_share=1.0, device="cpu"),
    ]


def _return_curve(run: RunResult) -> list[tuple[int, float]]:
    return [(e["step"], e["eval_return_mean"]) for e in run.last.result.history if e["kind"] == "eval"]


def cartpole_numbers(run: RunResult) -> dict:
    """The online-offline rounds: greedy return after each round and the mean return of each round's data."""
    rl = run.preset.recipe
    result = run.last.result
    rounds = [ReplayDataset(path) for path in sorted((run.run_dir / REPLAY_DIR).glob("round-*"))]
    return {
        "curve": _return_curve(run),
        "data_returns": [(i * rl.steps_per_round, float(r.episode_returns().mean())) for i, r in enumerate(rounds)],
        "final_return": result.eval_metrics["eval_return_mean"],
        "target": rl.target_return,
        "episodes": sum(r.num_episodes for r in rounds),
        "seconds": result.seconds,
        "steps": result.step,
    }


def lunarlander_numbers(run: RunResult) -> dict:
    """Offline training on the fixed noisy-heuristic dataset, beside the dataset's and the clean heuristic's returns."""
    rl = run.preset.recipe
    result = run.last.result
    dataset = lunarlander_dataset(rl, run.last.stage.model_config.action_bins)  # cached when training began
    envs = make_env(rl.env_id, rl.eval_episodes)
    clean = rollout(
        envs,
        lunar_heuristic_policy(envs[0], 0.0, np.random.default_rng(0), dataset.discretiser),
        rl.eval_episodes,
        discretiser=dataset.discretiser,
        seed=EVAL_SEED,
    )
    return {
        "curve": _return_curve(run),
        "final_return": result.eval_metrics["eval_return_mean"],
        "dataset_return": float(dataset.episode_returns().mean()),
        "heuristic_return": float(np.mean([e.raw_return for e in clean])),
        "episodes": dataset.num_episodes,
        "seconds": result.seconds,
        "steps": result.step,
    }


def demo_section(runs: list[RunResult], *, out_dir: Path) -> ReportSection:
    by_label = {run.label: run for run in runs}
    cart = cartpole_numbers(by_label["cartpole"])
    lunar = lunarlander_numbers(by_label["lunarlander"])
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
