"""`duet solve` as a user runs it: a real process, real models, readable errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from duet_process import run_duet

from conftest import QUESTIONS, SIGNAL

DUET = [str(Path(sys.executable).with_name("duet"))]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def run(*args: str) -> subprocess.CompletedProcess:
    return run_duet(*args, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def specs(model_dirs):
    return ["--capable", f"hf:{model_dirs['capable']}", "--light", f"hf:{model_dirs['light']}"]


def test_solve_prints_answer_and_usage_table(specs):
    done = run("solve", QUESTIONS[0], *specs, "--compare")
    assert done.returncode == 0, done.stderr
    assert "answer: 14" in done.stdout
    assert "M (capable)" in done.stdout and "m (light)" in done.stdout
    assert "M-token savings" in done.stdout


def test_the_cost_column_shows_only_with_prices(specs, tmp_path):
    unpriced = run("solve", QUESTIONS[0], *specs)
    assert "no prices set" in unpriced.stdout and "cost" not in unpriced.stdout.split("no prices set")[0]
    config = tmp_path / "priced.toml"
    config.write_text("[capable_price]\noutput_per_mtok = 10.0\n")
    priced = run("solve", QUESTIONS[0], *specs, "--config", str(config))
    assert priced.returncode == 0, priced.stderr
    assert "cost" in priced.stdout and "no prices set" not in priced.stdout


def test_solve_json(specs):
    done = run("solve", QUESTIONS[1], *specs, "--json", "--compare")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["answer"] == "14" and row["signal"] == SIGNAL
    assert row["M_alone"]["answer"] == "14"
    assert row["usage"]["capable"]["output_tokens"] < row["M_alone"]["usage"]["capable"]["output_tokens"]


def test_solve_file(specs, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"question": q}) for q in QUESTIONS) + "\n")
    done = run("solve", "--file", str(path), *specs, "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["answer"] for line in done.stdout.splitlines()] == ["14"] * 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["solve", ""], "question is empty"),
        (["solve", "q", "--capable", "llama:x"], "unknown model spec"),
        (["solve", "q", "--capable", "hf:/no/such/model", "--light", "hf:/no/such/model"], "does not exist"),
        (["solve", "q", "--mode", "fast"], "unknown mode"),
        (["solve", "q", "--signal-max-tokens", "0"], "signal_max_tokens"),
        (["solve", "--file", "/no/such.jsonl"], "does not exist"),
        (["solve"], "either a QUESTION"),
        (["serve", "--engine", "fork"], "unknown --engine 'fork'"),
        (["serve", "--engine-threads", "-1"], "--engine-threads must be >= 0"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, specs):
    if "--capable" not in args and args[-1] != "solve" and args[0] != "serve":
        args = [*args, *specs]
    done = run(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_malformed_jsonl_names_file_and_line(specs, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok"}\n{"question": \n')
    done = run("solve", "--file", str(path), *specs)
    assert done.returncode == 2
    assert f"{path}:2: not valid JSON" in done.stderr
    path.write_text('{"text": "no question field"}\n')
    done = run("solve", "--file", str(path), *specs)
    assert f"{path}:1: each line needs a string field 'question'" in done.stderr


def test_capable_that_never_closes_thinking_is_flagged(specs):
    done = run("solve", "something else entirely", *specs, "--signal-max-tokens", "20")
    assert done.returncode == 0, done.stderr
    assert "signal was cut" in done.stdout


def test_demo_runs_the_base_and_the_trained_embedded_pair(tmp_path):
    done = run("demo", "-n", "12", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "tiny-M + tiny-m" in done.stdout and "duet-M + duet-m" in done.stdout
    # it says at once what it runs and where it writes
    assert (
        "duet demo: 12 builtin test questions (M-alone, duet, m-alone on tiny-M + tiny-m; duet on duet-M "
        in done.stderr
    )
    assert f"written to {tmp_path / 'demo'}/" in done.stderr
    base = [json.loads(line) for line in (tmp_path / "demo" / "results.jsonl").read_text().splitlines()]
    trained = [
        json.loads(line)
        for line in (tmp_path / "demo" / "trained" / "results.jsonl").read_text().splitlines()
    ]
    assert len(base) == 3 * 12 and len(trained) == 12
    assert "not results on real LLMs" in done.stdout
    # the trained pair's table compares with the base pair's M-alone (it has none of its own)
    trained_table = done.stdout.split("duet-M + duet-m")[1]
    duet_line = next(line for line in trained_table.splitlines() if line.startswith("duet "))
    assert "–" not in duet_line and "M-alone of" in trained_table


def test_embedded_pair_defaults_fit_its_context(tmp_path):
    from duetlm.models import EMBEDDED_BUDGETS

    done = run("solve", "Start at 7, then +5, *3, -8 (mod 10). What is the result?", "--json")
    assert done.returncode == 0, done.stderr
    assert "budgets cut" not in done.stderr  # the defaults fit the 512 positions
    row = json.loads(done.stdout)
    assert row["answer"] == "8" and not row["budget_clamped"]
    assert EMBEDDED_BUDGETS["signal_max_tokens"] + EMBEDDED_BUDGETS["answer_max_tokens"] + 53 <= 512


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_one_is_one_clear_line(specs):
    done = run("solve", QUESTIONS[0], *specs, "--device", "cuda")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no CUDA GPU is usable" in done.stderr and "--device cpu" in done.stderr


def test_install_hints_keep_their_extras():
    hide = "import sys; sys.modules['uvicorn'] = None; from duetlm.cli import main; sys.argv = ['duet', 'serve']; main()"
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, env=ENV)
    assert done.returncode == 2
    assert "pip install 'duetlm[serve]'" in done.stderr


def test_help_wraps_to_the_terminal_not_to_the_source():
    # a docstring's line breaks are the source's, not sentences': a wide terminal gets one line
    done = subprocess.run([*DUET, "--help"], capture_output=True, text=True, env=ENV | {"COLUMNS": "250"})
    (row,) = [line for line in done.stdout.splitlines() if "check-grader" in line]
    assert "answers: each gold must accept itself boxed and an equivalent rewriting written unboxed" in row
