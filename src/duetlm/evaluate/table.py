"""The report as a terminal table that fits 80 columns.

Accuracy and its standard error share a cell, as do the accuracy change and its paired
standard error; columns that would hold only dashes (cost when every price is zero, pass@k
with one sample, n when every method has the same) are left out, and what they would say
goes in the caption.
"""

from __future__ import annotations

from rich import box
from rich.table import Table


def _pct(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.{digits}f}" if sign else f"{100 * value:.{digits}f}"


def _with_error(value: float | None, error: float | None, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{_pct(value, sign=sign)}±{_pct(error)}"


def _cost(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value >= 0.01 else f"{value:.0e}"


def _tokens(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _seconds(value: float | None) -> str:
    if value is None:  # a point that was not timed (the probe's oracle)
        return "–"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def summary_table(title: str, summaries: list[dict]) -> Table:
    """One task's summaries (see `duetlm.evaluate.report`) as a compact table."""
    sizes = {(s["n_questions"], s["n_samples"]) for s in summaries}
    show_n = len(sizes) > 1
    show_cost = any(s["cost_per_solved"] for s in summaries)
    show_k = any(s["pass_at_k"] is not None for s in summaries)
    show_fallback = any(s["fallback_rate"] for s in summaries)
    show_open = any(s.get("open_signal_rate") for s in summaries)
    if not show_n:
        n_questions, n_samples = next(iter(sizes))
        title += f": {n_questions} questions" + (f" × {n_samples} samples" if n_samples > 1 else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0))
    columns = [("method", "left")]
    columns += [("n", "right")] if show_n else []
    columns += [("acc %", "right"), ("no ans", "right")]
    columns += [("fb %", "right")] if show_fallback else []
    columns += [("open %", "right")] if show_open else []
    columns += [("M tok", "right"), ("m tok", "right"), ("saved", "right"), ("Δ acc", "right")]
    columns += [("wall", "right")]
    columns += [("$/sol", "right")] if show_cost else []
    columns += [("p@k", "right")] if show_k else []
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name == "method")
    for s in summaries:
        cells = [s["method"]]
        cells += [f"{s['n_questions']}×{s['n_samples']}"] if show_n else []
        cells += [_with_error(s["accuracy"], s["stderr"]), _pct(s["no_answer_rate"])]
        cells += [_pct(s["fallback_rate"])] if show_fallback else []
        cells += [_pct(s.get("open_signal_rate") or 0.0)] if show_open else []
        cells += [_tokens(s["M_output_tokens_mean"]), _tokens(s["m_output_tokens_mean"])]
        cells += ["–" if s["savings_pct"] is None else f"{s['savings_pct']:.1f}"]
        cells += [_with_error(s["accuracy_delta"], s["accuracy_delta_stderr"], sign=True)]
        cells += [_seconds(s["wall_s"])]
        cells += [_cost(s["cost_per_solved"])] if show_cost else []
        cells += [_pct(s["pass_at_k"])] if show_k else []
        table.add_row(*cells)
    notes = [
        "acc, Δ acc: % ± s.e.; saved: % of M tokens; both against M-alone on the questions both answered"
    ]
    unpaired = [
        f"{s['method']} on {s['n_paired']}" for s in summaries if s["n_paired"] not in (0, s["n_questions"])
    ]
    if unpaired:
        notes[0] += f" ({', '.join(unpaired)})"
    if show_fallback:
        notes.append("fb %: answers read without a box (final-answer phrase or last expression)")
    if show_open:
        notes.append("open %: M ended its turn without closing its signal (its whole answer went to m)")
    if show_cost:
        notes.append("$/sol: cost per solved question")
    if show_k:
        notes.append("p@k: pass@k %")
    notes.append("wall: each method's total seconds")
    table.caption = "; ".join(notes)
    return table
