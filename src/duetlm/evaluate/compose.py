"""One report from several run folders (`duet report DIR --add LABEL=OTHER`).

Methods that cannot share a run folder still belong in one table and one figure: a trained
pair is another `--capable/--light`, and the probe's oracle is not a method at all but the
bound a stopping rule is measured against. An added eval run's rows join the main run's under
the label (its method names after it when it holds several), so their savings are paired
against the main run's M-alone on the same question ids. An added probe run becomes one
point: the oracle's accuracy (some cut lets m answer right) at its mean M tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from duetlm.errors import InputError
from duetlm.evaluate.probe_report import summarize_tasks
from duetlm.evaluate.summary import REPORT_KEYS, results_rows, summarize


def is_probe_folder(directory: Path) -> bool:
    try:
        return json.loads((directory / "run.json").read_text(encoding="utf-8")).get("kind") == "probe"
    except (OSError, ValueError):
        return False


def relabelled(rows: list[dict], label: str) -> list[dict]:
    """An added run's rows under its label: `LABEL`, or `LABEL METHOD` when it ran several."""
    methods = {row["method"] for row in rows}
    name = (lambda m: label) if len(methods) == 1 else (lambda m: f"{label} {m}")
    return [row | {"method": name(row["method"])} for row in rows]


def oracle_point(summary: dict, label: str) -> dict:
    """The probe's oracle as a report row: accuracy and M tokens, nothing it did not measure."""
    p, n = summary["oracle_accuracy"], summary["n_questions"]
    row = dict.fromkeys(REPORT_KEYS)
    return row | {
        "task": summary["task"],
        "method": label,
        "n_questions": n,
        "n_samples": 1,
        "accuracy": p,
        "stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0,
        "no_answer_rate": 0.0,
        "fallback_rate": 0.0,
        "M_output_tokens_mean": summary["oracle_tokens_mean"],
        "n_paired": 0,
        "savings_pct": summary["oracle_savings_pct"],
    }


def composed_summaries(directory: Path, added: dict[str, str], baseline: Path | None = None) -> list[dict]:
    """The main run's summaries with every added run's methods (or oracle) beside them."""
    rows = results_rows(directory)
    points = []
    for label, other in added.items():
        folder = Path(other)
        if is_probe_folder(folder):
            points += [oracle_point(s, label) for s in summarize_tasks(results_rows(folder))]
            continue
        taken = {row["method"] for row in rows}
        extra = relabelled(results_rows(folder), label)
        clash = taken & {row["method"] for row in extra}
        if clash:
            raise InputError(f"--add {label}={other}: method {sorted(clash)[0]!r} is in the main run already")
        rows += extra
    summaries = summarize(rows, results_rows(baseline) if baseline is not None else None) + points
    return sorted(summaries, key=lambda s: (s["task"], s["M_output_tokens_mean"]))
