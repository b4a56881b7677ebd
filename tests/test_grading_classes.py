"""Three classes of answers a grader got wrong, each tested both ways: the equivalent form is
accepted, and a one-digit change of it refused (docs/evaluation.md#grading).

1. A number with unit words after it, in the box or after the answer phrase, against a bare
   number gold (how models write word-problem answers).
2. A gold written as a decimal: the tolerance follows the digits it shows, so a large gold
   does not accept a neighbour that a relative 1e-4 would.
3. A subscript on a number or a letter (a base, an index) is part of the answer, and so is a
   digit inside an expression or an equation, an empty subscript (`X_{}`) included.
4. What real models write on word problems: a unit word after a fraction or a number in
   scientific notation, and times of day."""

from __future__ import annotations

import pytest

from duetlm.grading import is_correct
from duetlm.grading.normalize import subscripts, without_unit

UNITS = [
    (r"\boxed{18 dollars}", r"\boxed{19 dollars}", "18"),
    ("The answer is 18 dollars.", "The answer is 13 dollars.", "18"),
    (r"So she pays \boxed{42 \text{ dollars}}.", r"So she pays \boxed{43 \text{ dollars}}.", "42"),
    (r"\boxed{2.5 hours}", r"\boxed{2.6 hours}", "2.5"),
    (r"\boxed{1,250 meters}", r"\boxed{1,260 meters}", "1250"),
    (r"\boxed{12 cm^2}", r"\boxed{17 cm^2}", "12"),
    (r"\boxed{60 km/h}", r"\boxed{61 km/h}", "60"),
    ("The answer is 7 apples", "The answer is 8 apples", "7"),
]

TOLERANCE = [
    (r"\boxed{3244047.1}", r"\boxed{3244048.1}", "3244047.1"),
    (r"\boxed{3244047.10}", r"\boxed{3244047.2}", "3244047.1"),
    (r"\boxed{98765.4321}", r"\boxed{98765.4331}", "98765.4321"),
    (r"\boxed{\frac{1975309}{2}}", r"\boxed{\frac{1975311}{2}}", "987654.5"),
    (r"\boxed{0.3333}", r"\boxed{0.3343}", r"\frac{1}{3}"),
    (r"\boxed{1.41421}", r"\boxed{1.41521}", r"\sqrt{2}"),
    (r"\boxed{3.509 \times 10^{-7}}", r"\boxed{3.519 \times 10^{-7}}", "3.509e-07"),
    (r"\boxed{0.5}", r"\boxed{0.54}", "0.5"),
]

SUBSCRIPTS = [
    (r"\boxed{52_8}", r"\boxed{52_9}", "52_8"),
    (r"\boxed{52_{8}}", r"\boxed{53_8}", "52_8"),
    (r"\boxed{1011_2}", r"\boxed{1011_3}", "1011_2"),
    (r"\boxed{E_3}", r"\boxed{E_2}", "E_3"),
    (r"\boxed{x_{10}}", r"\boxed{x_{11}}", "x_{10}"),
    (r"\boxed{a_1 + a_2}", r"\boxed{a_1 + a_3}", "a_2 + a_1"),
    # a digit inside an expression or an equation: a coefficient, an index in a term
    (r"\boxed{3y + 2x = 6}", r"\boxed{2x + 3y = 7}", "2x + 3y = 6"),
    (r"\boxed{y = 3 + 2x_1}", r"\boxed{y = 2x_2 + 3}", "y = 2x_1 + 3"),
    (r"\boxed{2\sqrt{3}}", r"\boxed{2\sqrt{5}}", r"2\sqrt{3}"),
    # an empty subscript, as models name a quantity: the digits of the expression still count
    (r"\boxed{X_{}=125-1.26P}", r"\boxed{X_{}=125-1.25P}", "X_{}=125-1.26P"),
    (r"\boxed{Y_{} = 3x + 2}", r"\boxed{Y_{} = 3x + 3}", "Y_{} = 3x + 2"),
]

REAL_MODEL_FORMS = [
    # a unit word after a fraction or after a number in scientific notation
    (r"\boxed{\frac{9}{7} dollars}", r"\boxed{\frac{9}{8} dollars}", r"\frac{9}{7}"),
    (r"\boxed{\frac{9}{7} \text{ dollars}}", r"\boxed{\frac{10}{7} \text{ dollars}}", r"\frac{9}{7}"),
    (r"\boxed{\dfrac{3}{4} cups}", r"\boxed{\dfrac{3}{5} cups}", "0.75"),
    (r"\boxed{4.5e33 dollars}", r"\boxed{4.6e33 dollars}", r"4.5 \times 10^{33}"),
    (r"\boxed{4.5 \times 10^{33} \text{ dollars}}", r"\boxed{4.5 \times 10^{34} \text{ dollars}}", "4.5e33"),
    # times of day: the clock reading, either way it is written; a.m. is never p.m.
    (r"\boxed{3:30 p.m.}", r"\boxed{3:40 p.m.}", "3:30 p.m."),
    (r"\boxed{3:30 \text{ p.m.}}", r"\boxed{3:30 \text{ a.m.}}", "3:30 p.m."),
    (r"\boxed{15:30}", r"\boxed{15:40}", "3:30 p.m."),
    (r"\boxed{3:30 PM}", r"\boxed{4:30 PM}", "3:30 p.m."),
    (r"\boxed{9:05am}", r"\boxed{9:50 a.m.}", "9:05 a.m."),
    ("The answer is 3:30 p.m.", "The answer is 3:30 a.m.", "3:30 PM"),
    (r"\boxed{3:30}", r"\boxed{3:35}", "3:30 p.m."),  # no a.m./p.m.: either half of the day
]


@pytest.mark.parametrize(("right", "wrong", "gold"), UNITS + TOLERANCE + SUBSCRIPTS + REAL_MODEL_FORMS)
def test_the_equivalent_form_is_accepted_and_a_one_digit_change_refused(right, wrong, gold):
    assert is_correct(right, gold), (right, gold)
    assert not is_correct(wrong, gold), (wrong, gold)


@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        (r"\boxed{5x}", "5", False),  # a letter against the number: an expression, not a unit
        (r"\boxed{2 \text{ apples and } 3}", "2", False),  # a second number after the words
        (r"\boxed{\log_2 8}", "3", True),  # a command's subscript is its argument, not an index
        (r"\boxed{0}", "0.0", True),
        (r"\boxed{0.001}", "0.0", False),
        (r"\boxed{12346}", "12345", False),  # an integer gold is exact
        (r"\boxed{15:30}", "3:30 a.m.", False),  # the 24-hour clock fixes the half of the day
        (r"\boxed{330}", "3:30 p.m.", False),  # a number is not a time
        (r"\boxed{3:2}", "1.5", True),  # a ratio with a one-digit side is no clock reading
    ],
)
def test_what_the_rules_leave_alone(text, gold, correct):
    assert is_correct(text, gold) is correct


@pytest.mark.parametrize(
    ("answer", "number"),
    [
        ("18 dollars", "18"),
        (r"18 \text{dollars}", "18"),
        ("5 m/s", "5"),
        (r"10 \text{ cm}^2", "10"),
        ("1,000 people", "1000"),
        ("5x", "5x"),
        ("2 apples and 3", "2 apples and 3"),
        ("18", "18"),
        ("x dollars", "x dollars"),
        (r"\frac{9}{7} dollars", r"\frac{9}{7}"),
        (r"4.5\times10^{33} dollars", r"4.5\times10^{33}"),
    ],
)
def test_without_unit(answer, number):
    assert without_unit(answer) == number


def test_subscripts_of_numbers_and_letters_only():
    assert subscripts(r"52_8 + x_{1 0} - \log_2 y") == ["10", "8"]
    assert subscripts("1" * 5000 + "_2") == ["2"]
