"""`duet probe`: the search on known predicates, then the real probe of the embedded pair
checked against the builtin task's ground truth and against m asked again by the test."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from duet_process import run_command

from duetlm.backends import load_backend
from duetlm.config import DuetConfig
from duetlm.errors import ConfigError
from duetlm.evaluate.probe import (
    ProbeConfig,
    binary_search,
    cut_text,
    line_ends,
    linear_search,
    run_probe,
    stable_search,
)
from duetlm.evaluate.probe_report import summarize_probe
from duetlm.evaluate.store import read_rows
from duetlm.models import EMBEDDED_BUDGETS
from duetlm.protocol import Duet, Problem
from duetlm.tasks import builtin

DUET = str(Path(sys.executable).with_name("duet"))
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
PROBED = 48


def drive(search, works) -> tuple[int | None, list[int]]:
    """Run a search against a predicate; returns (the cut found, every cut asked, in order)."""
    asked_all = []
    asked = next(search)
    while True:
        asked_all += asked
        try:
            asked = search.send({cut: works(cut) for cut in asked})
        except StopIteration as stop:
            return stop.value, asked_all


@pytest.mark.parametrize("threshold", [1, 2, 7, 13, 20])
def test_binary_search_finds_a_monotone_threshold_in_few_calls(threshold):
    found, asked = drive(binary_search(20, check_below=2), lambda cut: cut >= threshold)
    assert found == threshold
    assert len(asked) == len(set(asked)) <= 2 + 5 + 2  # both ends, log2(20) halvings, the lines below


def test_binary_search_moves_down_to_a_working_cut_under_the_point_it_found():
    works = {3, 8, 9, *range(11, 21)}  # not monotone: 3 and 8-9 work, 10 does not
    found, asked = drive(binary_search(20, check_below=2), works.__contains__)
    # halving lands on 11; 9 (two below) works, then 8; 6 and 7 fail, so 3 is out of reach
    assert found == 8
    assert {9, 8, 7, 6} <= set(asked) and 3 not in asked and len(asked) == len(set(asked))
    assert drive(binary_search(20, check_below=0), works.__contains__)[0] == 11


def test_binary_search_ends():
    assert drive(binary_search(9, 2), lambda cut: True) == (0, [0, 9])  # m needs nothing
    assert drive(binary_search(9, 2), lambda cut: False) == (None, [0, 9])  # nothing works
    assert drive(binary_search(0, 2), lambda cut: False) == (None, [0])  # no thinking at all
    assert drive(binary_search(1, 2), lambda cut: cut == 1) == (1, [0, 1])


def test_linear_search_is_exact_with_stride_one_and_refines_a_stride():
    works = {5, *range(9, 13)}
    assert drive(linear_search(12, 1, 2), works.__contains__) == (5, [0, 1, 2, 3, 4, 5])
    # stride 4: the grid 0, 4, 8, 12; 12 works, and the 3 lines under it (a stride) are tried
    assert drive(linear_search(12, 4, 0), works.__contains__) == (9, [0, 4, 8, 12, 9, 10, 11, 6, 7])
    assert drive(linear_search(12, 3, 2), lambda cut: cut >= 7) == (7, [0, 3, 6, 9, 7, 8, 5])
    assert drive(linear_search(10, 4, 0), lambda cut: cut == 10) == (10, [0, 4, 8, 10, 7, 9])


def test_stable_search_stops_under_the_last_run_of_working_cuts():
    works = {2, 6, 7, 8, 9, 10}  # cut 2 is a lucky guess: a longer cut fails after it
    assert drive(stable_search(10, 1), works.__contains__) == (6, [10, 9, 8, 7, 6, 5])
    assert drive(stable_search(10, 3), works.__contains__) == (6, [10, 9, 8, 7, 6, 5, 4])
    assert drive(stable_search(10, 1), lambda cut: cut != 10) == (None, [10])
    assert drive(stable_search(3, 2), lambda cut: True) == (0, [3, 2, 1, 0])
    assert drive(stable_search(0, 1), lambda cut: True) == (0, [0])


def test_cuts_keep_lines_and_blank_lines_between_them():
    thinking = "first line\n\n  second line\nthird"
    ends = line_ends(thinking)
    assert [cut_text(thinking, ends, k) for k in range(4)] == [
        "",
        "first line",
        "first line\n\n  second line",
        thinking,
    ]
    assert line_ends("") == [] and line_ends("\n \n") == []


def test_unknown_search_is_refused():
    with pytest.raises(ValueError):
        ProbeConfig(task="builtin", search="ternary")


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("probe") / "run"
    path = run_probe(ProbeConfig(task="builtin", limit=PROBED), out, progress=False)
    return out, read_rows(path)


def essential_point(lines: list[str], problem: builtin.ChainProblem, finished_by_m: int) -> int | None:
    """The fewest lines of M's thinking in which every essential step has appeared, except
    the last `finished_by_m` (those m may compute itself)."""
    needed = problem.essential_lines[: len(problem.essential_lines) - finished_by_m]
    return next((k for k in range(len(lines) + 1) if all(step in lines[:k] for step in needed)), None)


def test_the_oracle_cut_ends_where_the_essential_steps_are_complete(probed):
    """m (tiny-m) finishes one step by itself reliably and two sometimes; so a question that
    needs a signal is answered once M's thinking holds every essential step but the last one
    or two (or all of them). A found cut far earlier is m guessing a digit (1 in 10)."""
    _, rows = probed
    problems = {p.id: p for p in builtin.generate(PROBED)}
    assert len(rows) == PROBED and set(problems) == {r["id"] for r in rows}
    near = needing = 0
    for row in rows:
        if not row["oracle_lines"] or not row["thinking_closed"]:
            continue
        needing += 1
        thinking = row["capable_text"].split("<think>")[1].split("</think>")[0]
        assert thinking.strip() == row["thinking"]
        lines = [thinking[:end].split("\n")[-1].strip() for end in line_ends(thinking)]
        points = [essential_point(lines, problems[row["id"]], f) for f in (0, 1, 2)]
        near += any(p is not None and abs(row["oracle_lines"] - p) <= 1 for p in points)
    assert needing >= PROBED // 2
    assert near >= 0.8 * needing, f"{near} of {needing} cuts end within a line of the essential steps"


def test_m_asked_again_is_right_at_the_cut_and_wrong_just_above_it(probed):
    """The test asks m itself (greedy), with cuts it makes from M's text: right at the oracle
    cut, wrong one line shorter (the probe tried it, or it lies below the point it settled)."""
    _, rows = probed
    found = [r for r in rows if r["oracle_lines"]]
    duet = Duet(load_backend("tiny-M"), load_backend("tiny-m"), DuetConfig(**EMBEDDED_BUDGETS))
    problems, signals, expected = [], [], []
    for row in found:
        thinking = row["capable_text"].split("<think>")[1].split("</think>")[0].strip()
        lines = thinking.split("\n")
        k = row["oracle_lines"]
        for cut, right in ((k, True), (k - 1, False)):
            problems.append(Problem(row["question"]))
            signals.append("\n".join(lines[:cut]))
            expected.append((row["id"], cut, right))
    outputs = duet.finish(problems, signals)
    for (qid, cut, right), output in zip(expected, outputs, strict=True):
        gold = next(r["gold"] for r in found if r["id"] == qid)
        assert (f"\\boxed{{{gold}}}" in output.text) == right, (qid, cut, output.text)


def test_signal_tokens_and_the_summary_by_hand(probed):
    out, rows = probed
    tokenizer = load_backend("tiny-M").tokenizer
    for row in rows:
        if row["oracle_lines"]:
            text = f"<think>\n{row['oracle_signal']}\n</think>"
            assert row["oracle_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert row["light_calls"] == len(row["cuts"]) and not row["tokens_estimated"]
    summary = summarize_probe(rows)
    n = len(rows)
    assert summary["M_alone_accuracy"] == sum(r["capable_correct"] for r in rows) / n
    assert summary["no_signal_share"] == sum(r["oracle_lines"] == 0 for r in rows) / n
    assert summary["oracle_accuracy"] == sum(r["oracle_lines"] is not None for r in rows) / n
    full = [r["oracle_tokens"] if r["oracle_tokens"] is not None else r["thinking_tokens"] for r in rows]
    base = sum(r["capable_output_tokens"] for r in rows)
    assert summary["oracle_savings_pct"] == pytest.approx(100 * (1 - sum(full) / base))
    cheapest = sorted(r["oracle_tokens"] for r in rows if r["oracle_tokens"] is not None)
    needed = sum(r["capable_correct"] for r in rows)
    assert summary["tokens_at_M_alone_accuracy"] == pytest.approx(sum(cheapest[:needed]) / n)
    assert 0 < summary["oracle_tokens_mean"] < summary["thinking_tokens_mean"]
    report = run_command(
        [DUET, "report", str(out), "--format", "json", "--by", "steps"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert report.returncode == 0, report.stderr
    [document] = json.loads(report.stdout)
    assert document["oracle_tokens_mean"] == pytest.approx(summary["oracle_tokens_mean"])
    groups = {g["value"]: g for g in document["groups"]}
    steps = {p.id: len(p.ops) for p in builtin.generate(PROBED)}
    for value, group in groups.items():
        members = [r for r in rows if steps[r["id"]] == value]
        assert group["n_questions"] == len(members)
        assert group["no_signal_share"] == pytest.approx(
            sum(r["oracle_lines"] == 0 for r in members) / len(members)
        )
    assert (out / "probe_builtin.png").is_file()


def test_a_longer_probe_extends_the_run_and_another_search_is_refused(probed, tmp_path):
    out, rows = probed
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("run.json", "results.jsonl"):
        (copy / name).write_bytes((out / name).read_bytes())
    extended = read_rows(run_probe(ProbeConfig(task="builtin", limit=PROBED + 4), copy, progress=False))
    assert [r["id"] for r in extended[:PROBED]] == [r["id"] for r in rows]
    assert len(extended) == PROBED + 4 and len({r["id"] for r in extended}) == PROBED + 4
    with pytest.raises(ConfigError, match="different configuration"):
        run_probe(ProbeConfig(task="builtin", limit=2, search="linear"), copy, progress=False)


def test_the_stable_oracle_is_right_at_its_cut_and_every_longer_one_and_wrong_under_it(probed, tmp_path):
    _, binary_rows = probed
    limit = 16
    path = run_probe(
        ProbeConfig(task="builtin", limit=limit, search="stable", stride=4), tmp_path, progress=False
    )
    rows = read_rows(path)
    binary = {r["id"]: r for r in binary_rows[:limit]}
    assert [r["id"] for r in rows] == list(binary) and all(r["search"] == "stable" for r in rows)
    lucky = 0
    for row in rows:
        known = dict(row["cuts"])
        full = row["thinking_lines"]
        if row["oracle_lines"] is None:
            assert known == {full: False}
            continue
        assert all(known[cut] for cut in range(row["oracle_lines"], full + 1))
        assert row["oracle_lines"] == 0 or known[row["oracle_lines"] - 1] is False
        found = binary[row["id"]]["oracle_lines"]
        lucky += found is not None and found < row["oracle_lines"]
    summary = summarize_probe(rows)
    assert summary["search"] == "stable"
    assert summary["oracle_tokens_mean"] >= summarize_probe(list(binary.values()))["oracle_tokens_mean"]
    assert lucky > 0, "the binary search found no early cut that a longer one undoes"
