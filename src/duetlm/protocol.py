"""The DUET protocol's facade (arXiv 2605.01111; docs/design.md section 1): `Duet` holds the
capable model M, the light model m and the `DuetConfig`, and answers questions by any
registered method (`duetlm.methods`): `duet` (M writes the signal, m answers from it), the
baselines (M-alone, m-alone, duet@B, M@B) and the settle modes, all by one code path per
method. It knows no backend class and no method by name.

The pieces it is built from live apart and are re-exported here: what a question and its
result are (`duetlm.problems`), the requests each stage sends (`duetlm.requests`), where a
signal ends (`duetlm.signals`) and how results are assembled (`duetlm.results`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from duetlm.backends.base import Backend, GenerationResult
from duetlm.config import DuetConfig
from duetlm.methods import Mode, method_for, parse_mode
from duetlm.problems import Problem, SolveResult, as_problem
from duetlm.requests import (
    alone_request,
    capable_request,
    forced_request,
    light_request,
    sampling,
    signal_of,
    user_prompt,
)
from duetlm.results import alone_result, two_stage_result, usage_of
from duetlm.streaming import Event, Finished

logger = logging.getLogger(__name__)

__all__ = [
    "Duet",
    "Mode",
    "Problem",
    "SolveResult",
    "alone_request",
    "alone_result",
    "as_problem",
    "capable_request",
    "forced_request",
    "light_request",
    "parse_mode",
    "sampling",
    "signal_of",
    "two_stage_result",
    "usage_of",
    "user_prompt",
]


class Duet:
    """A capable model M and a light model m answering together.

    >>> duet = Duet(load_backend("hf:Qwen/Qwen3-8B"), load_backend("hf:Qwen/Qwen3-0.6B"))
    >>> duet.solve("What is 17 * 23?").answer
    '391'
    """

    def __init__(self, capable: Backend, light: Backend, config: DuetConfig | None = None) -> None:
        self.capable = capable
        self.light = light
        self.config = config or DuetConfig()
        self._told_empty = self._told_open = False

    def close(self) -> None:
        """Release both models (a llama.cpp server, an engine process); the Duet is unusable after."""
        self.capable.close()
        if self.light is not self.capable:
            self.light.close()

    def note_empty_signals(self, results: Sequence[SolveResult]) -> None:
        """Say once per Duet when M hands m an empty signal (a base model, or one served so that
        it ends its turn at once, silently turns DUET into m-alone), and once when M ends its
        turn without closing its signal (a model without think tags in the think style hands
        over its whole answer: nothing is saved, and m may only copy M's answer)."""
        opened = sum(r.open_signal for r in results)
        if opened and not self._told_open:
            self._told_open = True
            style = self.config.signal_style
            where = (
                f"its thinking ({self.config.prompts.think_close!r})"
                if style == "think"
                else f"its reasoning at an answer marker ({', '.join(map(repr, self.config.prompts.answer_markers))})"
            )
            hint = (
                "Is M a reasoning model with think tags? For a model without them use signal_style = "
                "'answer' (M stops at its answer marker) or 'sketch'"
                if style == "think"
                else "Add the marker M writes before its answer to prompts.answer_markers"
            )
            logger.warning(
                "%s ended its turn without closing %s on %d of %d question(s): its whole answer became the "
                "signal, so nothing was saved on those. %s (eval rows record this as open_signal)",
                self.capable.spec,
                where,
                opened,
                len(results),
                hint,
            )
        empty = sum(r.empty_signal for r in results)
        if empty and not self._told_empty:
            self._told_empty = True
            logger.warning(
                "%s ended its turn without thinking on %d of %d question(s): m answered from an empty "
                "signal. Is M a reasoning model with think tags? (signal_style = 'sketch' is for one "
                "without; eval rows record this as empty_signal)",
                self.capable.spec,
                empty,
                len(results),
            )

    def solve(self, question: str | Problem, mode: str | Mode = "duet") -> SolveResult:
        return self.solve_batch([question], mode)[0]

    def solve_batch(self, questions: Sequence[str | Problem], mode: str | Mode = "duet") -> list[SolveResult]:
        """Answer many questions by one method; each of its stages is one batched backend call."""
        method = method_for(mode)
        problems = [as_problem(q) for q in questions]
        if not problems:
            return []
        method.check(self)
        results = method.solve_batch(self, problems)
        self.note_empty_signals(results)
        return results

    def finish(self, problems: Sequence[str | Problem], signals: Sequence[str]) -> list[GenerationResult]:
        """Stage 2 alone: m answers each problem given a signal. Used for budget-cut curves and
        training rollouts, where the signal is chosen by the caller."""
        cfg = self.config
        return self.light.generate(
            [
                light_request(as_problem(p), s, cfg, cfg.light_template_kwargs)
                for p, s in zip(problems, signals, strict=True)
            ]
        )

    async def astream(self, question: str | Problem, mode: str | Mode = "duet") -> AsyncIterator[Event]:
        """One question as events while the models write: `SignalDelta`s (M's signal; a model's
        own thinking in the alone modes), `AnswerDelta`s, then one `Finished` with the same
        `SolveResult` that `solve` gives. Closing the iterator cancels the generation in flight."""
        method = method_for(mode)
        problem = as_problem(question)
        method.check(self)
        async for event in method.astream(self, problem):
            if isinstance(event, Finished):
                self.note_empty_signals([event.result])
            yield event
