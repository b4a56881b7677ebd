"""`duet report`: one table per task from a results store, plus a plot per task.

Columns (the JSON keys scripts depend on): task, method, n_questions, n_samples, accuracy,
stderr, no_answer_rate, M_output_tokens_mean, m_output_tokens_mean, savings_pct,
accuracy_delta, wall_s, cost_per_solved. Savings and deltas are against M-alone on the same
questions of the same task; `stderr` is over questions (each question's mean over samples).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from math import comb
from pathlib import Path

from duetlm.errors import InputError
from duetlm.evaluate.store import read_rows

REPORT_KEYS = (
    "task",
    "method",
    "n_questions",
    "n_samples",
    "accuracy",
    "stderr",
    "no_answer_rate",
    "M_output_tokens_mean",
    "m_output_tokens_mean",
    "savings_pct",
    "accuracy_delta",
    "wall_s",
    "cost_per_solved",
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["method"])].append(row)
    summaries = []
    for (task, method), members in groups.items():
        by_question: dict[str, list[dict]] = defaultdict(list)
        for row in members:
            by_question[str(row["id"])].append(row)
        per_question = [sum(r["correct"] for r in rs) / len(rs) for rs in by_question.values()]
        n_q = len(per_question)
        accuracy = sum(per_question) / n_q
        variance = sum((a - accuracy) ** 2 for a in per_question) / (n_q - 1) if n_q > 1 else 0.0
        solved = sum(r["correct"] for r in members)
        cost = sum(r["usage"]["cost"] for r in members)
        samples = max(len(rs) for rs in by_question.values())
        summary = {
            "task": task,
            "method": method,
            "n_questions": n_q,
            "n_samples": samples,
            "accuracy": accuracy,
            "stderr": math.sqrt(variance / n_q),
            "no_answer_rate": sum(r["no_answer"] for r in members) / len(members),
            "M_output_tokens_mean": sum(r["usage"]["capable"]["output_tokens"] for r in members)
            / len(members),
            "m_output_tokens_mean": sum(r["usage"]["light"]["output_tokens"] for r in members) / len(members),
            "savings_pct": None,
            "accuracy_delta": None,
            "wall_s": sum(r["wall_s"] for r in members),
            "cost_per_solved": cost / solved if solved else None,
        }
        if samples > 1:
            summary["pass_at_k"] = (
                sum(pass_at_k(len(rs), sum(r["correct"] for r in rs), samples) for rs in by_question.values())
                / n_q
            )
        summaries.append(summary)
    for summary in summaries:
        baseline = next(
            (s for s in summaries if s["task"] == summary["task"] and s["method"] == "M-alone"), None
        )
        if baseline is not None and baseline["M_output_tokens_mean"] > 0:
            summary["savings_pct"] = 100 * (
                1 - summary["M_output_tokens_mean"] / baseline["M_output_tokens_mean"]
            )
            summary["accuracy_delta"] = summary["accuracy"] - baseline["accuracy"]
    return sorted(summaries, key=lambda s: (s["task"], s["M_output_tokens_mean"]))


def load_summaries(directory: str | Path) -> list[dict]:
    path = Path(directory) / "results.jsonl"
    if not path.is_file():
        raise InputError(f"{directory} has no results.jsonl; run `duet eval --out {directory}` first")
    rows = read_rows(path)
    if not rows:
        raise InputError(f"{path} holds no results yet")
    return summarize(rows)


def json_rows(summaries: list[dict]) -> list[dict]:
    return [{key: s[key] for key in REPORT_KEYS} for s in summaries]


def _fmt(value, pct: bool = False, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.{digits}f}" if pct else f"{value:.{digits}f}"


def markdown(summaries: list[dict]) -> str:
    out = []
    for task in sorted({s["task"] for s in summaries}):
        rows = [s for s in summaries if s["task"] == task]
        with_k = any("pass_at_k" in s for s in rows)
        head = "| method | n | acc % | ± s.e. | no answer % | M out tok | m out tok | M savings % | Δ acc | wall s | cost/solved |"
        head += " pass@k % |" if with_k else ""
        out += [f"### {task}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for s in rows:
            line = (
                f"| {s['method']} | {s['n_questions']}×{s['n_samples']} | {_fmt(s['accuracy'], True)} | "
                f"{_fmt(s['stderr'], True)} | {_fmt(s['no_answer_rate'], True)} | {_fmt(s['M_output_tokens_mean'])} | "
                f"{_fmt(s['m_output_tokens_mean'])} | {_fmt(s['savings_pct'])} | {_fmt(s['accuracy_delta'], True)} | "
                f"{_fmt(s['wall_s'])} | {_fmt(s['cost_per_solved'], digits=6)} |"
            )
            line += f" {_fmt(s.get('pass_at_k'), True)} |" if with_k else ""
            out.append(line)
        out.append("")
    return "\n".join(out)


def file_safe(task: str) -> str:
    """A task name fit for a file name (`jsonl:/data/my.jsonl` -> `jsonl-my`)."""
    if task.startswith("jsonl:"):
        task = "jsonl-" + Path(task.removeprefix("jsonl:")).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def plot(summaries: list[dict], directory: str | Path) -> list[Path]:
    """A PNG per task: accuracy against mean M output tokens, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in sorted({s["task"] for s in summaries}):
        rows = [s for s in summaries if s["task"] == task]
        figure, axes = plt.subplots(figsize=(6, 4.2))
        for s in rows:
            axes.errorbar(
                s["M_output_tokens_mean"], 100 * s["accuracy"], yerr=100 * s["stderr"], fmt="o", capsize=3
            )
            axes.annotate(
                s["method"],
                (s["M_output_tokens_mean"], 100 * s["accuracy"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=9,
            )
        axes.set_xlabel("mean M output tokens per question")
        axes.set_ylabel("accuracy (%)")
        axes.set_title(f"{task}: accuracy vs M tokens")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        path = Path(directory) / f"plot_{file_safe(task)}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths
