"""The grader, table-driven: extraction as models write, normalization, one verdict, any thread."""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from duetlm.grading import (
    answers_match,
    extract_boxed,
    extract_choice,
    extract_math,
    gold_from_gsm8k,
    grade,
    is_correct,
    normalize_answer,
)
from duetlm.grading.workers import WorkerPool


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{14}", "14"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {x^{2}+1} done", "x^{2}+1"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and an unclosed \\boxed{4", "3"),
        ("no box here", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


MULTIPLE_CHOICE = [
    # (response, letter read or None)
    ("reasoning...\nAnswer: B", "B"),
    ("Answer: (C)", "C"),
    ("answer: $D$", "D"),
    ("Answer: A\nwait\nAnswer: C", "C"),
    ("\\boxed{B}", "B"),
    ("\\boxed{(B)}", "B"),
    ("\\boxed{\\text{(B)}}", "B"),
    ("\\boxed{\\textbf{(B)}}", "B"),
    ("\\boxed{\\text{B}}", "B"),
    ("\\boxed{B) 42 grams}", "B"),
    ("**Answer:** B", "B"),
    ("**Answer**: B", "B"),
    ("Answer: **B**", "B"),
    ("**Answer: B**", "B"),
    ("The answer is (B).", "B"),
    ("Thus the correct answer is: **D**", "D"),
    ("Answer: B — the second option", "B"),
    ("Answer: B.\nThat is all.", "B"),
    ("\\boxed{A} at first, but Answer: C", "C"),  # the last answer in the text wins
    ("Answer: C\nOn reflection, \\boxed{D}", "D"),
    ("Answer: a mixture of salts", None),  # an article, not a letter
    ("Answer: A mixture of salts", None),
    ("The answer is unclear", None),
    ("Answer: the first one", None),
    ("Answer: E", None),  # not among the four options
    ("I think B is right", None),
]


@pytest.mark.parametrize(("text", "expected"), MULTIPLE_CHOICE)
def test_extract_choice(text, expected):
    found = extract_choice(text, "ABCD")
    assert (found.answer if found else None) == expected


MATH = [
    # (response, answer read, rule)
    ("so \\boxed{42}", "42", "boxed"),
    ("The final answer is $42$", "42", "answer_phrase"),
    ("The final answer is $42$. I hope it is correct.", "42", "answer_phrase"),
    ("**Answer:** 42", "42", "answer_phrase"),
    ("**Answer**: 42", "42", "answer_phrase"),
    ("Answer: \\(\\frac{3}{4}\\)", "\\frac{3}{4}", "answer_phrase"),
    ("So the answer is 3.5.\nDone", "3.5", "answer_phrase"),
    ("We get $x = 7$ and then 12 apples", "12", "last_expression"),
    ("Adding, $3+4 = 7$", "3+4 = 7", "last_expression"),
    ("Answer: 5, but \\boxed{6}", "6", "boxed"),  # a box beats every phrase
    ("no numbers at all", None, None),
]


@pytest.mark.parametrize(("text", "answer", "rule"), MATH)
def test_extract_math_and_its_rule(text, answer, rule):
    found = extract_math(text)
    assert (found.answer, found.rule) == (answer, rule) if found else (answer, rule) == (None, None)


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("4.5e33", "4.5\\times10^{33}"),
        ("1E-5", "1\\times10^{-5}"),
        ("2.0e+3", "2.0\\times10^{3}"),
        ("111, \\! 111, \\! 111", "111111111"),
        ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
        ("10,\\!080", "10080"),
        ("\\$32,\\!348", "\\$32348"),
        ("58,500", "58500"),
        ("1\\,000", "1000"),
        ("1, 234", "1, 234"),  # a list, not thousands
        ("3, 5, 7", "3, 5, 7"),
        ("1,-2", "1,-2"),
        ("(6,31,-1)", "(6,31,-1)"),
        ("e^{2}", "e^{2}"),
        ("x_1e3", "x_{1}e3"),
    ],
)
def test_normalize_answer(answer, normalized):
    assert normalize_answer(answer) == normalized
    assert normalize_answer(normalized) == normalized


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("27", "27.0", True),
        ("14", "14", True),
        ("15", "14", False),
        ("\\frac{1}{3}", "0.5", False),
        ("4.5 \\times 10^{33}", "4.5e33", True),  # math-verify alone reads 4.5e33 as 4.5·e·33
        ("4.5e33", "4.5 \\times 10^{33}", True),
        ("4.6 \\times 10^{33}", "4.5e33", False),
        ("111", "111, \\! 111, \\! 111", False),  # math-verify alone reads the gold as the set {111}
        ("111111111", "111, \\! 111, \\! 111", True),
        ("111,111,111", "111, \\! 111, \\! 111", True),
        ("11111111100", "11,\\! 111,\\! 111,\\! 100", True),
        ("10080", "10,\\!080", True),
        ("58500", "58,500", True),
        ("-2, 1", "1,-2", True),
    ],
)
def test_answers_match(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


@pytest.mark.parametrize(
    ("response", "gold", "choices", "expected"),
    [
        ("... so \\boxed{18}", "18", 0, True),
        ("... so \\boxed{18}", "17", 0, False),
        ("no answer at all", "18", 0, False),
        ("Answer: B", "B", 0, True),  # a letter gold without its options
        ("Answer: B", "B", 4, True),
        ("Answer: C", "B", 4, False),
        ("\\boxed{B}", "B", 0, True),
        ("\\boxed{B}", "B", 4, True),  # a box with choices (`grade` once called this no answer)
        ("\\boxed{\\text{(B)}}", "B", 4, True),
        ("The answer is (B).", "B", 4, True),
        ("Answer: a mixture of both", "A", 4, False),
        ("The final answer is $42$", "42", 0, True),
        ("**Answer:** 42", "42", 0, True),
        ("\\boxed{x=2}", ["x=1", "x=2"], 0, True),  # a list gold: any element counts
        ("\\boxed{x=3}", ["x=1", "x=2"], 0, False),
    ],
)
def test_one_verdict_for_every_caller(response, gold, choices, expected):
    verdict = grade(response, gold, choices)
    assert verdict.correct is expected
    assert is_correct(response, gold, choices) is expected


def test_grade_names_the_rule_and_no_answer():
    assert grade("\\boxed{7}", "7").rule == "boxed"
    assert grade("The final answer is $7$", "7").rule == "answer_phrase"
    assert grade("we got 7", "7").rule == "last_expression"
    assert grade("nothing", "7") == (False, None, None, False)
    assert grade("Answer: maybe", "B", 4) == (False, None, None, False)


@pytest.mark.parametrize(
    ("field", "gold"),
    [("Natalia sold 48/2 = 24 clips.\n#### 72", "72"), ("#### 1,234", "1234"), ("42", "42")],
)
def test_gsm8k_gold(field, gold):
    assert gold_from_gsm8k(field) == gold


# --- any thread, with a timeout ----------------------------------------------------------

SYMBOLIC = [(f"\\boxed{{\\frac{{{2 * i}}}{{4}}}}", f"{i / 2}", True) for i in range(1, 9)] + [
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\frac{1}{3}}", "0.5", False),
]


def test_grading_from_threads_and_asyncio():
    with ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(lambda case: grade(case[0], case[1]).correct, SYMBOLIC))
    assert verdicts == [expected for _, _, expected in SYMBOLIC]
    assert asyncio.run(asyncio.to_thread(is_correct, "\\boxed{2\\sqrt{2}}", "\\sqrt{8}"))
    assert not asyncio.run(asyncio.to_thread(is_correct, "\\boxed{2\\sqrt{3}}", "\\sqrt{8}"))


TOWER = ("\\boxed{2^{2^{2^{2^{2^{30}}}}}}", "3^{3^{3^{3^{40}}}}")  # sympy would run for ages


def test_timeout_in_the_main_thread_keeps_a_callers_alarm():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        verdict = grade(*TOWER, timeout_s=0.5)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert verdict.timed_out and not verdict.correct
    assert 25 < remaining < 30 and not fired


def test_timeout_in_a_thread():
    box = {}
    thread = threading.Thread(target=lambda: box.update(verdict=grade(*TOWER, timeout_s=0.5)))
    thread.start()
    thread.join(30)
    assert box["verdict"].timed_out and not box["verdict"].correct


def test_a_hung_worker_is_replaced():
    silent = (sys.executable, "-c", "import sys, time\nsys.stdin.readline()\ntime.sleep(600)")
    pool = WorkerPool(size=1, command=silent)
    import duetlm.grading.workers as workers

    grace, workers.GRACE_S = workers.GRACE_S, 0.2
    try:
        assert pool.compare("1", "2", 0.1) is None
        assert pool._workers == []  # killed, not left running
    finally:
        workers.GRACE_S = grace
        pool.close()
    real = WorkerPool(size=1)
    try:
        assert real.compare("\\frac{1}{2}", "0.5", 5) is True
        real._workers[0].process.kill()  # a worker that died is replaced once, transparently
        real._workers[0].process.wait()
        assert real.compare("\\frac{1}{3}", "0.5", 5) is False
    finally:
        real.close()


# --- degenerate output: bounded work, no crash, no false accept ------------------------------

DEGENERATE = {  # what a model caught in a loop writes
    "repeated box openings": "\\boxed{",
    "repeated inline math": "$1$ ",
    "one long digit run": "7",
    "a repeated sentence": "The answer might be 42, let me check again. ",
}


@pytest.mark.parametrize("unit", DEGENERATE.values(), ids=DEGENERATE.keys())
def test_a_megabyte_of_repetition_is_graded_from_its_end(unit):
    # Before, extraction was quadratic in the length (200 KB of `\boxed{` took 82 s); now only
    # the last WINDOW_CHARS are read, in linear time. An alarm stands guard against a hang.
    import signal

    from duetlm.grading.extract import WINDOW_CHARS, tail

    text = unit * (1_000_000 // len(unit))
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("grade() hung on a degenerate response"))
    signal.alarm(60)
    try:
        verdict = grade(text, "42")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert verdict == grade(tail(text), "42")
    assert len(tail(text)) == WINDOW_CHARS
    assert verdict.correct is (unit.startswith("The answer"))


def test_an_answer_before_the_window_is_not_read():
    from duetlm.grading.extract import WINDOW_CHARS

    assert extract_math("\\boxed{7}" + " filler" * WINDOW_CHARS, fallbacks=False) is None
    assert extract_math("\\boxed{7}" + " filler" * (WINDOW_CHARS // 8), fallbacks=False).answer == "7"


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        (f"\\boxed{{{'1' * 5000}}}", "1" * 5000, True),  # past Python's 4,300-digit int limit
        (f"\\boxed{{{'1' * 5000}}}", "1" * 4999 + "2", False),
        (f"\\boxed{{{'1' * 5000}}}", "12", False),
        ("\\boxed{12}", "1" * 5000, False),
        (f"so ${'9' * 5000}$", "\\frac{1}{2}", False),  # never handed to sympy
        (f"{'3' * 5000}", "x^2", False),
    ],
)
def test_numbers_past_pythons_int_limit_are_compared_without_raising(response, gold, expected):
    assert grade(response, gold).correct is expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("0.0", "3.509e-07", False),  # math-verify alone: equal (both round to 0.000000)
        ("2.88e-19", "1.325e-27", False),
        ("7.018e-07", "3.509e-07", False),  # twice the gold
        ("3.5091e-07", "3.509e-07", True),  # within 1e-4 of the gold
        ("3.509 \\times 10^{-7}", "3.509e-07", True),
        ("3.51e-07", "3.509e-07", False),
        ("0", "0.0", True),
        ("1e-12", "0.0", True),  # the absolute floor, for a gold of exactly zero
        ("0.001", "0.0", False),
        ("12346", "12345", False),  # an integer gold is matched exactly, whatever its size
        ("12345.0", "12345", True),
        ("\\frac{24691}{2}", "12345", False),
        ("1.41421", "\\sqrt{2}", True),  # a decimal approximation of an exact value
        ("1.4", "\\sqrt{2}", False),
        ("\\sqrt{2} \\times 10^{-9}", "0", False),
        ("10^{-3}", "0.001", True),
    ],
)
def test_numbers_agree_to_a_relative_tolerance_not_to_six_places(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("5x - 7y + 11z + 4 = 0", "0", False),  # math-verify alone reads the right-hand side
        ("2x+3=7", "7", False),
        ("x = 5", "5", True),  # `VAR = value` stands for the value
        ("x=5", "x = 5", True),
        ("5", "x = 5", True),
        ("a_1 = 3", "3", True),
        ("\\theta = \\frac{\\pi}{2}", "\\frac{\\pi}{2}", True),
        ("5x - 7y + 11z + 4 = 0", "5x - 7y + 11z + 4 = 0", True),
        ("y = 2x + 3", "2x + 3", True),
        ("x \\le 3", "3", False),
    ],
)
def test_only_var_equals_value_stands_for_a_value(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


def test_a_malformed_gold_is_cleaned_and_never_read_as_a_number():
    gold = "(-\\infty, 0) \\cup\\{1\\}$."  # as one public harness leaves it
    assert grade("\\boxed{(-\\infty, 0) \\cup \\{1\\}}", gold).correct
    assert not grade("\\boxed{0}", gold).correct
    assert grade("\\boxed{12}", "$12$.").correct
    from duetlm.grading.normalize import clean_gold

    assert clean_gold("$12$.") == "12" == clean_gold(clean_gold("$12$."))
    assert clean_gold("3, 5, \\ldots") == "3, 5, \\ldots"


@pytest.mark.parametrize(
    ("response", "gold", "choices", "expected"),
    [
        ("After all that, the answer is option C", "C", 4, True),
        ("The correct choice is choice B.", "B", 4, True),
        ("The final answer is $69$ and $84$.", "69, 84", 0, True),
        ("The final answer is $69$ and $84$.", "69", 0, False),
        ("The final answer is $69$, $84$ and $7$.", "69, 84, 7", 0, True),
    ],
)
def test_forms_models_write(response, gold, choices, expected):
    assert grade(response, gold, choices).correct is expected


def test_one_time_budget_covers_the_whole_call():
    # four golds that each make sympy run for ages: the budget is the call's, not each gold's
    import time

    started = time.monotonic()
    verdict = grade(TOWER[0], [TOWER[1], TOWER[1] + "+1", TOWER[1] + "+2", TOWER[1] + "+3"], timeout_s=0.5)
    assert verdict.timed_out and not verdict.correct
    assert time.monotonic() - started < 1.5  # each gold its own 0.5 s would take 2 s
