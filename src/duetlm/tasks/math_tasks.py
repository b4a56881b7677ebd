"""Free-form math benchmarks, graded with math-verify.

| task | hub default | fields | reference |
| --- | --- | --- | --- |
| gsm8k | openai/gsm8k (main, test), 1319 | question, answer ending "#### N" | Cobbe et al. 2021 |
| math500 | HuggingFaceH4/MATH-500 (test), 500 | problem, answer | Lightman et al. 2023 |
| aime24 | HuggingFaceH4/aime_2024 (train), 30 | problem, answer | AIME 2024 I and II |
| aime25 | math-ai/aime25 (test), 30 | problem, answer | AIME 2025 I and II |
| amc23 | math-ai/amc23 (test), 40 | problem/question, answer (a float: 27.0) | AMC 2023 |
| jsonl | (a user file) | question, answer (optional id, choices) | |
"""

from __future__ import annotations

from duetlm.grading import gold_from_gsm8k
from duetlm.tasks.registry import Example, Task, field_of, register


def _id(row: dict, index: int) -> str:
    for key in ("id", "unique_id", "ID"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    return str(index)


def _gsm8k(location: str, row: dict, index: int) -> Example:
    return Example(
        str(index), field_of(location, row, "question"), gold_from_gsm8k(field_of(location, row, "answer"))
    )


def _plain(location: str, row: dict, index: int) -> Example:
    return Example(
        _id(row, index), field_of(location, row, "problem", "question"), field_of(location, row, "answer")
    )


def _float_answer(location: str, row: dict, index: int) -> Example:
    example = _plain(location, row, index)
    gold = example.gold
    if gold.endswith(".0") and gold[:-2].lstrip("-").isdigit():
        gold = gold[:-2]  # AMC answers are stored as floats; 27.0 is the integer 27
    return Example(example.id, example.question, gold)


def _user_jsonl(location: str, row: dict, index: int) -> Example:
    choices = row.get("choices") or ()
    if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
        from duetlm.errors import InputError

        raise InputError(f"{location}: 'choices' must be a list of strings")
    return Example(
        _id(row, index),
        field_of(location, row, "question"),
        field_of(location, row, "answer"),
        tuple(choices),
    )


register(Task("gsm8k", _gsm8k, ("openai/gsm8k", "main", "test"), "grade-school math word problems"))
register(Task("math500", _plain, ("HuggingFaceH4/MATH-500", None, "test"), "MATH-500 competition problems"))
register(Task("aime24", _plain, ("HuggingFaceH4/aime_2024", None, "train"), "AIME 2024"))
register(Task("aime25", _plain, ("math-ai/aime25", None, "test"), "AIME 2025"))
register(Task("amc23", _float_answer, ("math-ai/amc23", None, "test"), "AMC 2023"))
register(Task("jsonl", _user_jsonl, None, "a user JSONL file with question and answer fields"))
