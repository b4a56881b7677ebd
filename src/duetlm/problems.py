"""What a question is and what answering it produced: `Problem` in, `SolveResult` out, in one
shape for every method and backend (docs/design.md section 1)."""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field

from duetlm.backends.base import FinishReason
from duetlm.errors import InputError
from duetlm.usage import Usage


@dataclass(frozen=True)
class Problem:
    """A question, with lettered options when it is multiple choice. `history` holds the
    conversation before it ((role, content) pairs, a system prompt included): both models
    see it, and the question is the last user turn."""

    question: str
    choices: tuple[str, ...] = ()
    history: tuple[tuple[str, str], ...] = ()

    @property
    def letters(self) -> str:
        return string.ascii_uppercase[: len(self.choices)]


def as_problem(item: str | Problem) -> Problem:
    problem = item if isinstance(item, Problem) else Problem(item)
    if not isinstance(problem.question, str) or not problem.question.strip():
        raise InputError("the question is empty")
    if len(problem.choices) > 26:
        raise InputError(f"a question may have at most 26 options, got {len(problem.choices)}")
    return problem


@dataclass
class SolveResult:
    """Everything one question produced, in one shape for every mode and backend.

    `text` is the final write-up (m's in duet modes, the part after M's thinking otherwise),
    `answer` what was extracted from it (None: counted as no answer), `signal` what M handed
    over, `truncated` whether M was cut by its budget before closing its thinking."""

    question: str
    mode: str
    text: str
    answer: str | None
    signal: str | None
    signal_tokens: int | None
    truncated: bool
    capable_finish: FinishReason | None
    light_finish: FinishReason | None
    usage: Usage = field(default_factory=Usage)
    capable_text: str | None = None
    retries: int = 0
    budget_clamped: bool = False  # a budget was cut to fit a model's context (see ContextGuard)
    empty_signal: bool = False  # M ended without thinking: m answered from nothing (two-stage modes)
    open_signal: bool = False  # M ended its turn without closing its signal: its whole answer went to m
    handover: dict | None = None  # the settle modes: probes, their answers and costs (duetlm.settle)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["usage"] = self.usage.to_dict()
        return data
