"""Tables and figures the commands print: usage per model, a run's report, plots."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from duetlm.cli.app import console, err_console
from duetlm.usage import Usage, savings_pct

EMBEDDED_NOTE = (
    "[dim]The embedded models (tiny-M, tiny-m, duet-M, duet-m) are small models trained on a synthetic "
    "task; their numbers are not results on real LLMs.[/]"
)


def usage_table(title: str, usage: Usage, n: int, baseline: Usage | None = None) -> Table:
    """Tokens and time per model; the cost column only when prices are set (a cost of 0 would
    read as a measurement)."""
    priced = usage.cost > 0 or (baseline is not None and baseline.cost > 0)
    table = Table(title=title)
    columns = ("model", "prompt tok", "output tok", "time s") + (("cost",) if priced else ())
    for column in columns:
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, part in (("M (capable)", usage.capable), ("m (light)", usage.light)):
        cells = [name, str(part.prompt_tokens), str(part.output_tokens), f"{part.wall_s:.2f}"]
        table.add_row(*cells, *([f"{part.cost:.6f}"] if priced else []))
    total = ["total", "", str(usage.capable.output_tokens + usage.light.output_tokens), f"{usage.wall_s:.2f}"]
    table.add_row(*total, *([f"{usage.cost:.6f}"] if priced else []), style="bold")
    table.caption = None if priced else "no prices set (capable_price / light_price in --config)"
    if baseline is not None:
        saved = savings_pct(usage.capable.output_tokens, baseline.capable.output_tokens)
        compared = (
            f"M-alone on the same {n} question(s): {baseline.capable.output_tokens} M output tokens; "
            f"M-token savings: {'n/a' if saved is None else f'{saved:.1f}%'}"
        )
        table.caption = compared if table.caption is None else f"{compared}\n{table.caption}"
    return table


def print_report(directory: Path, summaries: list[dict], baseline: Path | None = None) -> None:
    from duetlm.evaluate.table import summary_table

    for task in sorted({s["task"] for s in summaries}):
        table = summary_table(f"{task} ({directory})", [s for s in summaries if s["task"] == task])
        if baseline is not None:
            table.caption += f"; M-alone of {baseline}"
        console.print(table)
    if any(s["task"] == "builtin" for s in summaries):
        console.print(EMBEDDED_NOTE)


def write_plots(draw) -> None:
    """Draw a report's figures and name them; without matplotlib, say the plot was skipped."""
    try:
        paths = draw()
    except ImportError:
        err_console.print("plot skipped: matplotlib is not installed (pip install 'duetlm\\[eval]')")
        return
    for path in paths:
        err_console.print(f"plot: {path}")
