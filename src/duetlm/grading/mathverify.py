"""math-verify's verdict on two bare answers, under one alarm that bounds its sympy work.

math-verify bounds that work with `signal.alarm`, which only a main thread may use, so this
runs in a main thread: the caller's, or a grading worker's (`duetlm.grading.workers`). A
comparison that times out is not equal. When both sides evaluate to numbers, the relative
tolerance decides (math-verify compares numbers rounded to 6 places), and a decimal
approximation of an exact value (`1.41421` for `\\sqrt{2}`) is accepted when it agrees. A
structured gold (an interval, a set, a list) that sympy read as a single number is refused.
"""

from __future__ import annotations

import logging
import re
import signal
import time

from duetlm.grading.numbers import close_floats, parse_number

logger = logging.getLogger(__name__)

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
