"""The probe's summary, table and figure (see `duetlm.evaluate.probe`).

Keys of a summary (`--format json`): task, n_questions, M_alone_accuracy,
m_alone_accuracy, oracle_accuracy (share of questions where some cut of M's thinking lets m
answer right), no_signal_share (m right from the empty signal), M_alone_tokens_mean (M-alone's
output tokens), thinking_tokens_mean, oracle_tokens_mean (every question at its oracle cut, at
its full thinking where no cut works), oracle_savings_pct (that against M-alone's tokens),
tokens_at_M_alone_accuracy and savings_at_M_alone_accuracy_pct (the fewest M tokens per
question an oracle needs to match M-alone's accuracy: it answers the questions with the
cheapest cuts and hands nothing over on the rest; None when the oracle never gets there),
median_oracle_ratio (oracle cut over full thinking, in tokens, over the questions some cut
answers and with any thinking), m_calls_per_question (the search's m calls), tokens_estimated,
search (binary or linear: the oracle cut is the shortest that works; stable: the shortest from
which every longer cut works, and "some cut works" means the full thinking does).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from rich import box
from rich.table import Table

from duetlm.evaluate.summary import file_safe

PROBE_KEYS = (
    "task",
    "n_questions",
    "M_alone_accuracy",
    "m_alone_accuracy",
    "oracle_accuracy",
    "no_signal_share",
    "M_alone_tokens_mean",
    "thinking_tokens_mean",
    "oracle_tokens_mean",
    "oracle_savings_pct",
    "tokens_at_M_alone_accuracy",
    "savings_at_M_alone_accuracy_pct",
    "median_oracle_ratio",
    "m_calls_per_question",
    "tokens_estimated",
    "search",
)


def is_probe(rows: list[dict]) -> bool:
    return bool(rows) and all(r.get("method") == "probe" for r in rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def oracle_cost(row: dict) -> int:
    """M tokens for a question under the oracle: its cut, or its full thinking where none works."""
    return row["oracle_tokens"] if row["oracle_tokens"] is not None else row["thinking_tokens"]


def summarize_probe(rows: list[dict]) -> dict:
    """One task's probe rows as the summary the module docstring describes."""
    n = len(rows)
    baseline_accuracy = _mean([float(r["capable_correct"]) for r in rows])
    baseline_tokens = _mean([r["capable_output_tokens"] for r in rows])
    working = sorted(r["oracle_tokens"] for r in rows if r["oracle_tokens"] is not None)
    needed = math.ceil(baseline_accuracy * n - 1e-9)
    at_baseline = sum(working[:needed]) / n if needed <= len(working) else None
    oracle_tokens = _mean([oracle_cost(r) for r in rows])
    ratios = [
        r["oracle_tokens"] / r["thinking_tokens"]
        for r in rows
        if r["oracle_tokens"] is not None and r["thinking_tokens"] > 0
    ]

    def saved(tokens: float | None) -> float | None:
        return None if tokens is None or baseline_tokens <= 0 else 100 * (1 - tokens / baseline_tokens)

    return {
        "task": rows[0]["task"],
        "n_questions": n,
        "M_alone_accuracy": baseline_accuracy,
        "m_alone_accuracy": _mean([float(r["light_alone_correct"]) for r in rows]),
        "oracle_accuracy": len(working) / n,
        "no_signal_share": sum(t == 0 for t in working) / n,
        "M_alone_tokens_mean": baseline_tokens,
        "thinking_tokens_mean": _mean([r["thinking_tokens"] for r in rows]),
        "oracle_tokens_mean": oracle_tokens,
        "oracle_savings_pct": saved(oracle_tokens),
        "tokens_at_M_alone_accuracy": at_baseline,
        "savings_at_M_alone_accuracy_pct": saved(at_baseline),
        "median_oracle_ratio": statistics.median(ratios) if ratios else None,
        "m_calls_per_question": _mean([r["light_calls"] for r in rows]),
        "tokens_estimated": any(r.get("tokens_estimated") for r in rows),
        "search": rows[0].get("search", "binary"),
    }


def summarize_tasks(rows: list[dict]) -> list[dict]:
    return [summarize_probe([r for r in rows if r["task"] == t]) for t in sorted({r["task"] for r in rows})]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def probe_lines(s: dict) -> list[tuple[str, str]]:
    """(what, value) lines of one summary, for the terminal and markdown."""
    estimated = " (estimated)" if s["tokens_estimated"] else ""
    oracle = "stable oracle" if s.get("search") == "stable" else "oracle"
    return [
        ("questions", str(s["n_questions"])),
        ("M-alone accuracy", f"{_pct(s['M_alone_accuracy'])}% at {_num(s['M_alone_tokens_mean'])} M tokens"),
        ("m-alone accuracy", f"{_pct(s['m_alone_accuracy'])}%"),
        (f"{oracle} accuracy (some cut works)", f"{_pct(s['oracle_accuracy'])}%"),
        ("no signal needed", f"{_pct(s['no_signal_share'])}% of questions"),
        (f"M thinking{estimated}", f"{_num(s['thinking_tokens_mean'])} tokens"),
        (
            f"{oracle} cut{estimated}",
            f"{_num(s['oracle_tokens_mean'])} tokens ({_num(s['oracle_savings_pct'])}% saved)",
        ),
        (
            f"{oracle} at M-alone's accuracy",
            "not reached"
            if s["tokens_at_M_alone_accuracy"] is None
            else f"{_num(s['tokens_at_M_alone_accuracy'])} tokens ({_num(s['savings_at_M_alone_accuracy_pct'])}% saved)",
        ),
        (f"median {oracle} / full thinking", _num(s["median_oracle_ratio"], 2)),
        ("m calls per question", _num(s["m_calls_per_question"])),
    ]


def probe_table(title: str, summary: dict) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in probe_lines(summary):
        table.add_row(what, value)
    table.caption = (
        "oracle cut: M's own thinking cut at the fewest lines with which m answers right (stable: "
        "and at every longer cut), the full thinking where none works; at M-alone's accuracy: the "
        "cheapest such questions first"
    )
    return table


def probe_markdown(summaries: list[dict]) -> str:
    out = []
    for s in summaries:
        out += [f"### {s['task']} (probe)", "", "| | |", "|---|---|"]
        out += [f"| {what} | {value} |" for what, value in probe_lines(s)]
        out.append("")
    return "\n".join(out)


GROUP_HEADERS = ("{field}", "n", "M-alone", "oracle", "none", "think", "cut", "saved", "ratio")


def probe_group_table(task: str, field: str, groups: list[tuple[object, dict]]) -> Table:
    table = Table(title=f"{task} probe by {field}", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1))
    for header in GROUP_HEADERS:
        table.add_column(header.format(field=field), justify="left" if header == "{field}" else "right")
    for value, s in groups:
        table.add_row(
            str(value),
            str(s["n_questions"]),
            _pct(s["M_alone_accuracy"]),
            _pct(s["oracle_accuracy"]),
            _pct(s["no_signal_share"]),
            _num(s["thinking_tokens_mean"]),
            _num(s["oracle_tokens_mean"]),
            _num(s["oracle_savings_pct"]),
            _num(s["median_oracle_ratio"], 2),
        )
    table.caption = (
        "M-alone, oracle: accuracy %; none: % needing no signal; think, cut: M tokens of the full "
        "thinking and of the oracle cut; saved: % of M-alone's tokens; ratio: median cut / thinking"
    )
    return table


def probe_figure(rows: list[dict], directory: str | Path) -> Path:
    """`probe_TASK.png`: the share of questions answered against the M tokens spent on each,
    for the oracle cut (m answers from the shortest working cut) and for M-alone (M answers
    within that many output tokens); the dotted line is M-alone's accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    task = rows[0]["task"]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    curves = (
        (
            "oracle cut (m answers)",
            sorted(r["oracle_tokens"] for r in rows if r["oracle_tokens"] is not None),
        ),
        ("M-alone", sorted(r["capable_output_tokens"] for r in rows if r["capable_correct"])),
    )
    widest = max([1, *(t for _, tokens in curves for t in tokens)])
    for label, tokens in curves:
        xs = [0, *tokens, widest]
        ys = [0, *(100 * (i + 1) / n for i in range(len(tokens))), 100 * len(tokens) / n]
        axes.step(xs, ys, where="post", label=label)
    axes.axhline(
        100 * _mean([float(r["capable_correct"]) for r in rows]),
        linestyle=":",
        color="gray",
        label="M-alone accuracy",
    )
    axes.set_xlim(0, widest * 1.03)
    axes.set_ylim(0, 103)
    axes.set_xlabel("M output tokens spent on the question")
    axes.set_ylabel("questions answered (%)")
    axes.set_title(f"{task}: what m needs of M's thinking ({n} questions)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=9)
    figure.tight_layout()
    path = Path(directory) / f"probe_{file_safe(task)}.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
