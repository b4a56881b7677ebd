"""Answer forms that math-verify misreads, rewritten before it parses them; golds as
harnesses leave them; equations.

- `4.5e33` parses as 4.5·e·33 (Euler's number), so it never equals `4.5 \\times 10^{33}`:
  scientific notation becomes `4.5\\times10^{33}`.
- `111,\\! 111,\\! 111` (MATH writes thousands so) parses as the set {111}, which a wrong
  `\\boxed{111}` then equals: `\\!` and `\\,` go, and a whole answer that is one number with
  thousands separators loses them. A comma with a space and no `\\!` stays a list (`1, 234`).
- `18 dollars` is read by sympy as 18 times a product of letters: a number followed by unit
  words (`without_unit`) stands for the number.
- `52_8` is read as 52: a subscript on a number or a letter is part of what the answer is
  (`subscripts`), so that a base or an index cannot change unseen. An empty one (`X_{}`, as
  models write a name) is no subscript at all: sympy reads `X_{}=125-1.26P` so that it equals
  `X_{}=125-1.25P`, so the empty group goes.
- `3:30 p.m.` is a time of day (`time_of_day`): the clock reading, in minutes after midnight.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_SCIENTIFIC = re.compile(r"(?<![\w\\.])(\d+(?:\.\d+)?)[eE]\+?(-?\d+)(?![\w.])")
_THIN_SPACE_IN_NUMBER = re.compile(r"(?<=\d)\s*\\,\s*(?=\d{3}(?!\d))")
_THOUSANDS_MARKED = re.compile(r"^(\\?\$)?\s*(-?\d{1,3}(?:\s*,\s*(?:\\!)?\s*\d{3})+(?:\.\d+)?)\s*(\\?\$)?$")
_BARE_SUBSCRIPT = re.compile(r"_\s*([A-Za-z0-9])")  # x_1 is x_{1}: one form for both sides
_EMPTY_SUBSCRIPT = re.compile(r"_\s*\{\s*\}")  # X_{} is X: sympy misreads the empty group
_THOUSANDS_PLAIN = re.compile(r"^(\\?\$)?(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?)(\\?\$)?$")


def normalize_answer(answer: str) -> str:
    """The same answer in a form math-verify reads as meant. Idempotent."""
    text = answer.strip()
    text = _THIN_SPACE_IN_NUMBER.sub("", text)
    marked = _THOUSANDS_MARKED.match(text) if "\\!" in text else None
    plain = _THOUSANDS_PLAIN.match(text)
    match = marked or plain
    if match:
        number = re.sub(r"[\s,]|\\!", "", match.group(2))
        return f"{match.group(1) or ''}{number}{match.group(3) or ''}"
    text = _BARE_SUBSCRIPT.sub(r"_{\1}", _EMPTY_SUBSCRIPT.sub("", text.replace("\\!", "")))
    return _SCIENTIFIC.sub(lambda m: f"{m.group(1)}\\times10^{{{m.group(2)}}}", text)


_STRAY_DOLLARS = re.compile(r"^\s*\$+|(?<!\\)\$+\s*$")


def clean_gold(gold: str) -> str:
    """A gold without what some public harnesses leave around it: enclosing or stray `$` and a
    final period (`(-\\infty, 0) \\cup\\{1\\}$.`). Idempotent."""
    text = gold.strip()
    while True:
        cleaned = _STRAY_DOLLARS.sub("", text).strip()
        if cleaned.endswith(".") and not cleaned.endswith(".."):
            cleaned = cleaned[:-1].rstrip()
        if cleaned == text:
            return text
        text = cleaned


_RELATION_BEFORE = "<>!:\\="
_LONE_VARIABLE = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?'?")


class Equation(NamedTuple):
    left: str
    right: str

    @property
    def value(self) -> str | None:
        """What `VAR = value` stands for: its right side, when the left is a lone variable."""
        return self.right if _LONE_VARIABLE.fullmatch(self.left) else None


def split_equation(answer: str) -> Equation | None:
    """An answer with exactly one `=` (not part of `<=`, `>=`, `!=`, `:=`, `==`) as its two
    sides, else None."""
    if answer.count("=") != 1:
        return None
    index = answer.index("=")
    if index == 0 or answer[index - 1] in _RELATION_BEFORE:
        return None
    left, right = answer[:index].strip(), answer[index + 1 :].strip()
    return Equation(left, right) if left and right else None


_LEADING_NUMBER = re.compile(
    r"\s*(?P<number>[-+]?(?:"
    r"\\[dt]?frac\s*\{\s*\d+\s*\}\s*\{\s*\d+\s*\}"  # a fraction: \frac{9}{7} dollars
    r"|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*\\times\s*10\s*\^\s*\{\s*[-+]?\d+\s*\})?"  # 4.5\times10^{33}
    r"))(?=\s|\\(?:text|mbox|mathrm|textrm)\b)"
)
# one character or one \text{...} group per step: linear on any input, no backtracking
_UNIT_TAIL = re.compile(r"(?:\\(?:text|mbox|mathrm|textrm)\s*\{[^{}\d]*\}|[A-Za-z]|\s|\.|/|\^\s*\{?[23]\}?)*")
MAX_UNIT_CHARS = 60


def without_unit(answer: str) -> str:
    """The number of an answer that is a number and unit words after it (`18 dollars`,
    `18 \\text{dollars}`, `5 m/s`, `10 \\text{ cm}^2`, `\\frac{9}{7} dollars`, `4.5e33 dollars`
    once normalized), else the answer as it is. The unit must stand apart from the number (a
    space or `\\text`), so `5x` stays an expression, and hold no digit but a square or cube, so
    `2 apples and 3` is no number."""
    match = _LEADING_NUMBER.match(answer)
    if match is None:
        return answer
    tail = answer[match.end() :]
    if not tail.strip() or len(tail) > MAX_UNIT_CHARS or not re.search(r"[A-Za-z]", tail):
        return answer
    return match.group("number").replace(",", "") if _UNIT_TAIL.fullmatch(tail) else answer


# a subscript on a digit run (a base: 52_8) or on a lone letter (E_2, x_{10}); not on a command
# (\log_2, \sum_{i}), whose subscript is an argument sympy reads
_SUBSCRIPT = re.compile(
    r"(?:(?<!\d)\d+|(?<![\\A-Za-z])[A-Za-z])\s*_\s*(?:\{(?P<group>[^{}]*)\}|(?P<char>[A-Za-z0-9]))"
)


def subscripts(answer: str) -> list[str]:
    """The subscripts on numbers and single-letter symbols, in order, spaces removed."""
    return sorted(
        re.sub(r"\s+", "", m.group("group") if m.group("group") is not None else m.group("char"))
        for m in _SUBSCRIPT.finditer(answer)
    )


_TIME = re.compile(
    r"^\s*(?P<hour>\d{1,2})\s*:\s*(?P<minute>\d{2})"
    r"(?:\s*(?:\\(?:text|mbox|mathrm|textrm)\s*\{\s*)?(?P<meridiem>[aApP])\.?\s*[mM]\.?\s*\}?)?\s*$"
)


class Clock(NamedTuple):
    """A time of day: minutes after midnight, and whether a.m./p.m. (or the 24-hour clock) fixed them."""

    minutes: int
    fixed: bool

    def same_time(self, other: Clock) -> bool:
        """Equal readings; a time written without a.m./p.m. on the 12-hour clock (`3:30`) may be
        either half of the day, but a.m. and p.m. never stand for each other."""
        if self.fixed and other.fixed:
            return self.minutes == other.minutes
        return self.minutes % 720 == other.minutes % 720


def time_of_day(answer: str) -> Clock | None:
    """`3:30 p.m.`, `3:30 \\text{ PM}`, `15:30`, `9:05am` as a `Clock`; None for anything else."""
    match = _TIME.match(answer)
    if match is None:
        return None
    hour, minute, meridiem = int(match.group("hour")), int(match.group("minute")), match.group("meridiem")
    if minute > 59 or hour > 23 or (meridiem and not 1 <= hour <= 12):
        return None
    if meridiem:
        hour = hour % 12 + (12 if meridiem.lower() == "p" else 0)
        return Clock(hour * 60 + minute, True)
    return Clock(hour * 60 + minute, hour == 0 or hour > 12)
