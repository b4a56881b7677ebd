"""`duet report --by FIELD`: per-group numbers against a count by hand, on real runs.

The MATH-500 run reads the first rows of the real file (its `level` and `subject` become
example metadata), with every other gold set to 14 so that the scripted tiny models get some
right and some wrong; the builtin run uses the embedded pair. Each test counts the groups
itself from the stored rows and the source data, and compares with the command's JSON.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from duet_process import run_command

from duetlm.config import DuetConfig
from duetlm.errors import InputError
from duetlm.evaluate import EvalConfig, run_eval
from duetlm.evaluate.groups import group_rows, parse_bins
from duetlm.evaluate.store import read_rows
from duetlm.tasks import builtin, load_task

DUET = str(Path(sys.executable).with_name("duet"))
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
SHARED = Path(
    os.environ.get("DUET_BENCHMARK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def report_json(run: Path, *options: str) -> list[dict]:
    done = run_command(
        [DUET, "report", str(run), "--format", "json", *options], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def by_hand(rows: list[dict], group_of) -> dict[tuple, dict]:
    """Accuracy, mean M tokens, savings and Δ accuracy against M-alone per (group, method),
    counted directly (one sample per question)."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        cells[(group_of(row), row["method"])].append(row)
    out = {}
    for (group, method), members in cells.items():
        base = {r["id"]: r for r in cells[(group, "M-alone")]}
        tokens = [r["usage"]["capable"]["output_tokens"] for r in members]
        base_tokens = [base[r["id"]]["usage"]["capable"]["output_tokens"] for r in members]
        out[(group, method)] = {
            "n": len(members),
            "accuracy": sum(r["correct"] for r in members) / len(members),
            "tokens": sum(tokens) / len(tokens),
            "savings": 100 * (1 - sum(tokens) / sum(base_tokens)),
            "delta": sum(r["correct"] - base[r["id"]]["correct"] for r in members) / len(members),
        }
    return out


def assert_matches(reported: list[dict], expected: dict[tuple, dict]) -> None:
    assert {(str(s["value"]), s["method"]) for s in reported} == {(str(g), m) for g, m in expected}
    for s in reported:
        hand = expected[next(k for k in expected if (str(k[0]), k[1]) == (str(s["value"]), s["method"]))]
        assert s["n_questions"] == hand["n"]
        assert s["accuracy"] == pytest.approx(hand["accuracy"])
        assert s["M_output_tokens_mean"] == pytest.approx(hand["tokens"])
        assert s["savings_pct"] == pytest.approx(hand["savings"])
        assert s["accuracy_delta"] == pytest.approx(hand["delta"])


@pytest.mark.skipif(not (SHARED / "math500").is_dir(), reason=f"no MATH-500 copy under {SHARED}")
def test_report_by_level_on_a_math500_run(model_dirs, tmp_path):
    source = [json.loads(line) for line in (SHARED / "math500" / "test.jsonl").open()][:12]
    for i, row in enumerate(source):
        row["answer"] = "14" if i % 2 == 0 else row["answer"]
    data = tmp_path / "math500.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in source))
    config = EvalConfig(
        tasks=["math500"],
        methods=["M-alone", "duet"],
        capable=f"hf:{model_dirs['capable']}",
        light=f"hf:{model_dirs['light']}",
        data={"math500": str(data)},
        # the scripts are 55 tokens; a toy model lost on a MATH prompt would write to its
        # 1,024 positions, which costs minutes and tests nothing more
        duet=DuetConfig(signal_max_tokens=48, answer_max_tokens=48),
    )
    run = tmp_path / "run"
    results = read_rows(run_eval(config, run, progress=False))
    level_of = {r["unique_id"]: r["level"] for r in source}
    assert {r["meta"]["level"] for r in results} == set(level_of.values())
    assert len({r["correct"] for r in results}) == 2  # some right, some wrong: the counts mean something
    reported = report_json(run, "--by", "level")
    assert all(s["field"] == "level" and s["task"] == "math500" for s in reported)
    assert_matches(reported, by_hand(results, lambda r: level_of[r["id"]]))
    subjects = report_json(run, "--by", "subject", "--no-plot")
    assert {s["value"] for s in subjects} == {r["subject"] for r in source}


def test_report_by_steps_on_a_builtin_run_with_buckets(tmp_path):
    config = EvalConfig(tasks=["builtin"], methods=["M-alone", "duet", "m-alone"], limit=24)
    run = tmp_path / "run"
    results = read_rows(run_eval(config, run, progress=False))
    steps_of = {p.id: len(p.ops) for p in builtin.generate(24)}
    assert all(r["meta"]["steps"] == steps_of[r["id"]] for r in results)
    assert_matches(report_json(run, "--by", "steps"), by_hand(results, lambda r: steps_of[r["id"]]))

    def index(steps: int) -> int:  # edges 5 and 8: below 5, 5 to 7, 8 and above
        return (steps >= 5) + (steps >= 8)

    present = defaultdict(set)
    for steps in steps_of.values():
        present[index(steps)].add(steps)

    def bucket(row: dict) -> str:  # a bucket is named by the lowest and highest value in it
        low, high = min(present[index(steps_of[row["id"]])]), max(present[index(steps_of[row["id"]])])
        return str(low) if low == high else f"{low}–{high}"

    bucketed = report_json(run, "--by", "steps", "--bins", "5,8")
    assert_matches(bucketed, by_hand(results, bucket))
    assert (run / "by_steps_builtin.png").is_file()


def test_report_by_an_unknown_field_names_the_known_ones(tmp_path):
    config = EvalConfig(tasks=["builtin"], methods=["m-alone"], limit=2)
    run = tmp_path / "run"
    run_eval(config, run, progress=False)
    done = run_command([DUET, "report", str(run), "--by", "level"], capture_output=True, text=True, env=ENV)
    assert done.returncode != 0
    assert "no row has a field 'level'" in done.stderr and "steps" in done.stderr


def rows_with(values: list) -> list[dict]:
    return [{"task": "t", "method": "M-alone", "id": str(i), "meta": {"x": v}} for i, v in enumerate(values)]


def test_group_rows_orders_buckets_and_keeps_rows_without_the_field():
    groups = group_rows([*rows_with([3, 1, 2, 10, 7, 2]), {"task": "t", "meta": {}}], "x", [2, 5])
    assert [(label, len(rows)) for label, rows in groups] == [
        ("1", 1),
        ("2–3", 3),
        ("7–10", 2),
        ("(none)", 1),
    ]
    quantiles = group_rows(rows_with(list(range(20))), "x", 4)
    assert [label for label, _ in quantiles] == ["0–4", "5–9", "10–14", "15–19"]
    many = group_rows(rows_with(list(range(30))), "x")  # more than 12 values: 5 buckets by default
    assert len(many) == 5 and sum(len(r) for _, r in many) == 30
    text = group_rows(rows_with(["b", "a", "b"]), "x")
    assert [(label, len(rows)) for label, rows in text] == [("a", 1), ("b", 2)]
    with pytest.raises(InputError, match="numeric"):
        group_rows(rows_with(["b", "a"]), "x", 2)
    row_field = group_rows(
        [{"task": "t", "capable_finish": f} for f in ("stop", "eos", "stop")], "capable_finish"
    )
    assert [(label, len(rows)) for label, rows in row_field] == [("eos", 1), ("stop", 2)]


@pytest.mark.parametrize("text", ["1", "2.5", "x", "5,3"])
def test_bad_bins_are_refused(text):
    with pytest.raises(InputError):
        parse_bins(text)


def test_user_metadata_through_field_mapping(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"question": "q1", "answer": "1", "Difficulty": 2.0})
        + "\n"
        + json.dumps({"question": "q2", "answer": "2"})
        + "\n"
    )
    examples = load_task(f"jsonl:{path}", fields={"meta.difficulty": "Difficulty"})
    assert [e.meta for e in examples] == [{"difficulty": 2}, {}]
