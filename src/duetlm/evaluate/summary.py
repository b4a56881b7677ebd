"""What a run's rows add up to: one summary per (task, method), paired against M-alone on the
questions both answered, and the Pareto front of accuracy against M tokens (pure: no
rendering, no files but the rows read).

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


def file_safe(task: str) -> str:
    """A task name fit for a file name (`jsonl:/data/my.jsonl` -> `jsonl-my`)."""
    if task.startswith("jsonl:"):
        task = "jsonl-" + Path(task.removeprefix("jsonl:")).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def pareto_front(summaries: list[dict]) -> list[dict]:
    """The methods no other one beats on both counts (more accurate with no more M tokens),
    by M tokens: the frontier the figure draws."""
    front, best = [], -1.0
    for s in sorted(summaries, key=lambda s: (s["M_output_tokens_mean"], -s["accuracy"])):
        if s["accuracy"] > best:
            front.append(s)
            best = s["accuracy"]
    return front
