"""Training curves from a run's metrics.jsonl: signal length, λ and pair accuracy over steps."""

from __future__ import annotations

import json
from pathlib import Path

from duetlm.errors import InputError
from duetlm.jsonl import read_jsonl


def plot_training(run: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{run} has no metrics.jsonl; is it a `duet train` run folder?")
    rows = [row for _, row in read_jsonl(path, on_cut_tail="drop") if isinstance(row, dict)]
    if not rows:
        raise InputError(f"{path} is empty")
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    length_key = "signal_tokens" if any("signal_tokens" in r for r in rows) else "output_tokens"
    series = [
        (axes[0], length_key, "M output tokens"),
        (axes[1], "lambda", "λ (length penalty weight)"),
    ]
    for axis, key, title in series:
        points = [(r["step"], r[key]) for r in rows if key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], label="rollouts")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    greedy = [(r["step"], r["eval_capable_tokens"]) for r in rows if "eval_capable_tokens" in r]
    if greedy:
        axes[0].plot([p[0] for p in greedy], [p[1] for p in greedy], marker="o", label="greedy eval")
    settings = Path(run) / "train_config.json"
    if settings.is_file():
        bound = json.loads(settings.read_text()).get("length_bound")
        if bound:
            axes[0].axhline(bound, color="gray", linestyle="--", label=f"B = {bound:g}")
    axes[0].legend()
    for key, label in (
        ("pair_accuracy", "rollout pair accuracy"),
        ("accuracy", "rollout accuracy"),
        ("eval_accuracy", "greedy eval accuracy"),
    ):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            axes[2].plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o" if key == "eval_accuracy" else None,
                label=label,
            )
    axes[2].set_title("accuracy")
    axes[2].set_xlabel("step")
    axes[2].legend()
    axes[2].grid(alpha=0.3)
    figure.tight_layout()
    out = Path(run) / "training_curves.png"
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
