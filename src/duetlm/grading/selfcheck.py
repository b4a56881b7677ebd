"""The grader checked against a task's own golds, before any model is trusted to be graded.

Three properties must hold for every gold: it accepts itself boxed; it accepts an equivalent
rewriting of itself written the way models answer unboxed (`The final answer is $...$`);
and it refuses another question's gold unless the two are the same value. A failure is a
grader bug or a gold that needs normalizing (`111,\\! 111` once read as the set {111}).

    duet check-grader --task math500 --data math500=test.jsonl
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from duetlm.grading import grade, is_letter_gold, normalize_answer

_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?\d+\.\d+")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\w*\s*=\s*")  # `x = 5` is 5 to math-verify, by design


def equivalent_rewriting(gold: str) -> str:
    """The same answer written differently, as models do: integers as a fraction, decimals
    with a trailing zero, `\\dfrac` for `\\frac` (and back), no `\\left`/`\\right`, other
    spacing."""
    text = normalize_answer(gold)
    if _INTEGER.fullmatch(text):
        return f"\\frac{{{2 * int(text)}}}{{2}}"
    if _DECIMAL.fullmatch(text):
        return f"{text}0"
    rewritten = text.replace("\\left", "").replace("\\right", "")
    if "\\dfrac" in rewritten:
        rewritten = rewritten.replace("\\dfrac", "\\frac")
    else:
        rewritten = rewritten.replace("\\frac", "\\dfrac")
    if rewritten == text:  # nothing of the above: change the spacing after commas, or add some
        spaced = re.sub(r",\s*", ", ", text)
        rewritten = spaced if spaced != text else re.sub(r",\s+", ",", text)
    return rewritten if rewritten != text else f" {text} "


def same_value(one: str, other: str) -> bool:
    """Whether two golds are the same answer on their face (same text after normalizing,
    or the same number): then accepting one for the other is right."""
    a, b = (_ASSIGNMENT.sub("", normalize_answer(x)).replace(" ", "") for x in (one, other))
    if a == b:
        return True
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return False


@dataclass(frozen=True)
class Failure:
    index: int
    check: str  # "self", "rewriting" or "other"
    gold: str
    response: str


def check_golds(golds: Sequence[str], choices: Sequence[int] | None = None) -> list[Failure]:
    """Every violation of the three properties over `golds` (question i's options: choices[i])."""
    failures = []
    for index, gold in enumerate(golds):
        n_choices = choices[index] if choices else 0
        letter = n_choices or is_letter_gold(gold)
        other = golds[(index + 1) % len(golds)]
        cases = [
            ("self", f"\\boxed{{{gold}}}", True),
            (
                "rewriting",
                f"Answer: {gold}" if letter else f"The final answer is ${equivalent_rewriting(gold)}$.",
                True,
            ),
        ]
        if len(golds) > 1 and not same_value(gold, other):
            cases.append(("other", f"\\boxed{{{other}}}", False))
        for check, response, expected in cases:
            if grade(response, gold, n_choices).correct is not expected:
                failures.append(Failure(index, check, gold, response))
    return failures
