"""Answer forms that math-verify misreads, rewritten before it parses them.

- `4.5e33` parses as 4.5·e·33 (Euler's number), so it never equals `4.5 \\times 10^{33}`:
  scientific notation becomes `4.5\\times10^{33}`.
- `111,\\! 111,\\! 111` (MATH writes thousands so) parses as the set {111}, which a wrong
  `\\boxed{111}` then equals: `\\!` and `\\,` go, and a whole answer that is one number with
  thousands separators loses them. A comma with a space and no `\\!` stays a list (`1, 234`).
"""

from __future__ import annotations

import re

_SCIENTIFIC = re.compile(r"(?<![\w\\.])(\d+(?:\.\d+)?)[eE]\+?(-?\d+)(?![\w.])")
_THIN_SPACE_IN_NUMBER = re.compile(r"(?<=\d)\s*\\,\s*(?=\d{3}(?!\d))")
_THOUSANDS_MARKED = re.compile(r"^(\\?\$)?\s*(-?\d{1,3}(?:\s*,\s*(?:\\!)?\s*\d{3})+(?:\.\d+)?)\s*(\\?\$)?$")
_THOUSANDS_PLAIN = re.compile(r"^(\\?\$)?(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?)(\\?\$)?$")


def normalize_answer(answer: str) -> str:
    """The same answer in a form math-verify reads as meant. Idempotent."""
    text = answer.strip()
    text = _THIN_SPACE_IN_NUMBER.sub("", text)
    marked = _THOUSANDS_MARKED.match(text) if "\\!" in text else None
    plain = _THOUSANDS_PLAIN.match(text)
    match = marked or plain
    if match:
        number = re.sub(r"[\s,]|\\!", "", match.group(2))
        return f"{match.group(1) or ''}{number}{match.group(3) or ''}"
    text = text.replace("\\!", "")
    return _SCIENTIFIC.sub(lambda m: f"{m.group(1)}\\times10^{{{m.group(2)}}}", text)
