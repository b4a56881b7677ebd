"""Answer extraction and math-verify equivalence, table-driven."""

from __future__ import annotations

import pytest

from duetlm.grading import answers_match, extract_boxed, extract_choice, gold_from_gsm8k, is_correct


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("reasoning...\nAnswer: B", "B"),
        ("Answer: (C)", "C"),
        ("answer: $D$", "D"),
        ("Answer: A\nwait\nAnswer: C", "C"),
        ("The answer is unclear", None),
        ("Answer: the first one", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("27", "27.0", True),
        ("14", "14", True),
        ("15", "14", False),
        ("\\frac{1}{3}", "0.5", False),
    ],
)
def test_answers_match(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("... so \\boxed{18}", "18", True),
        ("... so \\boxed{18}", "17", False),
        ("no answer at all", "18", False),
        ("Answer: B", "B", True),
        ("Answer: C", "B", False),
        ("\\boxed{B}", "B", True),
    ],
)
def test_is_correct(response, gold, expected):
    assert is_correct(response, gold) is expected


@pytest.mark.parametrize(
    ("field", "gold"),
    [("Natalia sold 48/2 = 24 clips.\n#### 72", "72"), ("#### 1,234", "1234"), ("42", "42")],
)
def test_gsm8k_gold(field, gold):
    assert gold_from_gsm8k(field) == gold
