"""Which fields of a data file hold the question, the answer, the options and the id.

Public sets name their fields in many ways (`problem`, `input`, `Body` + `Question`,
`target`, `final_answer` as a list, a gold boxed inside `solution`), so every task reads its
rows through a `FieldMap`, and a user may override any part of it. A field expression is:

- a field name, `|` between alternatives (the first present wins): `problem|question`;
  dots reach into nested objects and lists: `choices.text`, `answers.0`;
- a format string over the row's fields: `{Body} {Question}`;
- `boxed:EXPR`: the last `\\boxed{}` in the text of EXPR (MATH's `solution`);
- `####:EXPR`: the text after the last `####` (GSM8K's `answer`), thousands separators dropped.

The answer may be a list: then any of its elements counts as right. `choices` is one list
field, or several fields joined by commas (`A,B,C,D`), optional when it ends in `?`; with options, the answer may be the
letter, a 0-based integer index, or the text of the right option.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field, fields, replace

from duetlm.errors import ConfigError, InputError
from duetlm.grading import extract_boxed, gold_from_gsm8k

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_TRANSFORMS = {"boxed": "the last \\boxed{} of", "####": "the text after the last #### of"}


@dataclass(frozen=True)
class FieldMap:
    """Field expressions for each part of an example (see the module docstring)."""

    question: str = "question"
    answer: str = "answer"
    choices: str | None = None
    id: str = "id|unique_id|ID|Record ID"
    meta: tuple[tuple[str, str], ...] = ()
    """(name, expression) pairs kept on each example's `meta` for `duet report --by NAME`; a
    row without the field simply lacks the name."""

    def with_overrides(self, overrides: dict[str, str] | None) -> FieldMap:
        """This map with some parts replaced; `meta.NAME` keys add metadata fields; other
        unknown parts are a ConfigError."""
        if not overrides:
            return self
        empty = [k for k, v in overrides.items() if not str(v).strip()]
        if empty:
            raise ConfigError(f"field mapping {empty[0]!r} is empty")
        meta = {k.removeprefix("meta."): v for k, v in overrides.items() if k.startswith("meta.")}
        parts = {k: v for k, v in overrides.items() if not k.startswith("meta.")}
        known = {f.name for f in fields(self)} - {"meta"}
        unknown = sorted(set(parts) - known)
        if unknown or "" in meta:
            raise ConfigError(
                f"unknown field mapping key {', '.join(map(repr, unknown or ['meta.']))}: use "
                f"{', '.join(sorted(known))}, or meta.NAME for a field to keep on each example "
                "(e.g. --field question='{Body} {Question}' --field answer=Answer --field meta.level=Level)"
            )
        return replace(self, **parts, meta=tuple((dict(self.meta) | meta).items()))


class _Missing(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _lookup(row: dict, path: str):
    value = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, list | tuple)
            and part.lstrip("-").isdigit()
            and -len(value) <= int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            raise _Missing(path)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Missing(path)
    return value


def _evaluate(row: dict, expression: str):
    """The value an expression names in `row` (text, number or list); _Missing if absent."""
    head, colon, rest = expression.partition(":")
    if colon and head in _TRANSFORMS:
        text = _as_text(_evaluate(row, rest))
        if head == "boxed":
            boxed = extract_boxed(text)
            if boxed is None:
                raise _Missing(f"a \\boxed{{}} in {rest!r}")
            return boxed
        return gold_from_gsm8k(text)
    if _PLACEHOLDER.search(expression):
        return _PLACEHOLDER.sub(lambda m: _as_text(_evaluate(row, m.group(1))), expression).strip()
    alternatives = expression.split("|")
    for name in alternatives:
        try:
            return _lookup(row, name.strip())
        except _Missing:
            continue
    raise _Missing(" or ".join(repr(a.strip()) for a in alternatives))


def _as_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # answers stored as floats (AMC's 27.0) are integers
    if isinstance(value, list | tuple | dict):
        raise _Missing("a text field (found a list or object)")
    return str(value).strip()


def _missing_error(location: str, part: str, missing: _Missing, row: dict) -> InputError:
    have = ", ".join(repr(k) for k in row) or "none"
    name = missing.name if missing.name.startswith(("'", "a ")) else repr(missing.name)
    return InputError(
        f"{location}: no {name} for the {part} (the row's fields: {have}); map it with --field {part}=..."
    )


def read_text(location: str, row: dict, expression: str, part: str) -> str:
    """One field expression of a row as text; errors as `read_parts`'s."""
    try:
        return _as_text(_evaluate(row, expression))
    except _Missing as missing:
        raise _missing_error(location, part, missing, row) from None


@dataclass(frozen=True)
class Parts:
    """One row, read through a FieldMap."""

    id: str | None
    question: str
    golds: tuple[str, ...]
    choices: tuple[str, ...]
    meta: dict = field(default_factory=dict)


def read_parts(location: str, row: dict, field_map: FieldMap) -> Parts:
    """The question, golds, options and id of a row; errors name the row, the missing field
    and the fields the row has."""

    def get(part: str, expression: str):
        try:
            return _evaluate(row, expression)
        except _Missing as missing:
            raise _missing_error(location, part, missing, row) from None

    question = _as_text_or_error(location, "question", get("question", field_map.question), row)
    choices: tuple[str, ...] = ()
    if field_map.choices:
        optional = field_map.choices.endswith("?")
        expression = field_map.choices.removesuffix("?")
        try:
            present = optional is False or _evaluate(row, expression) is not None
        except _Missing:
            present = False
        if present:
            choices = _choices(location, row, expression, get)
    answer = get("answer", field_map.answer)
    answers = list(answer) if isinstance(answer, list | tuple) else [answer]
    if not answers:
        raise InputError(f"{location}: the answer list is empty")
    golds = tuple(_gold(location, a, choices, row) for a in answers)
    try:
        ident = _as_text(_evaluate(row, field_map.id))
    except _Missing:
        ident = None
    return Parts(ident, question, golds, choices, read_meta(row, field_map.meta))


def read_meta(row: dict, meta: tuple[tuple[str, str], ...]) -> dict:
    """The metadata fields a row has, as scalars (a float that is an integer as an int)."""
    values = {}
    for name, expression in meta:
        try:
            value = _evaluate(row, expression)
        except _Missing:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        values[name] = value if isinstance(value, int | float | bool) else _safe_text(value)
    return values


def _safe_text(value) -> str:
    try:
        return _as_text(value)
    except _Missing:
        return str(value)


def _as_text_or_error(location: str, part: str, value, row: dict) -> str:
    try:
        return _as_text(value)
    except _Missing as missing:
        raise _missing_error(location, part, missing, row) from None


def _choices(location: str, row: dict, expression: str, get) -> tuple[str, ...]:
    names = [n.strip() for n in expression.split(",")] if "," in expression else [expression]
    if len(names) > 1:
        options = [get("choices", name) for name in names]
    else:
        options = get("choices", expression)
        if not isinstance(options, list | tuple):
            raise InputError(
                f"{location}: the choices field {expression!r} is not a list (give several fields: A,B,C,D)"
            )
    if len(options) > 26 or len(options) < 2:
        raise InputError(f"{location}: {len(options)} options; a question takes 2 to 26")
    return tuple(_as_text_or_error(location, "choices", o, row) for o in options)


def _gold(location: str, value, choices: tuple[str, ...], row: dict) -> str:
    """A bare gold: for multiple choice always a letter."""
    if not choices:
        return _as_text_or_error(location, "answer", value, row)
    letters = string.ascii_uppercase[: len(choices)]
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(choices):
            return letters[value]
        raise InputError(f"{location}: answer index {value} is outside the {len(choices)} options")
    text = str(value).strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    stripped = text.strip("()").strip()
    if len(stripped) == 1 and stripped in letters:
        return stripped
    matching = [letters[i] for i, option in enumerate(choices) if option == text]
    if len(matching) == 1:
        return matching[0]
    raise InputError(
        f"{location}: answer {text!r} is not a letter among {letters}, a 0-based index, or the text of one option"
    )
