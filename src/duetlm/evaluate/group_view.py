"""The per-group report (`duet report --by FIELD`) as a terminal table, markdown and a figure."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

from duetlm.evaluate.report import BASELINE, file_safe

GROUP_KEYS = (
    "field",
    "value",
    "method",
    "n_questions",
    "accuracy",
    "stderr",
    "M_output_tokens_mean",
    "savings_pct",
    "accuracy_delta",
    "accuracy_delta_stderr",
    "n_paired",
)


def _pct(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def _cells(s: dict) -> list[str]:
    return [
        str(s["value"]),
        s["method"],
        str(s["n_questions"]),
        f"{_pct(s['accuracy'])}±{_pct(s['stderr'])}",
        f"{s['M_output_tokens_mean']:.0f}",
        "–" if s["savings_pct"] is None else f"{s['savings_pct']:.1f}",
        "–"
        if s["accuracy_delta"] is None
        else f"{_pct(s['accuracy_delta'], True)}±{_pct(s['accuracy_delta_stderr'])}",
    ]


HEADERS = ("{field}", "method", "n", "acc %", "M tok", "saved", "Δ acc")


def group_table(task: str, summaries: list[dict]) -> Table:
    field = summaries[0]["field"]
    table = Table(title=f"{task} by {field}", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1))
    for header in HEADERS:
        table.add_column(
            header.format(field=field), justify="left" if header in ("{field}", "method") else "right"
        )
    previous = None
    for s in summaries:
        cells = _cells(s)
        if s["value"] == previous:
            cells[0] = ""
        previous = s["value"]
        table.add_row(*cells)
    table.caption = (
        "acc, Δ acc: % ± s.e.; saved: % of M tokens; both against M-alone on the same group's questions"
    )
    return table


def group_markdown(summaries: list[dict]) -> str:
    out = []
    for task in sorted({s["task"] for s in summaries}):
        rows = [s for s in summaries if s["task"] == task]
        field = rows[0]["field"]
        out += [
            f"### {task} by {field}",
            "",
            "| " + " | ".join(h.format(field=field) for h in HEADERS) + " |",
        ]
        out.append("|" + "---|" * len(HEADERS))
        out += ["| " + " | ".join(_cells(s)) + " |" for s in rows]
        out.append("")
    out.append("Savings and Δ acc are against M-alone on the questions of the same group.")
    return "\n".join(out)


def group_json(summaries: list[dict]) -> list[dict]:
    return [{"task": s["task"], **{k: s[k] for k in GROUP_KEYS}} for s in summaries]


def group_plot(summaries: list[dict], directory: str | Path) -> list[Path]:
    """A PNG per task, `by_FIELD_TASK.png`: accuracy per group for each method (left) and M
    tokens per group (right), so where savings come from reads off one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in sorted({s["task"] for s in summaries}):
        rows = [s for s in summaries if s["task"] == task]
        field = rows[0]["field"]
        values = list(dict.fromkeys(s["value"] for s in rows))
        positions = {v: i for i, v in enumerate(values)}
        methods = list(dict.fromkeys(s["method"] for s in rows))
        methods.sort(key=lambda m: (m != BASELINE, m))
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for method in methods:
            mine = [s for s in rows if s["method"] == method]
            xs = [positions[s["value"]] for s in mine]
            left.errorbar(
                xs,
                [100 * s["accuracy"] for s in mine],
                yerr=[100 * s["stderr"] for s in mine],
                marker="o",
                capsize=3,
                label=method,
            )
            right.plot(xs, [s["M_output_tokens_mean"] for s in mine], marker="o", label=method)
        for axes, label in ((left, "accuracy (%)"), (right, "mean M output tokens")):
            axes.set_xticks(
                range(len(values)), [str(v) for v in values], rotation=30 if len(values) > 6 else 0
            )
            axes.set_xlabel(field)
            axes.set_ylabel(label)
            axes.grid(alpha=0.3)
        left.set_ylim(-2, 105)
        right.legend(fontsize=8)
        figure.suptitle(f"{task} by {field}")
        figure.tight_layout()
        path = Path(directory) / f"by_{file_safe(field)}_{file_safe(task)}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths
