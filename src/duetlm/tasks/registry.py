"""The task registry and the normalized example type."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from duetlm.errors import ConfigError, InputError
from duetlm.grading import answers_match, extract_boxed, extract_choice
from duetlm.protocol import Problem


@dataclass(frozen=True)
class Example:
    """One benchmark item, normalized: `gold` is a bare answer (a number, an expression, or
    a letter for multiple choice)."""

    id: str
    question: str
    gold: str
    choices: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def problem(self) -> Problem:
        return Problem(self.question, self.choices)


class TaskExamples(Sequence[Example]):
    """The examples of one task: a sequence (len, index, iterate) with the task's name."""

    def __init__(self, name: str, examples: list[Example], source: str) -> None:
        self.name, self.source, self._examples = name, source, examples
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            raise InputError(f"task {name} ({source}): example ids are not unique")

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index):
        return self._examples[index]

    def __iter__(self) -> Iterator[Example]:
        return iter(self._examples)


Rows = list[tuple[str, dict]]  # (location for error messages, raw row)


@dataclass(frozen=True)
class Task:
    """A loader (raw rows -> examples) and where its data lives by default."""

    name: str
    normalize: Callable[[str, dict, int], Example]
    hub: tuple[str, str | None, str] | None = None  # (dataset id, config, split)
    description: str = ""
    multiple_choice: bool = False


def read_rows(path: Path) -> Rows:
    """Rows of a local JSONL, JSON, CSV or parquet file; errors name the file and line."""
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
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


def hub_rows(dataset: str, config: str | None, split: str) -> Rows:
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise ConfigError("loading from the hub needs `datasets`: pip install 'duetlm[eval]'") from exc
    try:
        data = load_dataset(dataset, config, split=split)
    except Exception as exc:  # the datasets library raises many unrelated types
        raise InputError(
            f"could not load {dataset} ({config or 'default'}, {split}) from the hub: {exc}. "
            "Pass --data PATH to read a local copy."
        ) from exc
    return [(f"{dataset}[{i}]", dict(row)) for i, row in enumerate(data)]


def field_of(location: str, row: dict, *names: str) -> str:
    """The first present field among `names`, as text; a clear error when none is."""
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip() != "":
            return str(value)
    raise InputError(f"{location}: missing field {' or '.join(repr(n) for n in names)}")


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def load_task(name: str, data: str | Path | None = None, **options) -> TaskExamples:
    """The examples of a named task, from `data` when given, else from the task's default
    source. `jsonl:PATH` names a user file with `question` and `answer` fields."""
    from duetlm.tasks import builtin_task, gpqa, math_tasks  # noqa: F401 (registration)

    if name.startswith("jsonl:"):
        data, name = name.removeprefix("jsonl:"), "jsonl"
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, jsonl:PATH")
    task = TASKS[name]
    if name == "builtin":
        return builtin_task.load(data, **options)
    if name == "gpqa_diamond":
        return gpqa.load(data, **options)
    if options:
        raise ConfigError(f"task {name} takes no options (got {', '.join(options)})")
    if data is not None:
        rows, source = read_rows(Path(data)), str(data)
    elif task.hub is not None:
        rows, source = hub_rows(*task.hub), task.hub[0]
    else:
        raise ConfigError(f"task {name} needs a data file: pass --data PATH")
    if not rows:
        raise InputError(f"task {name}: {source} holds no rows")
    return TaskExamples(name, [task.normalize(loc, row, i) for i, (loc, row) in enumerate(rows)], source)


def grade(text: str, example: Example) -> tuple[bool, str | None]:
    """(correct, extracted answer) for a response; no extracted answer is wrong."""
    if example.choices:
        predicted = extract_choice(text)
        return predicted is not None and predicted == example.gold, predicted
    predicted = extract_boxed(text)
    return predicted is not None and answers_match(predicted, example.gold), predicted
