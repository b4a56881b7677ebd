"""Answers that are numbers, compared as numbers: exactly when the gold is an integer, and
otherwise to the precision the gold states.

math-verify rounds plain decimals to 6 places before it compares them, so `0.0` equals a gold
of 3.509e-07 and 2.88e-19 equals 1.325e-27: every answer at the scale of physics and
chemistry constants is accepted. Here a number equals a gold written as a decimal when it
differs from it by no more than the smaller of `RTOL` relative to the gold and half a unit in
the gold's last written digit: 3244048.1 is not 3244047.1 (a relative 1e-4 would allow 324),
and 0.5 still needs the relative 1e-4 (half its last digit would allow 0.54). A gold that is
exact but not an integer (a fraction) keeps the relative tolerance, so a decimal approximation
of enough digits (`0.3333` for 1/3) is accepted. An absolute floor, `ZERO_ATOL`, applies only
to a gold of exactly 0. A gold written as
an integer (counts, AIME answers, GSM8K totals) must be matched exactly: a relative tolerance
would accept 12,346 for 12,345. Numbers are read as `Decimal`s, which have no length limit,
so a 5,000-digit answer is compared and never raises (Python's int refuses strings of more
than 4,300 digits).

Qwen2.5-Math's evaluation (`math_equal`, from math-evaluation-harness) also compares numbers
with a relative tolerance of 1e-4, but for integers too, and it accepts a prediction 100
times or 1/100 of the gold (percentages); lighteval uses math-verify as it is (6 places).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext

RTOL = Decimal("1e-4")
"""Relative tolerance between a number and a non-integer gold."""

ZERO_ATOL = Decimal("1e-9")
"""What a number may be off from a gold of exactly zero written as a decimal (`0.0`)."""

MAX_DIGITS = 4300
"""Longer digit runs are compared only as numbers here, never handed to sympy."""

_SIGN = r"(?P<sign>[-+]?)\s*"
_DECIMAL = r"(?P<digits>\d+(?:\.\d*)?|\.\d+)"
_EXPONENT = r"(?:\s*(?:\\times|\\cdot|×|\*)\s*10\s*\^\s*(?:\{\s*(?P<exp1>[-+]?\d+)\s*\}|(?P<exp2>[-+]?\d)))?"
_PLAIN = re.compile(_SIGN + _DECIMAL + _EXPONENT)
_POWER_OF_TEN = re.compile(_SIGN + r"10\s*\^\s*(?:\{\s*(?P<exp1>[-+]?\d+)\s*\}|(?P<exp2>[-+]?\d))")
_FRACTION = re.compile(
    _SIGN
    + r"(?:\\[dt]?frac\s*\{\s*(?P<num1>\d+)\s*\}\s*\{\s*(?P<den1>\d+)\s*\}|(?P<num2>\d+)\s*/\s*(?P<den2>\d+))"
)
_DIGIT_RUN = re.compile(r"\d+")


@dataclass(frozen=True)
class Number:
    value: Decimal
    integer: bool  # written as an integer: no point, exponent or fraction
    written: bool = True  # its digits are as written (a decimal), not a fraction's quotient

    @property
    def half_last_digit(self) -> Decimal | None:
        """Half a unit in the last written digit (0.05 for 3244047.1, 5e-11 for 3.509e-7)."""
        if not self.written:
            return None
        return Decimal(5).scaleb(self.value.as_tuple().exponent - 1)


def parse_number(text: str) -> Number | None:
    """`text` as a number when it is one plainly written (`-12`, `3.5`, `.5`, `3.509\\times10^{-7}`,
    `10^{-3}`, `\\frac{1}{2}`, `3/4`), else None."""
    text = text.strip()
    try:
        match = _PLAIN.fullmatch(text)
        if match:
            exponent = match.group("exp1") or match.group("exp2")
            value = Decimal(match.group("digits"))
            if exponent is not None:
                value = value.scaleb(int(exponent))
            integer = exponent is None and "." not in match.group("digits")
            return Number(_signed(value, match), integer)
        match = _POWER_OF_TEN.fullmatch(text)
        if match:
            exponent = int(match.group("exp1") or match.group("exp2"))
            return Number(_signed(Decimal(1).scaleb(exponent), match), False)
        match = _FRACTION.fullmatch(text)
        if match:
            numerator = Decimal(match.group("num1") or match.group("num2"))
            denominator = Decimal(match.group("den1") or match.group("den2"))
            if denominator == 0:
                return None
            with localcontext() as context:
                context.prec = 60
                return Number(_signed(numerator / denominator, match), False, written=False)
    except (InvalidOperation, ValueError, OverflowError):
        return None
    return None


def _signed(value: Decimal, match: re.Match) -> Decimal:
    return -value if match.group("sign") == "-" else value


def numbers_equal(predicted: Number, gold: Number, rtol: Decimal = RTOL) -> bool:
    """Exactly equal for an integer gold; otherwise within `rtol` of the gold and, for a gold
    written as a decimal, within half a unit of its last written digit (the module says why)."""
    if gold.integer:
        return predicted.value == gold.value
    with localcontext() as context:
        context.prec = 60
        if gold.value == 0:
            return abs(predicted.value) <= ZERO_ATOL
        tolerance = rtol * abs(gold.value)
        if gold.half_last_digit is not None:
            tolerance = min(tolerance, gold.half_last_digit)
        return abs(predicted.value - gold.value) <= tolerance


def close_floats(predicted: complex, gold: complex, rtol: float = float(RTOL)) -> bool:
    """The tolerance test on two values sympy evaluated."""
    if gold == 0:
        return abs(predicted) <= float(ZERO_ATOL)
    return abs(predicted - gold) <= rtol * abs(gold)


def has_long_digits(text: str) -> bool:
    """A digit run longer than `MAX_DIGITS` (found in one linear pass)."""
    return any(match.end() - match.start() > MAX_DIGITS for match in _DIGIT_RUN.finditer(text))
