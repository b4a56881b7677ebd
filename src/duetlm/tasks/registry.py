"""The task registry and the normalized example type."""

from __future__ import annotations

import csv
import json
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from duetlm.errors import ConfigError, InputError
from duetlm.grading import Grade
from duetlm.grading import grade as grade_response
from duetlm.jsonl import read_jsonl
from duetlm.problems import Problem
from duetlm.tasks.fields import FieldMap, read_parts


@dataclass(frozen=True)
class Example:
    """One benchmark item, normalized: `gold` is a bare answer (a number, an expression, or
    a letter for multiple choice)."""

    id: str
    question: str
    gold: str
    choices: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    also_accepted: tuple[str, ...] = ()
    """Further golds that count as right (a list gold: any element counts)."""

    @property
    def golds(self) -> tuple[str, ...]:
        return (self.gold, *self.also_accepted)

    @property
    def problem(self) -> Problem:
        return Problem(self.question, self.choices)


class TaskExamples(Sequence[Example]):
    """The examples of one task: a sequence (len, index, iterate) with the task's name."""

    def __init__(self, name: str, examples: list[Example], source: str) -> None:
        self.name, self.source, self._examples = name, source, examples
        seen: set[str] = set()
        for example in examples:
            if example.id in seen:
                raise InputError(
                    f"task {name} ({source}): the id {example.id!r} appears twice; ids must be unique "
                    "(map another field with --field id=NAME)"
                )
            seen.add(example.id)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index):
        return self._examples[index]

    def __iter__(self) -> Iterator[Example]:
        return iter(self._examples)


Rows = list[tuple[str, dict]]  # (location for error messages, raw row)


@dataclass(frozen=True)
class Task:
    """Where a task's rows come from by default and which fields hold what. A task with a
    `loader` (the generated builtin task, GPQA's option shuffling) builds its examples itself."""

    name: str
    fields: FieldMap | None = None
    hub: tuple[str, str | None, str] | None = None  # (dataset id, config, split)
    description: str = ""
    multiple_choice: bool = False
    loader: Callable[..., TaskExamples] | None = None
    constants: tuple[tuple[str, object], ...] = ()
    """Metadata every example of the task carries (AIME 2024's `year`), for `report --by`."""


def read_rows(path: Path) -> Rows:
    """Rows of a local JSONL, JSON, CSV or parquet file; errors name the file and line."""
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, row in read_jsonl(path):
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object")
            rows.append((f"{path}:{number}", row))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of objects")
        return [(f"{path}[{i}]", row) for i, row in enumerate(data)]
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return [(f"{path}:{i + 2}", row) for i, row in enumerate(csv.DictReader(handle))]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}[{i}]", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raise InputError(f"data file {path}: use .jsonl, .json, .csv or .parquet")


def hub_rows(dataset: str, config: str | None, split: str, task: str = "TASK") -> Rows:
    """A hub dataset's rows; `task` names the task in the hint to read a local copy instead."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise ConfigError(
            f"loading from the hub needs `datasets` (pip install datasets), or pass --data {task}=PATH"
        ) from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    unreachable = None if offline else hub_unreachable()
    if unreachable is not None:
        raise InputError(
            f"could not load {dataset} ({config or 'default'}, {split}): the Hugging Face hub is not reachable "
            f"from here ({unreachable}). Pass --data {task}=PATH to read a local copy (or set HF_HUB_OFFLINE=1 "
            "to read a copy the datasets cache already holds)."
        )
    try:
        data = load_dataset(dataset, config, split=split)
    except Exception as exc:  # the datasets library raises many unrelated types
        raise InputError(
            f"could not load {dataset} ({config or 'default'}, {split}) from the hub: {exc}. "
            f"Pass --data {task}=PATH to read a local copy."
        ) from exc
    return [(f"{dataset}[{i}]", dict(row)) for i, row in enumerate(data)]


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one DNS lookup and one TCP connection, within
    `timeout_s`), or None when it can. The datasets library retries a dead network for about
    half a minute before it fails; this says so at once."""
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def load_task(
    name: str,
    data: str | Path | None = None,
    fields: dict[str, str] | None = None,
    split: str | None = None,
    **options,
) -> TaskExamples:
    """The examples of a named task, from `data` when given, else from the task's default
    source. `jsonl:PATH` names a user file (`question`, `answer`, optional `choices`).
    `split` picks another split of a hub task or of the builtin task (`train`).
    `fields` maps the file's own field names (see `duetlm.tasks.fields`):

        load_task("jsonl:svamp.json", fields={"question": "{Body} {Question}", "answer": "Answer"})
    """
    from duetlm.tasks import builtin_task, gpqa, math_tasks  # noqa: F401 (registration)

    if name.startswith("jsonl:"):
        data, name = name.removeprefix("jsonl:"), "jsonl"
    if name not in TASKS:
        known = ", ".join(sorted(t for t in TASKS if t != "jsonl"))
        raise ConfigError(
            f"unknown task {name!r}; known tasks: {known}, and jsonl:PATH for a file of your own"
        )
    task = TASKS[name]
    if task.loader is not None:
        if fields:
            raise ConfigError(
                f"task {name} reads fixed fields and takes no field mapping; "
                "for another file layout use jsonl:PATH with --field"
            )
        return task.loader(data, **options, **({"split": split} if split else {}))
    if options:
        raise ConfigError(f"task {name} takes no options (got {', '.join(options)})")
    assert task.fields is not None
    field_map = task.fields.with_overrides(fields)
    if data is not None:
        rows, source = read_rows(Path(data)), str(data)
    elif task.hub is not None:
        dataset, config, default_split = task.hub
        rows, source = (
            hub_rows(dataset, config, split or default_split, name),
            f"{dataset} ({split or default_split})",
        )
    else:
        raise ConfigError(f"task {name} needs a data file: pass --data {name}=PATH")
    if not rows:
        raise InputError(f"task {name}: {source} holds no rows")
    constants = dict(task.constants)
    return TaskExamples(
        name, [example_of(loc, row, i, field_map, constants) for i, (loc, row) in enumerate(rows)], source
    )


def example_of(
    location: str, row: dict, index: int, field_map: FieldMap, constants: dict | None = None
) -> Example:
    parts = read_parts(location, row, field_map)
    return Example(
        parts.id if parts.id is not None else str(index),
        parts.question,
        parts.golds[0],
        parts.choices,
        meta=(constants or {}) | parts.meta,
        also_accepted=parts.golds[1:],
    )


def grade(text: str, example: Example) -> Grade:
    """The verdict of `duetlm.grading.grade` on a response to `example`."""
    return grade_response(text, example.golds, example.choices)
