"""Train DUET on the embedded pair and compare it with every baseline, in one run.

    python bench/train_duet.py                      # configs/builtin.toml, 500 test questions
    python bench/train_duet.py --skip-training      # evaluate existing runs only
    python bench/train_duet.py --reuse              # train only what is not finished yet

1. joint DUET training from the shipped base pair (configs/builtin.toml);
2. the single-model length-penalty GRPO baseline with the same budget B
   (configs/builtin-single.toml);
3. greedy evaluation on the builtin test split: base M-alone, base m-alone, untrained duet,
   untrained duet@B for several B, trained DUET, and the length-penalty GRPO M alone.
Prints accuracy, mean M output tokens, M-token savings against base M-alone and the ratio of
M tokens to the task's floor (the essential trace minus the steps the base m finishes
reliably). The embedded pair is a small model pair trained on a synthetic task: these are
not results on real LLMs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from duetlm.backends import BackendOptions, load_backend
from duetlm.config import DuetConfig
from duetlm.evaluate import EvalConfig, load_summaries, run_eval
from duetlm.grading import extract_boxed
from duetlm.models import EMBEDDED_BUDGETS
from duetlm.protocol import Duet, Problem
from duetlm.tasks import builtin
from duetlm.train.config import TrainConfig
from duetlm.train.loop.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RELIABLE = 0.90


def light_finishes(light: str, problems: list[builtin.ChainProblem]) -> int:
    """How many final steps m completes by itself with >= 90% accuracy."""
    backend = load_backend(light, BackendOptions(device="cpu", batch_size=128))
    duet = Duet(backend, backend, DuetConfig(answer_max_tokens=64))
    questions = [Problem(p.question) for p in problems]
    finished = 0
    for drop in (1, 2, 3):
        results = duet.finish(questions, [builtin.essential_signal(p, drop) for p in problems])
        acc = sum(
            extract_boxed(r.text) == str(p.answer) for r, p in zip(results, problems, strict=True)
        ) / len(problems)
        if acc < RELIABLE:
            break
        finished = drop
    return finished


def plot_plane(rows: list[dict], path: Path) -> None:
    """Accuracy against mean M output tokens, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    budgets = sorted((r for r in rows if "duet@" in r["label"]), key=lambda r: r["M_output_tokens_mean"])
    axis.plot(
        [r["M_output_tokens_mean"] for r in budgets],
        [100 * r["accuracy"] for r in budgets],
        "o--",
        color="gray",
        label="untrained duet@B (signal cut at B tokens)",
    )
    for r in rows:
        if "duet@" in r["label"] or r["label"] == "base m-alone":
            continue
        axis.plot(r["M_output_tokens_mean"], 100 * r["accuracy"], "o", markersize=8, label=r["label"])
    axis.set_xlabel("mean M output tokens per question")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("builtin task, embedded toy pair (not real-LLM results)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs/builtin.toml"))
    parser.add_argument("--single-config", default=str(ROOT / "configs/builtin-single.toml"))
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--budgets", default="16,24,32,48")
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument("--skip-training", action="store_true", help="evaluate existing runs only")
    parser.add_argument(
        "--reuse", action="store_true", help="skip training a run whose folder holds a finished run"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    joint, single = TrainConfig.load(args.config), TrainConfig.load(args.single_config)
    joint = joint.model_copy(update={"out": str(out / "duet")})
    single = single.model_copy(update={"out": str(out / "single")})
    timings = {}
    for name, config in (("duet", joint), ("single", single)):
        final = Path(config.out) / "final.json"
        done = final.is_file() and json.loads(final.read_text())["step"] == config.steps
        if args.skip_training or (args.reuse and done):
            if done:
                timings[name] = json.loads(final.read_text())["wall_s"]
            continue
        started = time.perf_counter()
        train(config, force=True)
        timings[name] = time.perf_counter() - started
    trained_capable = f"hf:{out / 'duet' / 'last' / 'capable'}"
    trained_light = f"hf:{out / 'duet' / 'last' / 'light'}" if joint.trains_light else joint.light.model
    single_capable = f"hf:{out / 'single' / 'last' / 'capable'}"
    duet_config = DuetConfig(**EMBEDDED_BUDGETS)
    budgets = [f"duet@{b}" for b in args.budgets.split(",")]
    runs = [
        ("base", joint.capable.model, joint.light.model, ["M-alone", "m-alone", "duet", *budgets]),
        ("trained", trained_capable, trained_light, ["duet"]),
        ("length-penalty GRPO", single_capable, joint.light.model, ["M-alone"]),
    ]
    rows = []
    for label, capable, light, methods in runs:
        folder = out / "eval" / label.replace(" ", "-")
        config = EvalConfig(
            tasks=["builtin"],
            methods=methods,
            capable=capable,
            light=light,
            limit=args.questions,
            batch_size=128,
            duet=duet_config,
        )
        run_eval(config, folder, force=True, backend_options=BackendOptions(device="cpu", batch_size=128))
        rows += [s | {"label": f"{label} {s['method']}"} for s in load_summaries(folder)]
    problems = builtin.generate(args.questions, split="test")
    finished = light_finishes(joint.light.model, problems)
    count = load_backend(joint.capable.model, BackendOptions(device="cpu")).count_tokens
    floor = statistics.mean(builtin.floor_tokens(p, count, finished) for p in problems)
    base = next(r for r in rows if r["label"] == "base M-alone")
    print(f"builtin task, {args.questions} test questions, greedy (a toy pair; not real-LLM results)")
    print(f"floor: {floor:.1f} M tokens per question (essential trace minus {finished} step(s) m finishes)")
    for name, seconds in timings.items():
        print(f"training {name}: {seconds / 60:.1f} min")
    print(f"{'method':<34} {'accuracy':>8} {'M tokens':>9} {'savings':>8} {'floor x':>8}")
    for r in sorted(rows, key=lambda r: -r["M_output_tokens_mean"]):
        savings = 100 * (1 - r["M_output_tokens_mean"] / base["M_output_tokens_mean"])
        ratio = r["M_output_tokens_mean"] / floor if r["M_output_tokens_mean"] else 0.0
        print(
            f"{r['label']:<34} {100 * r['accuracy']:>7.1f}% {r['M_output_tokens_mean']:>9.1f} {savings:>7.1f}% "
            f"{ratio:>8.2f}"
        )
    plot_plane(rows, out / "accuracy_vs_M_tokens.png")
    print(f"plot: {out / 'accuracy_vs_M_tokens.png'}")
    (out / "table.json").write_text(
        json.dumps(
            {"floor": floor, "light_finishes": finished, "rows": rows, "training_seconds": timings}, indent=2
        )
    )


if __name__ == "__main__":
    main()
