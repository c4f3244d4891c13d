"""The Flamingo section of the demo report: few-shot accuracy against the number of examples in the prompt."""

from __future__ import annotations

from pathlib import Path

import torch

from quintet.training.pipeline import RunResult
from quintet.training.report import plot_series
from quintet.training.task import ReportSection


def _by_shots(metrics: dict[str, float], prefix: str) -> list[tuple[int, float]]:
    found = [(int(key.removeprefix(prefix)), value) for key, value in metrics.items() if key.startswith(prefix)]
    return sorted(found)


def flamingo_section(runs: list[RunResult], *, out_dir: Path, quick: bool) -> ReportSection:
    run = runs[0]
    stages = {name: stage for name, stage in run.stages.items() if stage.result is not None}
    flamingo, lm, vision = stages["flamingo"], stages.get("lm"), stages.get("vision")
    metrics = dict(flamingo.result.eval_metrics)
    lm_metrics = dict(lm.result.eval_metrics) if lm is not None else {}
    chance = metrics.get("fewshot_chance", float("nan"))
    image_curve = _by_shots(metrics, "fewshot_accuracy_")
    text_curve = _by_shots(lm_metrics, "text_fewshot_accuracy_")
    shots = [k for k, _ in image_curve]

    out_dir.mkdir(parents=True, exist_ok=True)
    accuracy_figure = plot_series(
        out_dir / "flamingo_fewshot_accuracy.png",
        {
            "Flamingo (frozen LM and encoder), held-out images": image_curve,
            "the LM alone, concept tokens in place of images": text_curve,
            f"chance (1/{round(1 / chance) if chance == chance else '?'})": [
                (min(shots), chance),
                (max(shots), chance),
            ],
        },
        xlabel="captioned examples in the prompt (shots)",
        ylabel="accuracy naming the query image",
        title="Few-shot learning from the prompt",
    )
    best = max(shots)
    progress = [
        (e["time_s"], e[f"fewshot_accuracy_{best}"]) for e in flamingo.result.history if f"fewshot_accuracy_{best}" in e
    ]
    progress_figure = plot_series(
        out_dir / "flamingo_accuracy_during_training.png",
        {
            f"{best}-shot accuracy": progress,
            "chance": [(0.0, chance), (max([t for t, _ in progress] or [1.0]), chance)],
        },
        xlabel="Flamingo-stage training wall-clock (s)",
        ylabel="accuracy",
        title=f"{best}-shot accuracy while training the cross-attention",
    )
    with torch.no_grad():
        samples = flamingo.task.sample(flamingo.model) if flamingo.task.sample is not None else {}

    seconds = sum(stage.result.seconds for stage in stages.values())
    text_by_shots = dict(text_curve)
    rows = [
        {
            "shots": k,
            "Flamingo accuracy": round(acc, 3),
            "LM alone on concept tokens": round(text_by_shots[k], 3) if k in text_by_shots else None,
            "chance": round(chance, 3),
        }
        for k, acc in image_curve
    ]
    stage_rows = [
        {
            "stage": name,
            "steps": stage.result.step,
            "train seconds": round(stage.result.seconds, 1),
            "what it learns": stage.stage.description,
        }
        for name, stage in stages.items()
    ]
    vision_accuracy = vision.result.eval_metrics.get("val_accuracy") if vision is not None else None
    curve = ", ".join(f"{k} shots {acc:.0%}" for k, acc in image_curve)
    summary = (
        f"Flamingo at toy scale, trained in {seconds:.0f} s on {torch.get_num_threads()} CPU thread(s) in the paper's "
        f"order: an image encoder pre-trained on its own ({vision.result.step if vision else '?'} steps; "
        f"held-out classification accuracy {vision_accuracy if vision_accuracy is not None else float('nan'):.0%}), a "
        f"language model pre-trained on text alone ({lm.result.step if lm else '?'} steps), then, with both frozen, "
        f"the Perceiver resampler and gated cross-attention ({flamingo.result.step} steps). Each episode gives "
        f'{round(1 / chance) if chance == chance else "?"} shape classes fresh nonsense words ("dax", "wug"), so '
        f"the only way to name a query image is to find the example image of the same shape in the prompt and copy "
        f"its word. On held-out images and episodes the model names the query right in: {curve} (chance "
        f"{chance:.0%}; with fewer examples than classes the query's class may be missing from the prompt, so "
        f"the best possible is below 100%). The second curve is the frozen language model reading concept tokens "
        f"instead of images: what Flamingo could reach if its images were read perfectly."
        + (" Quick mode: a short budget, expect accuracies near chance." if quick else "")
    )
    figures = [str(accuracy_figure), str(progress_figure)] + [str(p) for p in samples.get("images", [])]
    if flamingo.result.loss_curve is not None:
        figures.append(str(flamingo.result.loss_curve))
    report_metrics = {key: float(value) for key, value in metrics.items()}
    report_metrics.update({key: float(v) for key, v in lm_metrics.items() if key.startswith("text_fewshot")})
    if vision_accuracy is not None:
        report_metrics["vision_val_accuracy"] = float(vision_accuracy)
    texts = {}
    if "text" in samples:
        texts["held-out prompts (a grid row each, the query image last) and the model's greedy answers"] = samples[
            "text"
        ]
    return ReportSection(
        title="Flamingo: a frozen language model learns from a few examples in its prompt",
        summary=summary,
        train_seconds=seconds,
        metrics=report_metrics,
        figures=figures,
        samples=texts,
        tables={"few-shot accuracy on held-out episodes": rows, "stages": stage_rows},
    )
