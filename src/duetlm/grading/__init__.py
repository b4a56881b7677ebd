"""Grading: one function decides whether a response answers a question (docs/design.md section 1).

`grade(text, gold, choices)` is the only judge; evaluation, training rewards and the public
`is_correct` all call it. Multiple choice (a task with options, or a gold that is a single
capital letter) reads the last letter answer in any form models write; everything else reads
the last `\\boxed{}`, then a final-answer phrase, then the last expression (of the last
`WINDOW_CHARS` characters), and compares with math-verify (`\\frac{1}{2}` = `0.5`), numbers to
a relative tolerance (`grading.numbers`). A gold may be a list of accepted answers: any of them
counts. A response with nothing to extract is wrong, with `answer=None`, and the rule that
found an answer is returned so that reports can count fallbacks.

    >>> grade("... so the answer is \\\\boxed{\\\\frac12}", "0.5")
    Grade(correct=True, answer='\\\\frac12', rule='boxed', timed_out=False)
    >>> grade("**Answer:** (B)", "B", choices=["x", "y", "z", "w"]).correct
    True
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from duetlm.grading.extract import (
    FALLBACK_RULES,
    RULES,
    Extracted,
    extract,
    extract_boxed,
    extract_choice,
    extract_math,
    letters_for,
)
from duetlm.grading.normalize import normalize_answer
from duetlm.grading.verify import TIMEOUT_S, equivalent

__all__ = [
    "FALLBACK_RULES",
    "RULES",
    "Extracted",
    "Grade",
    "answers_match",
    "extract",
    "extract_answer",
    "extract_boxed",
    "extract_choice",
    "extract_math",
    "gold_from_gsm8k",
    "grade",
    "is_correct",
    "is_letter_gold",
    "normalize_answer",
]


class Grade(NamedTuple):
    """The verdict on one response: `answer` is what was read (None: no answer), `rule` which
    extraction rule read it, `timed_out` whether math-verify ran out of time (then wrong)."""

    correct: bool
    answer: str | None
    rule: str | None
    timed_out: bool = False


def is_letter_gold(gold: str) -> bool:
    """A single capital letter is a multiple-choice gold even without the options at hand."""
    gold = gold.strip()
    return len(gold) == 1 and "A" <= gold <= "Z"


def letters_of(golds: Sequence[str], choices: Sequence[str] | int) -> str:
    """The letters a response may answer with: the options', or A-Z for a letter gold."""
    n_choices = choices if isinstance(choices, int) else len(choices)
    if n_choices:
        return letters_for(n_choices)
    return letters_for(26) if all(is_letter_gold(g) for g in golds) else ""


def grade(
    text: str,
    gold: str | Sequence[str],
    choices: Sequence[str] | int = 0,
    timeout_s: float = TIMEOUT_S,
) -> Grade:
    """Whether `text` answers `gold` (or any gold of a list). `choices`: the options (or their
    number) of a multiple-choice question. `timeout_s` bounds the whole call, reading the
    answer and every comparison; a call past it is wrong and `timed_out`. Safe in any thread;
    never raises on a model's text."""
    deadline = time.monotonic() + timeout_s
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("grade() needs at least one gold answer")
    letters = letters_of(golds, choices)
    found = extract(text, letters)
    if found is None:
        return Grade(False, None, None)
    if letters:
        return Grade(found.answer in {g.strip() for g in golds}, found.answer, found.rule)
    timed_out = False
    for candidate in golds:
        verdict = equivalent(found.answer, str(candidate), deadline - time.monotonic())
        if verdict:
            return Grade(True, found.answer, found.rule)
        timed_out |= verdict is None
    return Grade(False, found.answer, found.rule, timed_out)


def is_correct(response_text: str, gold: str | Sequence[str], choices: Sequence[str] | int = 0) -> bool:
    """`grade(...).correct`: whether a full response answers `gold`."""
    return grade(response_text, gold, choices).correct


def answers_match(predicted: str, gold: str, timeout_s: float = TIMEOUT_S) -> bool:
    """Whether two bare answers are equal as math; a timeout counts as not equal."""
    return bool(equivalent(predicted, gold, timeout_s))


def extract_answer(text: str, choices: Sequence[str] | int = 0) -> str | None:
    """The answer `grade` would read from `text` (None: no answer)."""
    found = extract(text, letters_of(["?"], choices))
    return found.answer if found else None


def gold_from_gsm8k(answer_field: str) -> str:
    """GSM8K golds end in `#### N`; N may carry thousands separators."""
    _, sep, tail = answer_field.rpartition("####")
    if not sep:
        return answer_field.strip()
    return tail.strip().replace(",", "")
