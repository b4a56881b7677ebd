"""Equivalence of two bare answers with math-verify, with a timeout in any thread.

math-verify bounds its sympy work with `signal.alarm`, which only the main thread may use:
called from a server handler or a thread pool it raises instead of grading. So the main
thread calls it directly under one alarm (no overhead), and any other thread hands the
comparison to a small pool of worker processes (`duetlm.grading.workers`), where it runs
in the worker's main thread under the same alarm. A comparison that times out is not equal,
and is reported as timed out.

Before math-verify:
- the gold loses the stray `$` and the final period that some harnesses leave on it;
- an equation stands for a value only as `VAR = value` (`x = 5` equals `5`); any other
  equation (`5x - 7y + 11z + 4 = 0`) equals only an equation, never its right-hand side;
- answers that are both plain numbers are compared as numbers (`grading.numbers`: exactly
  for an integer gold, to the precision a decimal gold states), in any thread, without sympy,
  a number with unit words after it (`18 dollars`) as its number;
- a subscript on a number or a letter (`52_8`, `E_2`) is part of the answer: sides whose
  subscripts differ are not equal, whatever sympy makes of them;
- a time of day (`3:30 p.m.`) equals only a reading of the same time (`15:30`);
- a digit run too long for Python's int is never handed to sympy: such an answer is equal
  only as a number.
After it, when both sides evaluate to numbers, the relative tolerance decides: an accepted
pair must also agree to it (math-verify compares numbers rounded to 6 places), and a refused
one where a side is a decimal approximation (`1.41421` for `\\sqrt{2}`) is accepted when it
agrees. A structured gold (an interval, a set, a list) that sympy read as a single number is
compared as text only.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time

from duetlm.grading.normalize import (
    clean_gold,
    normalize_answer,
    split_equation,
    subscripts,
    time_of_day,
    without_unit,
)
from duetlm.grading.numbers import close_floats, has_long_digits, numbers_equal, parse_number
from duetlm.grading.workers import compare_in_worker

logger = logging.getLogger(__name__)

TIMEOUT_S = 5
"""Seconds one `grade()` call may take, extraction and every comparison together (math-verify's
own default for one comparison)."""

_STRUCTURE = re.compile(r"\\(?:cup|cap|infty|in|le|ge|leq|geq|pm|mp)\b|[,;=<>\[\]]|\\\{|\(")


class _OutOfTime(BaseException):
    """Raised by our alarm; a BaseException so that math-verify's `except Exception` lets it by."""


class _QuietTimeoutNotice(logging.Filter):
    """math-verify warns once that its own timeout is off; here ours replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_QuietTimeoutNotice())


def _math_verify(predicted: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
        if not gold_parsed or not predicted_parsed:
            return False
        if _structure_read_as_number(gold_parsed[0], gold):
            return False  # a malformed gold; equal strings were accepted before sympy
        verdict = bool(verify(gold_parsed, predicted_parsed, timeout_seconds=None))
        values = _numeric_values(predicted_parsed[0], gold_parsed[0])
        if values is None:
            return verdict
        if verdict:  # math-verify compares numbers rounded to 6 places: they must also be close
            return close_floats(*values)
        # a decimal approximation of an exact value (`1.41421` for `\sqrt{2}`): close enough
        approximate = any("." in side and parse_number(side) is not None for side in (predicted, gold))
        return approximate and close_floats(*values)
    except _OutOfTime:
        raise
    except Exception:  # sympy on text it was never meant for: a grader never raises on text
        logger.debug("math-verify failed on %r against %r", predicted, gold, exc_info=True)
        return False


def _structure_read_as_number(parsed, gold: str) -> bool:
    """A gold with the marks of an interval, set, list or relation that sympy read as one number
    (`(-\\infty, 0) \\cup\\{1\\}$.` once parsed as 0): it would accept that number."""
    import sympy

    return isinstance(parsed, sympy.Number) and _STRUCTURE.search(gold) is not None


def _numeric_values(predicted, gold) -> tuple[complex, complex] | None:
    """Both sides' values, when both are finite numbers (not sets, relations or symbols)."""
    import sympy

    if not (isinstance(predicted, sympy.Expr) and isinstance(gold, sympy.Expr)):
        return None
    if not (predicted.is_number and gold.is_number):
        return None
    try:
        values = complex(predicted.evalf(30)), complex(gold.evalf(30))
    except (TypeError, ValueError, OverflowError):
        return None
    return values if all(map(_finite, values)) else None


def _finite(value: complex) -> bool:
    return all(abs(part) != float("inf") and part == part for part in (value.real, value.imag))


def compare_in_main_thread(predicted: str, gold: str, timeout_s: float) -> bool | None:
    """math-verify's verdict under one alarm for parsing and comparing; None on timeout.
    Runs in a main thread: the caller's, or a grading worker's."""

    def on_alarm(signum, frame):
        raise _OutOfTime

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    pending, _ = signal.setitimer(signal.ITIMER_REAL, timeout_s)  # an alarm the caller had set
    try:
        return _math_verify(predicted, gold)
    except _OutOfTime:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - started), 1e-3))


def equivalent(predicted: str, gold: str, timeout_s: float = TIMEOUT_S) -> bool | None:
    """Whether `predicted` equals `gold` as math (`\\frac{1}{2}` = `0.5`); None when the
    comparison ran out of time. Safe to call from any thread; never raises on text."""
    predicted, gold = normalize_answer(predicted), normalize_answer(clean_gold(gold))
    if predicted == gold:
        return True
    gold_time = time_of_day(gold)
    if gold_time is not None:  # a clock reading: only another reading of the same time equals it
        predicted_time = time_of_day(predicted)
        return predicted_time is not None and predicted_time.same_time(gold_time)
    predicted_equation, gold_equation = split_equation(predicted), split_equation(gold)
    if (predicted_equation is None) != (gold_equation is None):
        lone = (predicted_equation or gold_equation).value  # the value of `VAR = value`, else None
        if lone is None:
            return False  # an equation against a value: not the same kind of answer
        predicted, gold = (lone, gold) if predicted_equation else (predicted, lone)
        if predicted == gold:
            return True
    gold_number, predicted_number = parse_number(gold), parse_number(predicted)
    if gold_number is None or predicted_number is None:  # a unit after a number: the number
        gold_number = gold_number or parse_number(without_unit(gold))
        predicted_number = predicted_number or parse_number(without_unit(predicted))
    if gold_number is not None and predicted_number is not None:
        return numbers_equal(predicted_number, gold_number)
    if has_long_digits(predicted) or has_long_digits(gold):
        return False  # a number too long for sympy is equal only as a number (above)
    if subscripts(predicted) != subscripts(gold):
        return False
    if timeout_s <= 0:
        return None
    if threading.current_thread() is threading.main_thread():
        return compare_in_main_thread(predicted, gold, timeout_s)
    return compare_in_worker(predicted, gold, timeout_s)
