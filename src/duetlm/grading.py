"""Answer extraction and checking (DESIGN section 1, "Answer extraction").

Math answers are the last `\\boxed{...}` of a response, compared to the gold answer with
math-verify (so `\\frac{1}{2}` equals `0.5` and `2\\sqrt2` equals `\\sqrt8`); multiple-choice
answers are the letter of the last `Answer: X` line. A response with nothing to extract is
wrong, and callers count it separately as `no_answer` rather than guessing.
"""

from __future__ import annotations

import re

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_CHOICE_LINE = re.compile(r"answer\s*[:：]\s*\(?\s*\$?\s*(?:\\text\{)?\s*([A-Z])\b", re.IGNORECASE)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance, or None."""
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        content = _balanced(text, match.end() - 1)
        if content is not None:
            return content.strip()
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


def extract_choice(text: str) -> str | None:
    """Letter of the last `Answer: X` line (case-insensitive, `(B)` and `$B$` accepted)."""
    matches = _CHOICE_LINE.findall(text)
    return matches[-1].upper() if matches else None


def extract_answer(text: str, choices: bool = False) -> str | None:
    return extract_choice(text) if choices else extract_boxed(text)


def gold_from_gsm8k(answer_field: str) -> str:
    """GSM8K golds end in `#### N`; N may carry thousands separators."""
    _, sep, tail = answer_field.rpartition("####")
    if not sep:
        return answer_field.strip()
    return tail.strip().replace(",", "")


def answers_match(predicted: str, gold: str) -> bool:
    """math-verify equivalence of two bare answers, with an exact-string shortcut."""
    if predicted.strip() == gold.strip():
        return True
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}")
    predicted_parsed = parse(f"\\boxed{{{predicted}}}")
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed))


def is_correct(response_text: str, gold: str) -> bool:
    """Whether a full response's extracted answer equals `gold`. A single-letter gold is graded
    as multiple choice; anything else as math. No extractable answer is wrong."""
    is_letter = len(gold.strip()) == 1 and gold.strip().isalpha() and gold.strip().isupper()
    predicted = extract_answer(response_text, choices=is_letter)
    if predicted is None and is_letter:
        boxed = extract_boxed(response_text)
        predicted = boxed if boxed and len(boxed) == 1 else None
    if predicted is None:
        return False
    if is_letter:
        return predicted.upper() == gold.strip()
    return answers_match(predicted, gold)
