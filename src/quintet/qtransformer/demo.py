"""The Q-Transformer's demo section: CartPole online-offline, LunarLander fully offline, then BabyAI from
pixels and instructions (offline from the noisy bot)."""

from __future__ import annotations

from dataclasses import replace
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
    "eval_success_rate": "share of held-out BabyAI episodes the greedy policy solves, reading the right instruction",
    "eval_success_rate_guided": "the same with classifier-free guidance on the instruction (cond_scale > 1)",
    "eval_success_rate_shuffled": "the same starts with another instruction of the family shown to the policy "
    "(the env checks the real one): low means the policy reads its instruction",
    "eval_success_rate_other_goal": "the same starts retargeted to another object of the scene: the instructed "
    "goal, not a habit, is reached",
    "data_success_rate": "share of the offline episodes (noisy, partly misdirected bot) that succeeded",
    "babyai_success_rate": "BabyAI: greedy success on held-out seeds with the right instruction",
    "babyai_data_success_rate": "BabyAI: success rate of the offline data the policy learned from",
    "babyai_success_rate_shuffled": "BabyAI: greedy success when the policy reads a shuffled instruction",
    "babyai_success_rate_other_goal": "BabyAI: greedy success when the same start is retargeted to another object",
    "babyai_success_rate_guided": "BabyAI: greedy success with classifier-free guidance on the instruction",
    "babyai_deadlock_rate": "BabyAI: share of greedy episodes that failed repeating an action that changes nothing",
}
for _family in ("go_to", "pick_up"):
    METRIC_MEANINGS[f"eval_success_rate_{_family}"] = f"greedy success on held-out '{_family}' instructions"
    METRIC_MEANINGS[f"data_success_rate_{_family}"] = f"success rate of the offline data's '{_family}' episodes"

BABYAI_DEMO_EPISODES = 1500
"""the full demo's BabyAI data (the preset's 5000 take a minute to generate, which the demo's 20 minutes
do not have)"""
BABYAI_DEMO_EVAL_EPISODES = 60
"""held-out seeds per demo evaluation (the preset's 200: a success rate within about 0.03 of the rate,
but four times the evaluation time)"""
BABYAI_QUICK_EPISODES = 600
"""--quick: the BabyAI data is this many episodes"""
BABYAI_DEMO_LEVELS = ("quintet/BabyAI-GoToDistinctS6N3-v0",)
"""the demo's BabyAI run plays the "go to" family only: in its two minutes the preset's "pick up" family
was not learned (measured: 0 success, its data 0.39)"""


def demo_runs(presets: dict[str, Preset], *, quick: bool = False) -> list[DemoRun]:
    # CartPole's target takes about 4 minutes on 2 cores; LunarLander, then BabyAI get the rest of the budget
    babyai = presets["babyai"]
    recipe = replace(
        babyai.recipe,
        world=replace(babyai.recipe.world, levels=BABYAI_DEMO_LEVELS),
        dataset_episodes=BABYAI_QUICK_EPISODES if quick else BABYAI_DEMO_EPISODES,
        eval_episodes=BABYAI_DEMO_EVAL_EPISODES,
        steps_per_round=0,  # offline: the demo's minutes end before the preset's first round of own episodes
    )
    babyai = replace(babyai, recipe=recipe)
    return [
        DemoRun(label="cartpole", preset=presets["demo"], budget_share=2.0, device="cpu"),
        DemoRun(label="lunarlander", preset=presets["lunarlander-offline"], budget_share=1.0, device="cpu"),
        DemoRun(label="babyai", preset=babyai, budget_share=BABYAI_BUDGET_SHARE, device="cpu"),
    ]


BABYAI_BUDGET_SHARE = 1.0
"""BabyAI's share of the Q-Transformer's demo time, beside CartPole's 2 and LunarLander's 1 (about 120 s of
training in the full demo)"""


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
        "bins": dataset.discretiser.bins,
        "seconds": result.seconds,
        "steps": result.step,
    }


def babyai_numbers(run: RunResult) -> dict:
    """Success rates by instruction family beside the data's, the instruction checks, a solved episode."""
    result = run.last.result
    metrics = dict(result.eval_metrics)
    sample = run.last.task.sample(run.last.model)
    families = sorted(k.removeprefix("eval_success_rate_") for k in metrics if k.startswith("eval_success_rate_"))
    families = [f for f in families if f not in ("guided", "shuffled", "other_goal")]
    table = [
        {
            "instruction family": family.replace("_", " "),
            "greedy success (held-out seeds)": round(metrics[f"eval_success_rate_{family}"], 2),
            "data success": round(metrics.get(f"data_success_rate_{family}", float("nan")), 2),
        }
        for family in families
    ]
    table.append(
        {
            "instruction family": "all",
            "greedy success (held-out seeds)": round(metrics["eval_success_rate"], 2),
            "data success": round(metrics["data_success_rate"], 2),
        }
    )
    images = sample.get("images", [])
    return {
        "metrics": metrics,
        "table": table,
        "figure": images[0] if images else None,
        "instruction": sample.get("instruction"),
        "episodes": run.preset.recipe.dataset_episodes,
        "seconds": result.seconds,
        "steps": result.step,
        "guided_scale": run.preset.recipe.guided_scale,
    }


def demo_section(runs: list[RunResult], *, out_dir: Path) -> ReportSection:
    by_label = {run.label: run for run in runs}
    cart = cartpole_numbers(by_label["cartpole"])
    lunar = lunarlander_numbers(by_label["lunarlander"])
    babyai = babyai_numbers(by_label["babyai"]) if "babyai" in by_label else None
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
    tables = {"LunarLanderContinuous: offline Q-Transformer vs its data": table}
    metrics = {
        "cartpole_return": cart_final,
        "cartpole_seconds": cart["seconds"],
        "lunarlander_return": lunar_final,
        "lunarlander_dataset_return": lunar["dataset_return"],
        "lunarlander_heuristic_return": lunar["heuristic_return"],
    }
    samples = {}
    babyai_summary = ""
    seconds = cart["seconds"] + lunar["seconds"]
    if babyai is not None:
        m = babyai["metrics"]
        tables["BabyAI from pixels + instructions: success by instruction family vs the data"] = babyai["table"]
        tables["BabyAI: does the policy read its instruction?"] = [
            {"instruction shown to the policy": "the right one", "success": round(m["eval_success_rate"], 2)},
            {
                "instruction shown to the policy": f"the right one, guided (cond_scale {babyai['guided_scale']:g})",
                "success": round(m["eval_success_rate_guided"], 2),
            },
            {
                "instruction shown to the policy": "another of its family (env checks the real one)",
                "success": round(m["eval_success_rate_shuffled"], 2),
            },
            {
                "instruction shown to the policy": "same start, retargeted to another object",
                "success": round(m["eval_success_rate_other_goal"], 2),
            },
        ]
        metrics |= {
            "babyai_success_rate": m["eval_success_rate"],
            "babyai_data_success_rate": m["data_success_rate"],
            "babyai_success_rate_shuffled": m["eval_success_rate_shuffled"],
            "babyai_success_rate_other_goal": m["eval_success_rate_other_goal"],
            "babyai_success_rate_guided": m["eval_success_rate_guided"],
            "babyai_deadlock_rate": m["eval_deadlock_rate"],
        }
        if babyai["figure"] is not None:
            figures.append(babyai["figure"])
            strip = "BabyAI: a solved held-out episode (frames left to right)"
            samples[strip] = f"instruction: {babyai['instruction']}"
        seconds += babyai["seconds"]
        babyai_summary = (
            f" BabyAI from 28 x 28 RGB views and instructions (the go-to family: 18 instructions), offline from "
            f"{babyai['episodes']} episodes of the noisy bot, partly misdirected or random (success "
            f"{m['data_success_rate']:.2f}), {babyai['steps']} steps in {babyai['seconds']:.0f}s: greedy success "
            f"{m['eval_success_rate']:.2f} on held-out seeds ({m['eval_success_rate_guided']:.2f} guided), "
            f"{m['eval_success_rate_shuffled']:.2f} with a shuffled instruction, "
            f"{m['eval_success_rate_other_goal']:.2f} retargeted to another object."
        )
    summary = (
        f"CartPole-v1: {cart['episodes']} episodes collected in online-offline rounds (epsilon-greedy), "
        f"{cart['steps']} optimizer steps in {cart['seconds']:.0f}s; greedy return over 10 seeds {cart_final:.1f} "
        f"(target {cart['target']:.0f}: {reached}). LunarLanderContinuous (2 dims x {lunar['bins']} bins), offline "
        f"from {lunar['episodes']} noisy heuristic episodes, {lunar['steps']} steps in {lunar['seconds']:.0f}s: greedy "
        f"return {lunar_final:.1f} vs dataset mean {lunar['dataset_return']:.1f} and noise-free heuristic "
        f"{lunar['heuristic_return']:.1f}." + babyai_summary
    )
    return ReportSection(
        title="Q-Transformer: offline RL with autoregressive Q-functions",
        summary=summary,
        train_seconds=seconds,
        metrics=metrics,
        figures=[str(figure) for figure in figures],
        samples=samples,
        tables=tables,
    )
