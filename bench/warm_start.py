"""GRPO from the base M against GRPO after a warm start from the probe, on the embedded pair.

    python bench/warm_start.py                 # probe 400 training questions, train both, compare
    python bench/warm_start.py --reuse         # keep finished probe and training runs

1. `duet probe --split train` on the first 400 builtin training questions (base tiny-M + tiny-m);
2. `configs/builtin.toml` as is (cold), and with `warm_start` set to that probe (warm);
3. from both runs' evaluations (greedy DUET on 200 test questions every 10 steps): the first
   step with >= 60% M-token savings against base M-alone at most 1 (and 2) points below its
   accuracy, and the wall time to get there (warm start included).
The embedded pair is a small model pair trained on a synthetic task: these are not results on
real LLMs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from duetlm.backends import BackendOptions
from duetlm.config import DuetConfig
from duetlm.evaluate import EvalConfig, load_summaries, run_eval
from duetlm.evaluate.probe import ProbeConfig, run_probe
from duetlm.models import EMBEDDED_BUDGETS
from duetlm.train.config import TrainConfig, with_settings
from duetlm.train.loop.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TARGET_SAVINGS = 60.0


def finished(config: TrainConfig) -> bool:
    final = Path(config.out) / "final.json"
    return final.is_file() and json.loads(final.read_text())["step"] == config.steps


def evaluations(run: Path) -> list[dict]:
    """(step, accuracy, M tokens, seconds since the start of training) of each evaluation."""
    warm = run / "warm_start.json"
    elapsed = json.loads(warm.read_text())["seconds"] if warm.is_file() else 0.0
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        elapsed += row.get("step_s", 0.0)
        if "eval_accuracy" in row:
            points.append(
                {
                    "step": row["step"],
                    "accuracy": row["eval_accuracy"],
                    "tokens": row["eval_capable_tokens"],
                    "train_s": elapsed,
                }
            )
    return points


def first_reaching(points: list[dict], base_accuracy: float, base_tokens: float, points_below: float):
    for p in points:
        saved = 100 * (1 - p["tokens"] / base_tokens)
        if saved >= TARGET_SAVINGS and p["accuracy"] >= base_accuracy - points_below / 100 - 1e-9:
            return p
    return None


def plot(curves: dict[str, list[dict]], base_tokens: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in curves.items():
        steps = [p["step"] for p in points]
        left.plot(steps, [100 * (1 - p["tokens"] / base_tokens) for p in points], marker="o", label=label)
        right.plot(steps, [100 * p["accuracy"] for p in points], marker="o", label=label)
    left.axhline(TARGET_SAVINGS, linestyle=":", color="gray")
    left.set_ylabel("M-token savings vs base M-alone (%)")
    right.set_ylabel("DUET accuracy (%)")
    for axes in (left, right):
        axes.set_xlabel("GRPO step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=9)
    figure.suptitle("GRPO on the embedded pair, with and without the probe's warm start (toy task)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-warm-start")
    parser.add_argument("--config", default=str(ROOT / "configs" / "builtin.toml"))
    parser.add_argument("--probe-questions", type=int, default=400)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    base = TrainConfig.load(args.config)
    probe_dir = out / "probe"
    started = time.perf_counter()
    run_probe(
        ProbeConfig(
            task="builtin", split="train", limit=args.probe_questions, capable=base.capable, light=base.light
        ),
        probe_dir,
        force=not args.reuse,
        progress=False,
    )
    probe_s = time.perf_counter() - started
    configs = {
        "cold": base.model_copy(update={"out": str(out / "cold")}),
        "warm": with_settings(base, {"out": str(out / "warm"), "warm_start.run": str(probe_dir)}),
    }
    for config in configs.values():
        if not (args.reuse and finished(config)):
            train(config, force=True, progress=False)
    reference = out / "m-alone-reference"
    run_eval(
        EvalConfig(
            tasks=["builtin"],
            methods=["M-alone"],
            capable=base.capable,
            light=base.light,
            limit=base.eval_questions,
            batch_size=128,
            duet=DuetConfig(**EMBEDDED_BUDGETS),
        ),
        reference,
        force=True,
        backend_options=BackendOptions(device="cpu", batch_size=128),
        progress=False,
    )
    [m_alone] = load_summaries(reference)
    base_accuracy, base_tokens = m_alone["accuracy"], m_alone["M_output_tokens_mean"]
    curves = {name: evaluations(Path(config.out)) for name, config in configs.items()}
    print(f"builtin task, {base.eval_questions} test questions, greedy (a toy pair; not real-LLM results)")
    print(
        f"base M-alone: {100 * base_accuracy:.1f}% at {base_tokens:.1f} M tokens; probe of "
        f"{args.probe_questions} training questions: {probe_s:.0f} s"
    )
    summary = {"base_accuracy": base_accuracy, "base_tokens": base_tokens, "probe_s": probe_s, "runs": {}}
    for name, points in curves.items():
        print(f"\n{name}: step  accuracy  M tokens  savings  train s")
        for p in points:
            saved = 100 * (1 - p["tokens"] / base_tokens)
            print(
                f"      {p['step']:>4}  {100 * p['accuracy']:>7.1f}%  {p['tokens']:>8.1f}  {saved:>6.1f}%  {p['train_s']:>7.0f}"
            )
        reached = {f"within_{k}_point": first_reaching(points, base_accuracy, base_tokens, k) for k in (1, 2)}
        for key, point in reached.items():
            text = "never" if point is None else f"step {point['step']} ({point['train_s'] / 60:.1f} min)"
            print(f"   >= {TARGET_SAVINGS:.0f}% savings {key.replace('_', ' ')} of M-alone: {text}")
        summary["runs"][name] = {"evaluations": points, **reached}
    plot(curves, base_tokens, out / "warm_start.png")
    (out / "warm_start.json").write_text(json.dumps(summary, indent=2))
    print(f"\nplot: {out / 'warm_start.png'}")


if __name__ == "__main__":
    main()
