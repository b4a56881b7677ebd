"""`duet report`: one table per task from a results store, plus a plot per task.

Keys of every summary (`--format json`; scripts rely on them): task, method, n_questions,
n_samples, accuracy, stderr (over questions, each question's mean over its samples),
no_answer_rate, fallback_rate (answers read by a fallback rule: an unboxed final-answer
phrase or the last expression), open_signal_rate (M ended its turn without closing its
signal, so its whole answer went to m: `duetlm.signals`), M_output_tokens_mean, m_output_tokens_mean, and, against
M-alone **on the questions both have** (paired): n_paired, savings_pct (M output tokens),
accuracy_delta and accuracy_delta_stderr (the standard error of the per-question
difference). Then wall_s (the method's total wall time; rows of a batch share the batch's
time equally, so a row's own `wall_s` is a share, not a latency), cost_per_solved and
pass_at_k (None with one sample).
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from math import comb
from pathlib import Path

from duetlm.errors import InputError
from duetlm.evaluate.store import read_rows
from duetlm.grading import FALLBACK_RULES

logger = logging.getLogger(__name__)

BASELINE = "M-alone"

REPORT_KEYS = (
    "task",
    "method",
    "n_questions",
    "n_samples",
    "accuracy",
    "stderr",
    "no_answer_rate",
    "fallback_rate",
    "open_signal_rate",
    "M_output_tokens_mean",
    "m_output_tokens_mean",
    "n_paired",
    "savings_pct",
    "accuracy_delta",
    "accuracy_delta_stderr",
    "wall_s",
    "cost_per_solved",
    "pass_at_k",
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def per_question(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Each question's accuracy and M tokens, averaged over its samples."""
    by_id: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_id[str(row["id"])].append(row)
    return {
        qid: {
            "accuracy": _mean([float(r["correct"]) for r in rs]),
            "capable_tokens": _mean([r["usage"]["capable"]["output_tokens"] for r in rs]),
            "samples": len(rs),
            "correct": sum(r["correct"] for r in rs),
        }
        for qid, rs in by_id.items()
    }


def paired(method: dict[str, dict], baseline: dict[str, dict]) -> dict:
    """Savings and accuracy change against the baseline over the questions both answered."""
    common = sorted(set(method) & set(baseline))
    if not common:
        return {"n_paired": 0, "savings_pct": None, "accuracy_delta": None, "accuracy_delta_stderr": None}
    base_tokens = _mean([baseline[q]["capable_tokens"] for q in common])
    tokens = _mean([method[q]["capable_tokens"] for q in common])
    differences = [method[q]["accuracy"] - baseline[q]["accuracy"] for q in common]
    return {
        "n_paired": len(common),
        "savings_pct": 100 * (1 - tokens / base_tokens) if base_tokens > 0 else None,
        "accuracy_delta": _mean(differences),
        "accuracy_delta_stderr": _stderr(differences),
    }


def summarize(rows: list[dict], baseline_rows: list[dict] | None = None) -> list[dict]:
    """One summary per (task, method). The reference for savings is the task's M-alone rows,
    or, where the run has none, the M-alone rows of `baseline_rows` (another run's)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["method"])].append(row)
    references = {}
    for row in baseline_rows or []:
        if row["method"] == BASELINE:
            references.setdefault(row["task"], []).append(row)
    references |= {task: members for (task, method), members in groups.items() if method == BASELINE}
    reference_stats = {task: per_question(members) for task, members in references.items()}
    summaries = []
    for (task, method), members in groups.items():
        questions = per_question(members)
        accuracies = [q["accuracy"] for q in questions.values()]
        solved = sum(r["correct"] for r in members)
        samples = max(q["samples"] for q in questions.values())
        answered = [r for r in members if not r["no_answer"]]
        summary = {
            "task": task,
            "method": method,
            "n_questions": len(questions),
            "n_samples": samples,
            "accuracy": _mean(accuracies),
            "stderr": _stderr(accuracies),
            "no_answer_rate": 1 - len(answered) / len(members),
            "fallback_rate": sum(r.get("answer_rule") in FALLBACK_RULES for r in answered) / len(members),
            "open_signal_rate": sum(bool(r.get("open_signal")) for r in members) / len(members),
            "M_output_tokens_mean": _mean([r["usage"]["capable"]["output_tokens"] for r in members]),
            "m_output_tokens_mean": _mean([r["usage"]["light"]["output_tokens"] for r in members]),
            **paired(questions, reference_stats.get(task, {})),
            "wall_s": sum(r["wall_s"] for r in members),
            "cost_per_solved": sum(r["usage"]["cost"] for r in members) / solved if solved else None,
            "pass_at_k": (
                _mean([pass_at_k(q["samples"], q["correct"], samples) for q in questions.values()])
                if samples > 1
                else None
            ),
        }
        summaries.append({key: summary[key] for key in REPORT_KEYS})
    return sorted(summaries, key=lambda s: (s["task"], s["M_output_tokens_mean"]))


def results_rows(directory: str | Path) -> list[dict]:
    path = Path(directory) / "results.jsonl"
    if not path.is_file():
        below = sorted(str(p.parent) for p in Path(directory).glob("**/results.jsonl"))
        if below:  # a folder above run folders: name them
            raise InputError(
                f"{directory} is not a run folder, but holds {len(below)}: {', '.join(below)}; "
                f"report one of them (duet report {below[0]})"
            )
        raise InputError(f"{directory} has no results.jsonl; run `duet eval --out {directory}` first")
    rows = read_rows(path)
    if not rows:
        raise InputError(f"{path} holds no results yet")
    return rows


def load_summaries(directory: str | Path, baseline: str | Path | None = None) -> list[dict]:
    """Summaries of a run folder; `baseline`: another run folder whose M-alone rows are the
    reference where this run has none (same task names and question ids)."""
    return summarize(results_rows(directory), results_rows(baseline) if baseline is not None else None)


def json_rows(summaries: list[dict]) -> list[dict]:
    return [{key: s[key] for key in REPORT_KEYS} for s in summaries]


def _fmt(value, pct: bool = False, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "–"
    shown = 100 * value if pct else value
    return f"{shown:+.{digits}f}" if sign else f"{shown:.{digits}f}"


def markdown(summaries: list[dict]) -> str:
    out = []
    for task in sorted({s["task"] for s in summaries}):
        rows = [s for s in summaries if s["task"] == task]
        with_k = any(s["pass_at_k"] is not None for s in rows)
        head = (
            "| method | n | acc % | ± s.e. | no answer % | fallback % | M out tok | m out tok | paired n "
            "| M savings % | Δ acc | ± s.e. | wall s | cost/solved |"
        )
        head += " pass@k % |" if with_k else ""
        out += [f"### {task}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for s in rows:
            line = (
                f"| {s['method']} | {s['n_questions']}×{s['n_samples']} | {_fmt(s['accuracy'], True)} | "
                f"{_fmt(s['stderr'], True)} | {_fmt(s['no_answer_rate'], True)} | "
                f"{_fmt(s['fallback_rate'], True)} | {_fmt(s['M_output_tokens_mean'])} | "
                f"{_fmt(s['m_output_tokens_mean'])} | {s['n_paired']} | {_fmt(s['savings_pct'])} | "
                f"{_fmt(s['accuracy_delta'], True, sign=True)} | {_fmt(s['accuracy_delta_stderr'], True)} | "
                f"{_fmt(s['wall_s'])} | {_fmt(s['cost_per_solved'], digits=6)} |"
            )
            line += f" {_fmt(s['pass_at_k'], True)} |" if with_k else ""
            out.append(line)
        out.append("")
    out.append(
        "Savings and Δ acc are against M-alone on the questions both methods answered (paired n); "
        "wall s is each method's total time, batches split evenly over their rows."
    )
    return "\n".join(out)


def file_safe(task: str) -> str:
    """A task name fit for a file name (`jsonl:/data/my.jsonl` -> `jsonl-my`)."""
    if task.startswith("jsonl:"):
        task = "jsonl-" + Path(task.removeprefix("jsonl:")).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def plot(summaries: list[dict], directory: str | Path) -> list[Path]:
    """A PNG per task: accuracy against mean M output tokens, one point per method. Needs
    matplotlib (`pip install 'duetlm[eval]'`); without it, an ImportError the CLI reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in sorted({s["task"] for s in summaries}):
        figure = task_figure(task, [s for s in summaries if s["task"] == task])
        path = Path(directory) / f"plot_{file_safe(task)}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def task_figure(task: str, rows: list[dict]):
    """One task's accuracy against M tokens, with room above and to the right of the points for
    their labels (a method at 100% would otherwise be labelled on the frame)."""
    import matplotlib.pyplot as plt

    from duetlm.evaluate.compose import pareto_front

    figure, axes = plt.subplots(figsize=(6, 4.2))
    front = pareto_front(rows)
    if len(front) > 1:
        axes.step(
            [s["M_output_tokens_mean"] for s in front],
            [100 * s["accuracy"] for s in front],
            where="post",
            color="0.6",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
        axes.legend(loc="lower right", fontsize=8)
    for s in rows:
        axes.errorbar(
            s["M_output_tokens_mean"], 100 * s["accuracy"], yerr=100 * s["stderr"], fmt="o", capsize=3
        )
    highest = max(100 * (s["accuracy"] + s["stderr"]) for s in rows)
    lowest = min(100 * (s["accuracy"] - s["stderr"]) for s in rows)
    axes.set_ylim(max(lowest - 5, -2), highest + 9)
    axes.set_yticks([t for t in axes.get_yticks() if 0 <= t <= 100])
    widest = max(s["M_output_tokens_mean"] for s in rows)
    axes.set_xlim(-0.04 * max(widest, 1), 1.22 * max(widest, 1))
    axes.set_xlabel("mean M output tokens per question")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{task}: accuracy vs M tokens")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    label_points(figure, axes, [(s["method"], s["M_output_tokens_mean"], 100 * s["accuracy"]) for s in rows])
    return figure


LABEL_OFFSETS = [
    (5, 5),
    (5, -13),
    (-5, 5),
    (-5, -13),
    *((dx, dy) for dy in (-25, 17, -37, 29, -49, -61, -73) for dx in (10, -10)),
]
"""Where a label may sit around its point, in points, nearest first (a negative x means the
label ends at the point)."""


def label_points(figure, axes, points: list[tuple[str, float, float]]) -> None:
    """Label each point at the first offset where its text stays inside the axes and overlaps
    no label already placed and no other point: methods at one accuracy (a cluster near
    M-alone's) stay readable. A label with no free place takes the first offset."""
    from matplotlib.text import Text

    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    dots = [tuple(axes.transData.transform((x, y))) for _, x, y in points]

    def place(label: str, x: float, y: float, dx: float, dy: float):
        moved = abs(dy) > 13  # a label moved away from its point keeps a thin line to it
        text = axes.annotate(
            label,
            (x, y),
            textcoords="offset points",
            xytext=(dx, dy),
            fontsize=9,
            ha="left" if dx >= 0 else "right",
            va="center" if moved else "baseline",
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if moved else None,
        )
        text.update_positions(renderer)
        return text, Text.get_window_extent(text, renderer).expanded(1.02, 1.1)  # the words, not the line

    placed = []
    for label, x, y in sorted(points, key=lambda p: (p[1], -p[2])):
        mine = tuple(axes.transData.transform((x, y)))
        for dx, dy in LABEL_OFFSETS:
            text, box = place(label, x, y, dx, dy)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (
                inside
                and not any(box.overlaps(other) for other in placed)
                and not any(box.contains(*dot) for dot in dots if dot != mine)
            ):
                break
            text.remove()
        else:
            text, box = place(label, x, y, *LABEL_OFFSETS[0])
        placed.append(box)
