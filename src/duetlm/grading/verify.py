"""Equivalence of two bare answers with math-verify, with a timeout in any thread.

math-verify bounds its sympy work with `signal.alarm`, which only the main thread may use:
called from a server handler or a thread pool it raises instead of grading. So the main
thread calls it directly under one alarm (no overhead), and any other thread hands the
comparison to a small pool of worker processes (`duetlm.grading.workers`), where it runs
in the worker's main thread under the same alarm. A
comparison that times out is not equal, and is reported as timed out. Answers that are both
plain numbers are compared exactly without sympy, in any thread.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from fractions import Fraction

from duetlm.grading.normalize import normalize_answer
from duetlm.grading.workers import compare_in_worker

logger = logging.getLogger(__name__)

TIMEOUT_S = 5
"""Seconds a single comparison may take (math-verify's own default)."""

_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def _plain_number(text: str) -> Fraction | None:
    return Fraction(text) if _PLAIN_NUMBER.fullmatch(text) else None


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

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=None))


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
    comparison ran out of time. Safe to call from any thread."""
    predicted, gold = normalize_answer(predicted), normalize_answer(gold)
    if predicted == gold:
        return True
    gold_number, predicted_number = _plain_number(gold), _plain_number(predicted)
    if gold_number is not None and predicted_number is not None:
        return gold_number == predicted_number
    if threading.current_thread() is threading.main_thread():
        return compare_in_main_thread(predicted, gold, timeout_s)
    return compare_in_worker(predicted, gold, timeout_s)
