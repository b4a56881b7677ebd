"""Finding the answer in a response, as reasoning models write it (docs/design.md section 1).

Math: the last `\\boxed{...}`; when there is none, the last final-answer phrase
(`The final answer is $42$`, `**Answer:** 42`), and last of all the last expression in the
text (the last `$...$` or number), the fallbacks math-verify's own extraction allows. Multiple
choice: the last of `Answer: X` lines, `the answer is (X)` phrases and boxed letters, in every
wrapping models use (`**B**`, `(B)`, `$B$`, `\\text{(B)}`), but never a letter that starts a
word (`Answer: a mixture of...` is no answer). Each answer carries the rule that found it, so
reports can say how many answers came from a fallback instead of hiding them.

Only the last `WINDOW_CHARS` characters of a response are read: the final answer is at the end,
and a model caught in a repetition loop writes hundreds of kilobytes that must not cost a
training step or an evaluation a minute. Within the window every rule runs in linear time:
braces are matched in one pass, `$...$` spans are found by one scan, and no pattern can
backtrack over the window.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

RULES = ("boxed", "answer_line", "answer_phrase", "last_expression")
FALLBACK_RULES = ("answer_phrase", "last_expression")
"""Rules that read an answer the response did not mark with a box or an `Answer:` line."""


WINDOW_CHARS = 16_384
"""How much of a response's end is read for its final answer (about 4,000 tokens)."""


@dataclass(frozen=True)
class Extracted:
    """An answer found in a response: its text, which rule found it, and where it starts."""

    answer: str
    rule: str
    position: int


_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
# each optional piece owns the whitespace after it, so no two `\s*` meet (no quadratic retries)
_BOLD = r"(?:(?:\*\*|__)\s*)?"
_ANSWER_WORD = r"(?i:\banswer)"
# `**Answer:** 42`, `**Answer**: 42`, `Answer: 42`, `Final answer: 42`
_ANSWER_LINE = rf"(?:\*\*|__)?{_ANSWER_WORD}(?:\*\*|__)?[ \t]*[:：]\s*{_BOLD}"
# `The final answer is $42$`, `the answer is: **B**`, `the correct option is (C)`
_ANSWER_PHRASE = r"(?i:\b(?:answer|option|choice)[ \t]+is)[ \t]*:?\s*" + _BOLD
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_PHRASE_END = re.compile(r"\.(?:\s|$)|\n|(?:\s+I hope\b)", re.IGNORECASE)
_JOINER = re.compile(r"\s*(?:,|\band\b|&)\s*")  # between the parts of `$69$ and $84$`


def tail(text: str) -> str:
    """The part of a response that is read for its final answer."""
    return text[-WINDOW_CHARS:]


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance, or None."""
    found = _last_boxed(tail(text))
    return found[0] if found else None


def matching_braces(text: str) -> dict[int, int]:
    """Position of each `{` whose `}` closes it, mapped to that `}`: one pass with a stack."""
    pairs, stack = {}, []
    for index, char in enumerate(text):
        if char == "{":
            stack.append(index)
        elif char == "}" and stack:
            pairs[stack.pop()] = index
    return pairs


def _boxes(text: str) -> list[tuple[str, int]]:
    """Every box whose braces balance: (content, start), in order."""
    pairs = matching_braces(text) if "{" in text else {}
    found = []
    for match in _BOX_OPEN.finditer(text):
        close = pairs.get(match.end() - 1)
        if close is not None:
            found.append((text[match.end() : close], match.start()))
    return found


def _last_boxed(text: str) -> tuple[str, int] | None:
    boxes = _boxes(text)
    return (boxes[-1][0].strip(), boxes[-1][1]) if boxes else None


def delimited_spans(text: str) -> list[tuple[int, int, str]]:
    """The `$$...$$`, `$...$`, `\\(...\\)` and `\\[...\\]` expressions of a text, as
    (start, end, content), found by one left-to-right scan (an escaped `\\$` is a dollar sign).
    A delimiter that never closes opens nothing."""
    spans = []
    index, n = 0, len(text)
    while index < n:
        char = text[index]
        if char == "\\" and index + 1 < n:
            follower = text[index + 1]
            if follower in "([":
                closing = "\\)" if follower == "(" else "\\]"
                end = text.find(closing, index + 2)
                if end >= 0:
                    spans.append((index, end + 2, text[index + 2 : end]))
                    index = end + 2
                    continue
            index += 2  # an escaped character (`\\$`) or a command
            continue
        if char == "$":
            delimiter = "$$" if text.startswith("$$", index) else "$"
            end = _unescaped(text, delimiter, index + len(delimiter))
            if end >= 0:
                spans.append((index, end + len(delimiter), text[index + len(delimiter) : end]))
                index = end + len(delimiter)
                continue
        index += 1
    return spans


def _unescaped(text: str, delimiter: str, start: int) -> int:
    """Where `delimiter` next occurs unescaped at or after `start`, or -1."""
    while True:
        found = text.find(delimiter, start)
        if found <= 0 or text[found - 1] != "\\":
            return found
        start = found + 1


# --- multiple choice ---------------------------------------------------------------------


def _letter_token(letters: str) -> str:
    """A letter as models wrap it, followed by something that cannot continue a word: the end
    of the line, punctuation or markup (`B`, `(B)`, `**B**`, `$B$`, `\\text{B}`, `B) text`).
    `A mixture` fails: a capital followed by a space and a word is an article, not a choice."""
    cls = f"[{re.escape(letters)}]"
    return (
        r"(?:\$\s*)?(?:\\text(?:bf)?\s*\{\s*)?" + _BOLD + r"(?:[\(\[]\s*)?"
        rf"(?P<letter>{cls})"
        r"(?=[ \t]*(?:$|[\n.,;:!?\)\]\}*$_]|[ \t]+[^\w\s]))"
    )


def _choice_patterns(letters: str) -> list[tuple[str, re.Pattern]]:
    token = _letter_token(letters)
    named = r"(?:(?i:option|choice)[ \t]+)?"  # `the answer is option C`
    return [
        ("answer_line", re.compile(_ANSWER_LINE + named + token, re.MULTILINE)),
        ("answer_phrase", re.compile(_ANSWER_PHRASE + named + token, re.MULTILINE)),
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
    text = tail(text)
    found: list[Extracted] = []
    for rule, pattern in _choice_patterns(letters):
        found += [Extracted(m.group("letter"), rule, m.start()) for m in pattern.finditer(text)]
    for content, start in _boxes(text):
        letter = letter_of_boxed(content, letters)
        if letter is not None:
            found.append(Extracted(letter, "boxed", start))
    return max(found, key=lambda e: e.position) if found else None


# --- math --------------------------------------------------------------------------------


def _phrase_answer(text: str, spans: list[tuple[int, int, str]]) -> Extracted | None:
    """The expression after the last final-answer phrase: the `$...$`-delimited ones when it
    opens with a delimiter (`$69$ and $84$` reads as `69, 84`), else the rest of the sentence."""
    matches = list(re.finditer(rf"(?:{_ANSWER_LINE}|{_ANSWER_PHRASE})", text, re.MULTILINE))
    starts = {start: i for i, (start, _, _) in enumerate(spans)}
    for match in reversed(matches):
        position = match.end()
        if position in starts:
            answer = _joined_spans(text, spans, starts[position])
        else:
            rest = text[position:]
            end = _PHRASE_END.search(rest)
            answer = rest[: end.start()] if end else rest
        answer = answer.strip().strip("*_").strip().rstrip(".,;:")
        if answer:
            return Extracted(answer, "answer_phrase", match.start())
    return None


def _joined_spans(text: str, spans: list[tuple[int, int, str]], first: int) -> str:
    """The content of span `first` and of the spans that follow it joined by `,`, `and` or `&`
    in the same sentence."""
    parts = [spans[first][2].strip()]
    for (_, end, _), (start, _, content) in zip(spans[first:], spans[first + 1 :]):
        if not _JOINER.fullmatch(text[end:start]):
            break
        parts.append(content.strip())
    return ", ".join(p for p in parts if p)


def _last_expression(text: str, spans: list[tuple[int, int, str]]) -> Extracted | None:
    """The last delimited expression or bare number, whichever comes later (numbers inside a
    delimited expression belong to it)."""
    candidates = [(start, content.strip()) for start, _, content in spans if content.strip()]
    span_index = 0
    for match in _NUMBER.finditer(text):
        while span_index < len(spans) and spans[span_index][1] <= match.start():
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= match.start()
        if not inside:
            candidates.append((match.start(), match.group(0)))
    if not candidates:
        return None
    start, answer = max(candidates)
    return Extracted(answer.rstrip(".,;:"), "last_expression", start)


def extract_math(text: str, fallbacks: bool = True) -> Extracted | None:
    """The answer of a free-form response: the last box, else (with `fallbacks`) the last
    final-answer phrase, else the last expression."""
    text = tail(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return Extracted(boxed[0], "boxed", boxed[1])
    if not fallbacks:
        return None
    spans = delimited_spans(text)
    return _phrase_answer(text, spans) or _last_expression(text, spans)


def letters_for(n_choices: int) -> str:
    return string.ascii_uppercase[:n_choices]


def extract(text: str, letters: str = "") -> Extracted | None:
    """The answer of a response: a letter among `letters` for multiple choice, else math."""
    return extract_choice(text, letters) if letters else extract_math(text)
