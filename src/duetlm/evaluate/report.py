"""`duet report`: a run's summaries (`duetlm.evaluate.summary`) as markdown, JSON and a plot of
accuracy against M tokens per task."""

from __future__ import annotations

from pathlib import Path

from duetlm.evaluate.summary import (
    BASELINE,
    REPORT_KEYS,
    file_safe,
    load_summaries,
    pareto_front,
    pass_at_k,
    per_question,
    results_rows,
    summarize,
)

__all__ = [
    "BASELINE",
    "REPORT_KEYS",
    "file_safe",
    "json_rows",
    "label_points",
    "load_summaries",
    "markdown",
    "pareto_front",
    "pass_at_k",
    "per_question",
    "plot",
    "results_rows",
    "summarize",
    "task_figure",
]


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
