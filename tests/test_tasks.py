"""Task loaders on the real benchmark files and on malformed ones; grading on real golds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from duetlm.errors import ConfigError, InputError
from duetlm.grading import is_correct
from duetlm.tasks import TASKS, grade, load_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"benchmark copies not found at {SHARED}")

COUNTS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40}


@needs_data
@pytest.mark.parametrize(("name", "count"), COUNTS.items())
def test_loaders_on_real_files(name, count):
    examples = load_task(name, data=SHARED / name / "test.jsonl")
    assert len(examples) == count
    assert all(e.question.strip() and e.gold.strip() for e in examples)
    assert len({e.id for e in examples}) == count


@needs_data
def test_gold_normalization_on_real_rows():
    assert load_task("gsm8k", data=SHARED / "gsm8k/test.jsonl")[0].gold == "18"
    amc = load_task("amc23", data=SHARED / "amc23/test.jsonl")
    assert amc[0].gold == "27"  # stored as 27.0
    assert all(not e.gold.endswith(".0") for e in amc)


@needs_data
@pytest.mark.parametrize(
    ("name", "index", "equivalent", "wrong"),
    [
        ("gsm8k", 0, ["18", "18.0", "\\frac{36}{2}"], ["17", "19"]),
        ("amc23", 0, ["27", "27.0", "\\frac{54}{2}"], ["28"]),
        ("aime24", 0, ["204", "204.0"], ["205"]),
        ("math500", 0, ["\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"], ["(3, \\pi)"]),
    ],
)
def test_grading_real_golds_in_equivalent_forms(name, index, equivalent, wrong):
    example = load_task(name, data=SHARED / name / "test.jsonl")[index]
    for form in equivalent:
        assert grade(f"so the answer is \\boxed{{{form}}}", example)[0], form
        assert is_correct(f"\\boxed{{{form}}}", example.gold)
    for form in wrong:
        assert not grade(f"\\boxed{{{form}}}", example)[0], form
    assert grade("I could not decide.", example) == (False, None)


@needs_data
def test_math500_golds_match_themselves_after_math_verify():
    examples = load_task("math500", data=SHARED / "math500/test.jsonl")
    matched = sum(grade(f"\\boxed{{{e.gold}}}", e)[0] for e in examples)
    assert matched == len(examples)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "q2", \n')
    with pytest.raises(InputError, match=f"{path}:2: not valid JSON"):
        load_task("gsm8k", data=path)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "missing.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": "p2"}\n')
    with pytest.raises(InputError, match=f"{path}:2: missing field 'answer'"):
        load_task("math500", data=path)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_task("aime25", data=tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"unknown task 'aime99'.*known tasks"):
        load_task("aime99")


def test_user_jsonl_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "1+1?", "answer": "2"},
        {"id": "x", "question": "Pick", "answer": "B", "choices": ["a", "b"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_task(f"jsonl:{path}")
    assert [e.id for e in examples] == ["0", "x"]
    assert examples[1].choices == ("a", "b")
    assert grade("Answer: B", examples[1]) == (True, "B")


def test_gpqa_from_a_local_csv_shuffles_with_a_recorded_seed(tmp_path):
    # Made-up rows in the official column layout (no GPQA question is reproduced here).
    path = tmp_path / "gpqa_diamond.csv"
    fields = [
        "Record ID",
        "Question",
        "Correct Answer",
        "Incorrect Answer 1",
        "Incorrect Answer 2",
        "Incorrect Answer 3",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for i in range(40):
            writer.writerow(
                dict(zip(fields, [f"rec{i}", f"Question {i}?", "right", "w1", "w2", "w3"], strict=True))
            )
    examples = load_task("gpqa_diamond", data=path)
    assert len(examples) == 40
    for example in examples:
        assert example.choices["ABCD".index(example.gold)] == "right"
        assert example.meta["shuffle_seed"] == 0
    assert len({e.gold for e in examples}) == 4  # the correct option moves around
    assert [e.gold for e in load_task("gpqa_diamond", data=path)] == [e.gold for e in examples]
    assert [e.gold for e in load_task("gpqa_diamond", data=path, seed=1)] != [e.gold for e in examples]


def test_builtin_task_loads_without_data():
    examples = load_task("builtin")
    assert len(examples) == 1000 and examples[0].gold.isdigit()
    with pytest.raises(ConfigError, match="takes no --data"):
        load_task("builtin", data="x.jsonl")


def test_registry_lists_every_benchmark():
    load_task("builtin")  # imports the task modules
    assert {"gsm8k", "math500", "aime24", "aime25", "amc23", "gpqa_diamond", "builtin", "jsonl"} <= set(TASKS)
