"""JSON Lines, read by the format's own rule: a record ends at `\\n` and nowhere else.

`str.splitlines()` also breaks at U+2028, U+2029, U+0085, form feeds and other separators
that JSON strings may hold raw, so a valid file would be read as broken records. Every JSONL
reader of the project (task files, eval results, training metrics) goes through here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from duetlm.errors import InputError

logger = logging.getLogger(__name__)

CutTail = Literal["error", "drop", "repair"]


def read_jsonl(path: str | Path, on_cut_tail: CutTail = "error") -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of `path`.

    A line that is not valid JSON is an `InputError` naming the file and line, except the
    last one when `on_cut_tail` says it may be a write cut off by a kill: `drop` skips it,
    `repair` also truncates the file to the records before it (so appends continue cleanly).
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    last_text = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, good_bytes = [], 0
    for index, line in enumerate(lines):
        number = index + 1
        if line.strip():
            try:
                records.append((number, json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError:
                raise InputError(f"{path}:{number}: not valid UTF-8") from None
            except json.JSONDecodeError as exc:
                if index == last_text and on_cut_tail != "error":
                    logger.warning("%s: dropping a cut-off last line (an interrupted write)", path)
                    if on_cut_tail == "repair":
                        with path.open("r+b") as handle:
                            handle.truncate(good_bytes)
                    break
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        good_bytes += len(line) + 1
    return records


def append_jsonl(path: str | Path, rows: Iterable[dict], sync: bool = True) -> None:
    """Append rows as one write; with `sync`, on disk before returning (a kill loses none)."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if not text:
        return
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
