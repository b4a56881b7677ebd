"""Run several methods on the same questions and summarize them side by side.

The summary's columns are the paper's trade-off: accuracy against M's output tokens, with
M-token savings and the accuracy change measured against M-alone on the same questions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from duetlm.protocol import Duet, Problem, SolveResult, parse_mode
from duetlm.usage import savings_pct

Grader = Callable[[SolveResult, str], bool]


def exact_grader(result: SolveResult, gold: str) -> bool:
    return result.answer is not None and result.answer.strip() == gold.strip()


@dataclass
class MethodSummary:
    method: str
    n_questions: int
    accuracy: float
    no_answer_rate: float
    truncated_rate: float
    M_output_tokens_mean: float
    m_output_tokens_mean: float
    savings_pct: float | None
    accuracy_delta: float | None
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_methods(
    duet: Duet,
    problems: Sequence[Problem],
    golds: Sequence[str],
    methods: Sequence[str],
    grader: Grader = exact_grader,
    batch_size: int = 64,
    progress: bool = True,
) -> list[MethodSummary]:
    """Every method on every problem, batched; savings and deltas against M-alone when it is
    among the methods."""
    for method in methods:
        parse_mode(method)  # reject unknown names before any model runs
    collected: dict[str, tuple[list[SolveResult], float]] = {}
    for method in methods:
        started, results = time.perf_counter(), []
        for start in tqdm(
            range(0, len(problems), batch_size), desc=method, disable=not progress, leave=False
        ):
            results += duet.solve_batch(problems[start : start + batch_size], method)
        collected[method] = (results, time.perf_counter() - started)
    summaries = [_summarize(m, r, golds, grader, wall) for m, (r, wall) in collected.items()]
    baseline = next((s for s in summaries if s.method == "M-alone"), None)
    if baseline is not None:
        for summary in summaries:
            summary.savings_pct = savings_pct(summary.M_output_tokens_mean, baseline.M_output_tokens_mean)
            summary.accuracy_delta = summary.accuracy - baseline.accuracy
    return summaries


def _summarize(method: str, results: list[SolveResult], golds: Sequence[str], grader: Grader, wall_s: float):
    n = len(results)
    return MethodSummary(
        method=method,
        n_questions=n,
        accuracy=sum(grader(r, g) for r, g in zip(results, golds, strict=True)) / n,
        no_answer_rate=sum(r.answer is None for r in results) / n,
        truncated_rate=sum(r.truncated for r in results) / n,
        M_output_tokens_mean=sum(r.usage.capable.output_tokens for r in results) / n,
        m_output_tokens_mean=sum(r.usage.light.output_tokens for r in results) / n,
        savings_pct=None,
        accuracy_delta=None,
        wall_s=wall_s,
    )
