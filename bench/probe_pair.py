"""The probe on the embedded pair, against the builtin task's ground truth.

    python bench/probe_pair.py                 # 200 test questions
    python bench/probe_pair.py --questions 500

1. `duet probe` of the base pair (tiny-M + tiny-m) and of the jointly trained pair (duet-M +
   duet-m), with the time each takes;
2. trained DUET (duet-M + duet-m, greedy) on the same questions, for the signal it sends;
3. per number of steps: the task's floor (the essential trace minus the steps m finishes
   reliably, in M tokens), both probes' oracle cuts and full thinking, and trained DUET's
   signal; and trained DUET's signal on the questions where its probe found that m needs
   nothing, against the others.
Prints the tables and writes `probe_steps.png` (the docs' figure). The embedded pair is a
small model pair trained on a synthetic task: these are not results on real LLMs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from duetlm.backends import BackendOptions, load_backend
from duetlm.config import DuetConfig
from duetlm.evaluate import EvalConfig, run_eval
from duetlm.evaluate.probe import ProbeConfig, run_probe
from duetlm.evaluate.probe_report import summarize_probe
from duetlm.evaluate.store import read_rows
from duetlm.models import EMBEDDED_BUDGETS
from duetlm.tasks import builtin

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_duet import light_finishes

PAIRS = {"base": ("tiny-M", "tiny-m"), "trained": ("duet-M", "duet-m")}


def mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else float("nan")


def plot(table: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(table)
    figure, axes = plt.subplots(figsize=(7, 4.4))
    lines = (
        ("base M's full thinking", "base_thinking", ":"),
        ("oracle cut of base M's thinking", "base_oracle", "-"),
        ("oracle cut of trained M's thinking", "trained_oracle", "-"),
        ("trained DUET's signal", "trained_signal", "--"),
        ("task floor", "floor", "-."),
    )
    for label, key, style in lines:
        axes.plot(steps, [table[s][key] for s in steps], style, marker="o", label=label)
    axes.set_xlabel("steps in the question")
    axes.set_ylabel("M tokens per question")
    axes.set_title("What m needs of M's thinking, by difficulty (embedded pair, toy task)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-probe")
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    budgets = DuetConfig(**EMBEDDED_BUDGETS)
    rows, seconds = {}, {}
    for name, (capable, light) in PAIRS.items():
        started = time.perf_counter()
        path = run_probe(
            ProbeConfig(task="builtin", capable=capable, light=light, limit=args.questions, batch_size=64),
            out / f"probe-{name}",
            force=True,
            progress=False,
        )
        seconds[name] = time.perf_counter() - started
        rows[name] = {r["id"]: r for r in read_rows(path)}
    duet_run = run_eval(
        EvalConfig(
            tasks=["builtin"],
            methods=["duet"],
            capable="duet-M",
            light="duet-m",
            limit=args.questions,
            batch_size=128,
            duet=budgets,
        ),
        out / "trained-duet",
        force=True,
        backend_options=BackendOptions(device="cpu", batch_size=128),
        progress=False,
    )
    duet_rows = {r["id"]: r for r in read_rows(duet_run)}
    problems = builtin.generate(args.questions)
    finished = light_finishes("tiny-m", problems)
    count = load_backend("tiny-M", BackendOptions(device="cpu")).count_tokens
    by_steps: dict[int, list] = defaultdict(list)
    for p in problems:
        by_steps[len(p.ops)].append(p)

    def oracle(name: str, qid: str) -> float:
        row = rows[name][qid]
        return row["oracle_tokens"] if row["oracle_tokens"] is not None else row["thinking_tokens"]

    table = {}
    for steps, group in sorted(by_steps.items()):
        ids = [p.id for p in group]
        table[steps] = {
            "n": len(group),
            "floor": mean(builtin.floor_tokens(p, count, finished) for p in group),
            "base_thinking": mean(rows["base"][q]["thinking_tokens"] for q in ids),
            "base_oracle": mean(oracle("base", q) for q in ids),
            "trained_oracle": mean(oracle("trained", q) for q in ids),
            "trained_signal": mean(duet_rows[q]["signal_tokens"] for q in ids),
            "trained_accuracy": mean(float(duet_rows[q]["correct"]) for q in ids),
        }
    print(f"builtin task, {args.questions} test questions, greedy (a toy pair; not real-LLM results)")
    print(f"m finishes {finished} step(s) reliably; floor = essential trace minus those, in M tokens")
    for name, (capable, light) in PAIRS.items():
        s = summarize_probe(list(rows[name].values()))
        print(
            f"probe {capable} + {light}: {seconds[name]:.0f} s; M-alone {100 * s['M_alone_accuracy']:.1f}% at "
            f"{s['M_alone_tokens_mean']:.1f} tokens; oracle {100 * s['oracle_accuracy']:.1f}% at "
            f"{s['oracle_tokens_mean']:.1f} tokens (thinking {s['thinking_tokens_mean']:.1f}); no signal needed "
            f"{100 * s['no_signal_share']:.1f}%; median ratio {s['median_oracle_ratio']:.2f}; "
            f"m calls {s['m_calls_per_question']:.1f}"
        )
    floor_all = mean(builtin.floor_tokens(p, count, finished) for p in problems)
    print(
        f"floor over all questions: {floor_all:.1f}; trained DUET signal "
        f"{mean(r['signal_tokens'] for r in duet_rows.values()):.1f} at "
        f"{100 * mean(float(r['correct']) for r in duet_rows.values()):.1f}%"
    )
    print("steps    n  floor  base think  base oracle  trained oracle  trained signal  trained acc")
    for steps, t in table.items():
        print(
            f"{steps:>5} {t['n']:>4} {t['floor']:>6.1f} {t['base_thinking']:>11.1f} {t['base_oracle']:>12.1f} "
            f"{t['trained_oracle']:>15.1f} {t['trained_signal']:>15.1f} {100 * t['trained_accuracy']:>11.1f}%"
        )
    needless = [q for q, r in rows["trained"].items() if r["oracle_lines"] == 0]
    needed = [q for q in rows["trained"] if q not in needless]
    print(
        f"trained DUET's signal where its probe says m needs nothing ({len(needless)} questions): "
        f"{mean(duet_rows[q]['signal_tokens'] for q in needless):.1f} tokens; elsewhere ({len(needed)}): "
        f"{mean(duet_rows[q]['signal_tokens'] for q in needed):.1f}"
    )
    plot(table, out / "probe_steps.png")
    (out / "probe_pair.json").write_text(
        json.dumps({"seconds": seconds, "light_finishes": finished, "by_steps": table}, indent=2)
    )
    print(f"plot: {out / 'probe_steps.png'}")


if __name__ == "__main__":
    main()
