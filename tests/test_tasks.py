"""Task loaders on the real benchmark files and on malformed ones; grading on real golds."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from duetlm.errors import ConfigError, InputError
from duetlm.grading import is_correct
from duetlm.grading.selfcheck import check_golds
from duetlm.tasks import TASKS, grade, load_task

# Local copies of the public benchmarks: DUET_BENCHMARK_DATA, or a `shared/data` folder beside the
# checkout. Each task is a folder holding test.jsonl (gsm8k, math500, aime24, aime25, amc23).
SHARED = Path(
    os.environ.get("DUET_BENCHMARK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
needs_data = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason=f"benchmark copies not found at {SHARED}: set DUET_BENCHMARK_DATA to a folder of "
    "gsm8k/, math500/, aime24/, aime25/, amc23/, each with its test.jsonl (docs/development.md)",
)

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
    assert grade("I could not decide.", example) == (False, None, None, False)


@needs_data
@pytest.mark.parametrize("name", COUNTS)
def test_grader_is_consistent_on_every_gold(name):
    """Every gold accepts itself boxed and an equivalent rewriting written unboxed, and refuses
    the next question's gold unless the two are the same value (whole sets: about 6 s)."""
    examples = load_task(name, data=SHARED / name / "test.jsonl")
    assert check_golds([e.gold for e in examples]) == []


def test_the_self_check_catches_a_grader_that_reads_sets():
    # the gold 111,\! 111 read as the set {111} would accept the next question's 111
    assert check_golds(["111,\\! 111", "111", "7"]) == []
    assert "other" in [f.check for f in check_golds(["111, 111", "111", "7"])]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "q2", \n')
    with pytest.raises(InputError, match=f"{path}:2: not valid JSON"):
        load_task("gsm8k", data=path)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "missing.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": "p2"}\n')
    with pytest.raises(
        InputError, match=f"{path}:2: no 'answer' for the answer .the row's fields: 'problem'"
    ):
        load_task("math500", data=path)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_task("aime25", data=tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"unknown task 'aime99'.*known tasks") as unknown:
        load_task("aime99")
    names = str(unknown.value).split("known tasks: ")[1]
    assert "gsm8k" in names and "jsonl:PATH" in names and "jsonl," not in names  # one way to name a file


def test_a_hub_task_offline_says_how_to_read_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match=r"Pass --data amc23=PATH to read a local copy"):
        load_task("amc23")


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
    assert grade("Answer: B", examples[1])[:2] == (True, "B")


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


def test_jsonl_splits_records_at_newlines_only(tmp_path):
    # JSON strings may hold U+2028, U+2029, U+0085, form feeds and vertical tabs raw;
    # str.splitlines() would cut these valid rows apart.
    path = tmp_path / "separators.jsonl"
    rows = [
        {"question": f"What is 1+1?{sep}Think.", "answer": "2"}
        for sep in ("\u2028", "\u2029", "\u0085", "\x0c", "\x0b", "\x1c", "\r")
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    examples = load_task(f"jsonl:{path}")
    assert [e.question for e in examples] == [r["question"].strip() for r in rows]


def _write(tmp_path, name, rows) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_field_mapping_svamp_layout(tmp_path):
    # SVAMP's layout: the story in Body, the question apart, the answer as a float.
    path = _write(
        tmp_path,
        "svamp.jsonl",
        [
            {
                "ID": "chal-1",
                "Body": "Tom has 3 red and 4 blue pens.",
                "Question": "How many pens?",
                "Answer": 7.0,
            }
        ],
    )
    with pytest.raises(
        InputError, match=r":1: no 'question' for the question .the row's fields: 'ID', 'Body'"
    ):
        load_task(f"jsonl:{path}")
    examples = load_task(f"jsonl:{path}", fields={"question": "{Body} {Question}", "answer": "Answer"})
    assert examples[0].question == "Tom has 3 red and 4 blue pens. How many pens?"
    assert (examples[0].id, examples[0].gold) == ("chal-1", "7")


def test_field_mapping_gold_inside_a_solution(tmp_path):
    # Hendrycks MATH's layout: no answer field, the gold boxed at the end of the solution.
    solution = "Since $2x = 1$, we get $x = \\boxed{\\frac{1}{2}}$."
    path = _write(tmp_path, "math.jsonl", [{"problem": "Solve $2x=1$.", "solution": solution}])
    example = load_task("math500", data=path, fields={"answer": "boxed:solution"})[0]
    assert example.gold == "\\frac{1}{2}"
    assert grade("\\boxed{0.5}", example).correct
    bad = _write(tmp_path, "bad.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(InputError, match="no a \\\\boxed\\{\\} in 'solution'"):
        load_task("math500", data=bad, fields={"answer": "boxed:solution"})


def test_field_mapping_list_gold_any_element_counts(tmp_path):
    # OlympiadBench's layout: final_answer is a list.
    path = _write(
        tmp_path, "olympiad.jsonl", [{"id": 7, "question": "Roots?", "final_answer": ["$x=2$", "$2$"]}]
    )
    example = load_task(f"jsonl:{path}", fields={"answer": "final_answer"})[0]
    assert example.golds == ("$x=2$", "$2$")
    assert grade("\\boxed{2}", example).correct
    assert not grade("\\boxed{3}", example).correct


@pytest.mark.parametrize(
    ("row", "fields", "choices", "gold"),
    [
        # MMLU: a list of options and a 0-based index
        ({"question": "Q?", "choices": ["w", "x", "y", "z"], "answer": 2}, {}, ("w", "x", "y", "z"), "C"),
        # ARC: options nested under choices.text, the letter in answerKey
        (
            {
                "question": "Q?",
                "choices": {"text": ["w", "x", "y"], "label": ["A", "B", "C"]},
                "answerKey": "B",
            },
            {"choices": "choices.text", "answer": "answerKey"},
            ("w", "x", "y"),
            "B",
        ),
        # options in several fields, the answer given as the right option's text
        (
            {"input": "Q?", "A": "w", "B": "x", "C": "y", "D": "z", "target": "z"},
            {"question": "input", "choices": "A,B,C,D", "answer": "target"},
            ("w", "x", "y", "z"),
            "D",
        ),
    ],
)
def test_field_mapping_multiple_choice(tmp_path, row, fields, choices, gold):
    path = _write(tmp_path, "mc.jsonl", [row])
    example = load_task(f"jsonl:{path}", fields=fields)[0]
    assert (example.choices, example.gold) == (choices, gold)
    assert grade(f"**Answer:** ({gold})", example).correct


def test_field_mapping_errors(tmp_path):
    path = _write(tmp_path, "mc.jsonl", [{"question": "Q?", "choices": ["w", "x"], "answer": "q"}])
    with pytest.raises(InputError, match=r"answer 'q' is not a letter among AB"):
        load_task(f"jsonl:{path}")
    with pytest.raises(ConfigError, match="unknown field mapping key 'qestion'"):
        load_task(f"jsonl:{path}", fields={"qestion": "x"})
    with pytest.raises(ConfigError, match="takes no field mapping"):
        load_task("builtin", fields={"question": "x"})
    twice = _write(tmp_path, "twice.jsonl", [{"id": 1, "question": "a", "answer": "1"}] * 2)
    with pytest.raises(InputError, match="the id '1' appears twice"):
        load_task(f"jsonl:{twice}")


def test_hub_tasks_reach_the_datasets_library():
    # `datasets` is installed with the package: offline, a hub task fails at the hub (with the
    # way out named), not at a missing install.
    import os
    import subprocess
    import sys

    code = "from duetlm.tasks import load_task; load_task('gsm8k')"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "could not load openai/gsm8k" in done.stderr and "--data" in done.stderr
    assert "needs `datasets`" not in done.stderr
