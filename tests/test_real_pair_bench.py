"""bench/real_pair.py's report: the table and the same-reasoning split, rebuilt from the rows the
repository ships (the bench's models run only in the bench itself)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import real_pair  # noqa: E402

SHIPPED = ROOT / "bench" / "results" / "real-pair"
TASKS = sorted(p.name for p in SHIPPED.iterdir() if (p / "report.md").is_file())


def _row(method: str, qid: str, correct: bool, text: str, signal: str | None = None) -> dict:
    return {
        "method": method,
        "id": qid,
        "sample": 0,
        "correct": correct,
        "text": text,
        "capable_text": text if method == "M-alone" else None,
        "signal": signal,
    }


def test_the_split_puts_each_question_by_whether_duets_reasoning_was_m_alones():
    reasoning = "3 + 4 = 7, so she has 7 apples. The final answer is \\boxed{7}"
    rows = [
        _row("M-alone", "a", True, reasoning),
        _row("duet", "a", False, "\\boxed{8}", signal="3 + 4 = 7, so she has 7 apples. "),
        _row("M-alone", "b", False, reasoning),
        _row("duet", "b", True, "\\boxed{7}", signal="3 + 4 = 7, so she has seven"),
        _row("M-alone", "c", True, reasoning),
        _row("duet", "c", True, "\\boxed{7}", signal=""),  # no signal: not the same reasoning
        _row("m-alone", "a", True, "\\boxed{7}"),
    ]
    header, rule, same, parted = real_pair.same_reasoning_split(rows)
    assert header.startswith("| duet's M reasoning") and rule.startswith("|---")
    assert same == "| as M-alone's, word for word | 1 | 1 | 0 | 1 | 0 |"
    assert parted == "| parted from M-alone's | 2 | 1 | 2 | 0 | 1 |"


def test_the_split_is_empty_without_both_methods():
    assert real_pair.same_reasoning_split([_row("M-alone", "a", True, "x")]) == []


def test_the_gsm8k_report_covers_its_300_questions(tmp_path):
    report = rebuilt_report(tmp_path, "gsm8k")
    table = [line for line in report.splitlines() if line.startswith("| M-alone ")]
    assert len(table) == 1 and table[0].split(" | ")[1] == "300"
    split = [line.split(" | ") for line in report.splitlines() if "M-alone's" in line]
    assert len(split) == 2 and sum(int(cells[1]) for cells in split) == 300


@pytest.mark.parametrize("task", TASKS)
def test_each_shipped_report_is_what_its_rows_give(tmp_path, task):
    # rows committed without their regenerated report (or a report edited by hand) fail here
    report = rebuilt_report(tmp_path, task)
    assert (tmp_path / "real-pair" / task / f"plot_{task}.png").stat().st_size > 0
    assert report == (SHIPPED / task / "report.md").read_text(encoding="utf-8")


def rebuilt_report(tmp_path: Path, task: str) -> str:
    out = tmp_path / "real-pair"
    shutil.copytree(SHIPPED / task, out / task, ignore=shutil.ignore_patterns("*.png", "report.md"))
    real_pair.report_task(argparse.Namespace(out=out), task)
    return (out / task / "report.md").read_text(encoding="utf-8")


def test_each_sitting_logs_its_decode_speed_beside_the_rows(tmp_path, capable_backend, light_backend):
    for steps in (["main"], ["settle", "probe"]):
        real_pair.log_sitting(tmp_path, capable_backend, light_backend, steps, ["gsm8k"])
    sittings = [json.loads(line) for line in (tmp_path / "sittings.jsonl").read_text().splitlines()]
    assert [s["steps"] for s in sittings] == [["main"], ["settle", "probe"]]  # appended, not replaced
    for sitting in sittings:
        assert sitting["capable"] == capable_backend.spec and sitting["light"] == light_backend.spec
        assert sitting["M_decode_tok_s"] > 0 and sitting["m_decode_tok_s"] > 0
