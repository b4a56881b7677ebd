"""Finding the answer in a response, as reasoning models write it (DESIGN section 1).

Math: the last `\\boxed{...}`; when there is none, the last final-answer phrase
(`The final answer is $42$`, `**Answer:** 42`), and last of all the last expression in the
text (the last `$...$` or number), the fallbacks math-verify's own extraction allows. Multiple
choice: the last of `Answer: X` lines, `the answer is (X)` phrases and boxed letters, in every
wrapping models use (`**B**`, `(B)`, `$B$`, `\\text{(B)}`), but never a letter that starts a
word (`Answer: a mixture of...` is no answer). Each answer carries the rule that found it, so
reports can say how many answers came from a fallback instead of hiding them.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

RULES = ("boxed", "answer_line", "answer_phrase", "last_expression")
FALLBACK_RULES = ("answer_phrase", "last_expression")
"""Rules that read an answer the response did not mark with a box or an `Answer:` line."""


@dataclass(frozen=True)
class Extracted:
    """An answer found in a response: its text, which rule found it, and where it starts."""

    answer: str
    rule: str
    position: int


_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOLD = r"(?:\*\*|__)?"
_ANSWER_WORD = r"(?i:\banswer)"
# `**Answer:** 42`, `**Answer**: 42`, `Answer: 42`, `Final answer: 42`
_ANSWER_LINE = rf"{_BOLD}{_ANSWER_WORD}{_BOLD}\s*[:：]\s*{_BOLD}\s*"
# `The final answer is $42$`, `the answer is: **B**`, `the correct option is (C)`
_ANSWER_PHRASE = r"(?i:\b(?:answer|option|choice)\s+is)\s*:?\s*" + _BOLD + r"\s*"
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
_MATH_DELIMITED = re.compile(  # `\$` is a dollar sign, not a delimiter
    r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_PHRASE_END = re.compile(r"\.(?:\s|$)|\n|(?:\s+I hope\b)", re.IGNORECASE)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance, or None."""
    found = _last_boxed(text)
    return found[0] if found else None


def _last_boxed(text: str) -> tuple[str, int] | None:
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        content = _balanced(text, match.end() - 1)
        if content is not None:
            return content.strip(), match.start()
    return None


def _balanced(text: str, open_index: int) -> str | None:
    depth = 0
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
    return None


# --- multiple choice ---------------------------------------------------------------------


def _letter_token(letters: str) -> str:
    """A letter as models wrap it, followed by something that cannot continue a word: the end
    of the line, punctuation or markup (`B`, `(B)`, `**B**`, `$B$`, `\\text{B}`, `B) text`).
    `A mixture` fails: a capital followed by a space and a word is an article, not a choice."""
    cls = f"[{re.escape(letters)}]"
    return (
        r"(?:\$\s*)?(?:\\text(?:bf)?\s*\{\s*)?" + _BOLD + r"[\(\[]?\s*"
        rf"(?P<letter>{cls})"
        r"(?=[ \t]*(?:$|[\n.,;:!?\)\]\}*$_]|[ \t]+[^\w\s]))"
    )


def _choice_patterns(letters: str) -> list[tuple[str, re.Pattern]]:
    token = _letter_token(letters)
    return [
        ("answer_line", re.compile(_ANSWER_LINE + token, re.MULTILINE)),
        ("answer_phrase", re.compile(_ANSWER_PHRASE + token, re.MULTILINE)),
    ]


def letter_of_boxed(content: str, letters: str) -> str | None:
    """The letter a box holds: `B`, `(B)`, `\\text{(B)}`, `\\textbf{(B)}`, `B) 42`, or None."""
    inner = content
    for _ in range(3):  # nested wrappers: \boxed{\text{\textbf{(B)}}}
        inner = _WRAPPERS.sub(r"\1", inner)
    inner = inner.replace("$", "").strip()
    match = re.fullmatch(rf"[\(\[]?\s*([{re.escape(letters)}])\s*(?:[\)\].:](?:\s.*)?)?", inner, re.DOTALL)
    return match.group(1) if match else None


def extract_choice(text: str, letters: str = "ABCD") -> Extracted | None:
    """The last letter answer in `text` among `letters`, by any rule, or None."""
    found: list[Extracted] = []
    for rule, pattern in _choice_patterns(letters):
        found += [Extracted(m.group("letter"), rule, m.start()) for m in pattern.finditer(text)]
    for match in _BOX_OPEN.finditer(text):
        content = _balanced(text, match.end() - 1)
        letter = letter_of_boxed(content, letters) if content is not None else None
        if letter is not None:
            found.append(Extracted(letter, "boxed", match.start()))
    return max(found, key=lambda e: e.position) if found else None


# --- math --------------------------------------------------------------------------------


def _phrase_answer(text: str) -> Extracted | None:
    """The expression after the last final-answer phrase: a `$...$`-delimited one when it
    opens with a delimiter, else the rest of the sentence."""
    matches = list(re.finditer(rf"(?:{_ANSWER_LINE}|{_ANSWER_PHRASE})", text, re.MULTILINE))
    for match in reversed(matches):
        rest = text[match.end() :]
        delimited = _MATH_DELIMITED.match(rest)
        if delimited:
            answer = next(g for g in delimited.groups() if g is not None)
        else:
            end = _PHRASE_END.search(rest)
            answer = rest[: end.start()] if end else rest
        answer = answer.strip().strip("*_").strip().rstrip(".,;:")
        if answer:
            return Extracted(answer, "answer_phrase", match.start())
    return None


def _last_expression(text: str) -> Extracted | None:
    """The last `$...$` (or `\\(...\\)`, `\\[...\\]`) expression or bare number, whichever
    comes later."""
    delimited = list(_MATH_DELIMITED.finditer(text))
    candidates = [(m.start(), next(g for g in m.groups() if g is not None)) for m in delimited]
    inside = [m.span() for m in delimited]
    candidates += [
        (m.start(), m.group(0))
        for m in _NUMBER.finditer(text)
        if not any(start <= m.start() < end for start, end in inside)
    ]
    candidates = [(start, answer.strip()) for start, answer in candidates if answer.strip()]
    if not candidates:
        return None
    start, answer = max(candidates)
    return Extracted(answer.rstrip(".,;:"), "last_expression", start)


def extract_math(text: str, fallbacks: bool = True) -> Extracted | None:
    """The answer of a free-form response: the last box, else (with `fallbacks`) the last
    final-answer phrase, else the last expression."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return Extracted(boxed[0], "boxed", boxed[1])
    if not fallbacks:
        return None
    return _phrase_answer(text) or _last_expression(text)


def letters_for(n_choices: int) -> str:
    return string.ascii_uppercase[:n_choices]


def extract(text: str, letters: str = "") -> Extracted | None:
    """The answer of a response: a letter among `letters` for multiple choice, else math."""
    return extract_choice(text, letters) if letters else extract_math(text)
