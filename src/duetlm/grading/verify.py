"""Equivalence of two bare answers with math-verify, with a timeout in any thread.

math-verify bounds its sympy work with `signal.alarm`, which only the main thread may use:
called from a server handler or a thread pool it raises instead of grading. So the main
thread calls it directly under one alarm (`duetlm.grading.mathverify`, no overhead), and any
other thread hands the comparison to a small pool of worker processes
(`duetlm.grading.workers`), where it runs in the worker's main thread under the same alarm.
A comparison that times out is not equal, and is reported as timed out.

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
After it, when both sides evaluate to numbers, the relative tolerance decides (see
`duetlm.grading.mathverify`).
"""

from __future__ import annotations

import logging
import threading

from duetlm.grading.mathverify import compare_in_main_thread
from duetlm.grading.normalize import (
    clean_gold,
    normalize_answer,
    split_equation,
    subscripts,
    time_of_day,
    without_unit,
)
from duetlm.grading.numbers import has_long_digits, numbers_equal, parse_number
from duetlm.grading.workers import compare_in_worker

logger = logging.getLogger(__name__)

TIMEOUT_S = 5
"""Seconds one `grade()` call may take, extraction and every comparison together (math-verify's
own default for one comparison)."""


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
