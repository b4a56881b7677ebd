"""`duet eval` and `duet report` end to end on tiny models: store, resume after a kill, report."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from duet_process import run_command
from safetensors.torch import load_file, save_file

from conftest import QUESTIONS
from duetlm.errors import ConfigError, InputError
from duetlm.evaluate import REPORT_KEYS
from duetlm.evaluate.report import pass_at_k, summarize
from duetlm.evaluate.store import ResultStore, read_rows, row_key

DUET = str(Path(sys.executable).with_name("duet"))
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
METHODS = "M-alone,duet,m-alone,duet@6,M@6"


@pytest.fixture(scope="module")
def specs(model_dirs):
    return ["--capable", f"hf:{model_dirs['capable']}", "--light", f"hf:{model_dirs['light']}"]


def task_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "task.jsonl"
    rows = [{"id": f"q{i}", "question": QUESTIONS[i % 3], "answer": "14"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_eval_then_report_with_plot(specs, tmp_path):
    out = tmp_path / "run"
    done = run_command(
        [
            DUET,
            "eval",
            "--task",
            f"jsonl:{task_file(tmp_path, 6)}",
            "--methods",
            METHODS,
            *specs,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "saved" in done.stdout and "M-alone" in done.stdout
    report = run_command(
        [DUET, "report", str(out), "--format", "json"], capture_output=True, text=True, env=ENV
    )
    assert report.returncode == 0, report.stderr
    rows = {r["method"]: r for r in json.loads(report.stdout)}
    assert set(rows) == set(METHODS.split(","))
    assert all(tuple(r) == REPORT_KEYS for r in rows.values())
    assert rows["M-alone"]["accuracy"] == 1.0 and rows["duet"]["accuracy"] == 1.0
    assert rows["duet"]["savings_pct"] > 0 and rows["M-alone"]["savings_pct"] == 0
    assert rows["duet@6"]["M_output_tokens_mean"] == 6
    assert rows["m-alone"]["M_output_tokens_mean"] == 0
    assert (out / "plot_jsonl-task.png").stat().st_size > 1000
    markdown = run_command(
        [DUET, "report", str(out), "--format", "markdown", "--no-plot"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert "| duet |" in markdown.stdout


def test_report_without_matplotlib(specs, tmp_path):
    out = tmp_path / "run"
    command = [DUET, "eval", "--task", f"jsonl:{task_file(tmp_path, 2)}", "--methods", "duet,M-alone", *specs]
    assert run_command([*command, "--out", str(out)], capture_output=True, env=ENV).returncode == 0
    hide = "import sys; sys.modules['matplotlib'] = None; from duetlm.cli import main; sys.argv = ['duet', *sys.argv[1:]]; main()"
    for form in ("json", "markdown", "table"):
        done = subprocess.run(
            [sys.executable, "-c", hide, "report", str(out), "--format", form],
            capture_output=True,
            text=True,
            env=ENV,
        )
        assert done.returncode == 0, done.stderr
        assert "plot skipped: matplotlib is not installed (pip install 'duetlm[eval]')" in done.stderr
        assert "Traceback" not in done.stderr
    assert json.loads(
        subprocess.run(
            [sys.executable, "-c", hide, "report", str(out), "--format", "json"], capture_output=True, env=ENV
        ).stdout
    )
    assert not list(out.glob("*.png"))


def test_eval_maps_fields_and_refuses_changed_data(specs, tmp_path):
    path = tmp_path / "svamp.jsonl"
    rows = [{"ID": f"s{i}", "Body": "x = (3 + 4) * 2;", "Question": "x?", "Answer": 14.0} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    base = [DUET, "eval", "--task", f"jsonl:{path}", "--methods", "duet", *specs, "--out", str(out)]
    mapped = [*base, "--field", "question={Body} {Question}", "--field", "answer=Answer", "--field", "id=ID"]
    unmapped = run_command(base, capture_output=True, text=True, env=ENV)
    assert unmapped.returncode == 2 and "no 'question' for the question" in unmapped.stderr
    done = run_command(mapped, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    stored = read_rows(out / "results.jsonl")
    assert [(r["id"], r["question"], r["gold"]) for r in stored] == [
        ("s0", "x = (3 + 4) * 2; x?", "14"),
        ("s1", "x = (3 + 4) * 2; x?", "14"),
    ]
    changed = run_command(
        [*base, "--field", "question={Question} {Body}", "--field", "answer=Answer", "--field", "id=ID"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert changed.returncode == 2 and "differs from the one its stored results answer" in changed.stderr


def test_killed_run_resumes_without_duplicates(specs, tmp_path):
    out, path = tmp_path / "run", task_file(tmp_path, 40)
    command = [
        DUET,
        "eval",
        "--task",
        f"jsonl:{path}",
        "--methods",
        "duet,M-alone",
        *specs,
        "--out",
        str(out),
        "--batch-size",
        "2",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if results.is_file() and len(results.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(read_rows(results))
    assert 10 <= partial < 80
    done = run_command(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    keys = Counter(row_key(r) for r in read_rows(results))
    assert len(keys) == 80 and set(keys.values()) == {1}


def test_changed_config_is_refused_unless_forced(specs, tmp_path):
    out, path = tmp_path / "run", task_file(tmp_path, 2)
    base = [DUET, "eval", "--task", f"jsonl:{path}", "--methods", "duet", *specs, "--out", str(out)]
    assert run_command(base, capture_output=True, env=ENV).returncode == 0
    changed = run_command([*base, "--signal-max-tokens", "9"], capture_output=True, text=True, env=ENV)
    assert changed.returncode == 2 and "different configuration" in changed.stderr
    forced = run_command(
        [*base, "--signal-max-tokens", "9", "--force"], capture_output=True, text=True, env=ENV
    )
    assert forced.returncode == 0, forced.stderr
    assert len(list(out.glob("results.*.jsonl"))) == 1  # the old results were moved aside, not lost


def test_retrained_weights_under_the_same_path_are_not_resumed(model_dirs, tmp_path):
    light = tmp_path / "light"
    shutil.copytree(model_dirs["light"], light)
    out, path = tmp_path / "run", task_file(tmp_path, 2)
    base = [DUET, "eval", "--task", f"jsonl:{path}", "--methods", "duet", "--out", str(out)]
    specs = ["--capable", f"hf:{model_dirs['capable']}", "--light", f"hf:{light}"]
    assert run_command([*base, *specs], capture_output=True, env=ENV).returncode == 0
    weights = load_file(str(light / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(light / "model.safetensors"), {"format": "pt"})
    again = run_command([*base, *specs], capture_output=True, text=True, env=ENV)
    assert again.returncode == 2 and "different configuration" in again.stderr


def test_cut_off_last_line_is_dropped_and_repaired(tmp_path):
    store = ResultStore(tmp_path, {}, "h")
    row = {"task": "t", "method": "duet", "id": "1", "sample": 0}
    store.append([row])
    with store.results_path.open("a") as handle:
        handle.write('{"task": "t", "meth')
    reopened = ResultStore(tmp_path, {}, "h")
    assert reopened.done == {("t", "duet", "1", 0)}
    assert store.results_path.read_text() == json.dumps(row) + "\n"


def test_damaged_middle_line_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(InputError, match=r"results\.jsonl:2"):
        read_rows(path)


def test_other_config_hash_is_refused(tmp_path):
    ResultStore(tmp_path, {}, "one")
    with pytest.raises(ConfigError, match="different configuration"):
        ResultStore(tmp_path, {}, "two")


def test_a_later_setting_at_its_neutral_value_keeps_a_run_s_hash():
    """A run folder made before `settle.probe` or `answer_retry` existed still resumes: at the
    value that does what those runs did the field is out of the hash; at any other value it is
    in it."""
    from duetlm.evaluate import EvalConfig

    plain = EvalConfig(tasks=["builtin"], methods=["settle"])
    before = plain.duet.model_dump()
    del before["settle"]["probe"]  # the settings as runs made before the field hashed them
    del before["answer_retry"]  # inert in the think style
    assert plain.duet.identity() == before
    answer_style = plain.duet.model_copy(update={"signal_style": "answer"})
    before = answer_style.model_dump()
    del before["settle"]["probe"], before["answer_retry"]
    assert answer_style.model_copy(update={"answer_retry": False}).identity() == before
    assert answer_style.identity() != before  # the retry changes the answer style's rows
    settle = plain.duet.settle.model_copy(update={"probe": "continue"})
    changed = plain.model_copy(update={"duet": plain.duet.model_copy(update={"settle": settle})})
    assert changed.duet.identity()["settle"]["probe"] == "continue"
    assert changed.config_hash() != plain.config_hash()
    assert plain.config_hash() == EvalConfig(tasks=["builtin"], methods=["duet"]).config_hash()


def _row(method, qid, sample, correct, capable_tokens, rule="boxed", task="t"):
    usage = {"capable": {"output_tokens": capable_tokens}, "light": {"output_tokens": 1}, "cost": 0.5}
    return {
        "task": task,
        "method": method,
        "id": qid,
        "sample": sample,
        "correct": correct,
        "no_answer": rule is None,
        "answer_rule": rule,
        "usage": usage,
        "wall_s": 1.0,
    }


def test_summary_statistics_by_hand():
    rows = [
        _row("M-alone", "a", 0, True, 100),
        _row("M-alone", "a", 1, True, 100),
        _row("M-alone", "b", 0, False, 100),
        _row("M-alone", "b", 1, True, 100),
        _row("duet", "a", 0, True, 40),
        _row("duet", "a", 1, False, 40, rule="answer_phrase"),
        _row("duet", "b", 0, False, 40, rule=None),
        _row("duet", "b", 1, False, 40),
    ]
    summary = {s["method"]: s for s in summarize(rows)}
    alone, duet = summary["M-alone"], summary["duet"]
    assert alone["accuracy"] == pytest.approx(0.75)  # per-question means 1.0 and 0.5
    assert alone["stderr"] == pytest.approx(0.25)  # std(1.0, 0.5) = 0.3536 / sqrt(2)
    assert duet["savings_pct"] == pytest.approx(60.0)
    assert duet["accuracy_delta"] == pytest.approx(0.25 - 0.75)
    # per-question differences 0.5 - 1.0 and 0.0 - 0.5: both -0.5, so no spread
    assert duet["accuracy_delta_stderr"] == pytest.approx(0.0)
    assert duet["cost_per_solved"] == pytest.approx(4 * 0.5 / 1)
    assert duet["no_answer_rate"] == pytest.approx(0.25) and duet["fallback_rate"] == pytest.approx(0.25)
    assert alone["pass_at_k"] == pytest.approx(1.0)
    assert duet["pass_at_k"] == pytest.approx(0.5)
    assert all(tuple(s) == REPORT_KEYS for s in summary.values())


def test_savings_and_accuracy_change_are_paired():
    # M-alone answered 200 questions, duet only the first 96 (a run cut short): the comparison
    # must use those 96, where M-alone is right on the even ones and spends 100 + i tokens.
    rows = [_row("M-alone", f"q{i}", 0, i % 2 == 0, 100 + i) for i in range(200)]
    rows += [_row("duet", f"q{i}", 0, i % 4 == 0, 50) for i in range(96)]
    duet = next(s for s in summarize(rows) if s["method"] == "duet")
    assert duet["n_paired"] == 96 and duet["n_questions"] == 96
    base_tokens = sum(100 + i for i in range(96)) / 96
    assert duet["savings_pct"] == pytest.approx(100 * (1 - 50 / base_tokens))
    differences = [float(i % 4 == 0) - float(i % 2 == 0) for i in range(96)]  # 0 or -1
    mean = sum(differences) / 96
    assert duet["accuracy_delta"] == pytest.approx(mean) == pytest.approx(-0.25)
    spread = (sum((d - mean) ** 2 for d in differences) / 95) ** 0.5
    assert duet["accuracy_delta_stderr"] == pytest.approx(spread / 96**0.5)


def test_reference_from_another_run():
    base = [_row("M-alone", f"q{i}", 0, True, 100) for i in range(4)]
    trained = [_row("duet", f"q{i}", 0, True, 30) for i in range(4)]
    assert summarize(trained)[0]["savings_pct"] is None
    duet = summarize(trained, baseline_rows=base)[0]
    assert duet["savings_pct"] == pytest.approx(70.0) and duet["n_paired"] == 4
    assert [s["method"] for s in summarize(trained, baseline_rows=base)] == ["duet"]


def test_report_table_fits_80_columns():
    from rich.console import Console

    from duetlm.evaluate.table import summary_table

    rows = [_row("M-alone", f"q{i}", k, True, 4096) for i in range(200) for k in range(8)]
    for method in ("duet", "duet@1024", "m-alone", "M@1024"):
        rows += [
            _row(method, f"q{i}", k, i % 3 == 0, 1234, rule="last_expression")
            for i in range(200)
            for k in range(8)
        ]
    console = Console(width=80, record=True, color_system=None)
    console.print(summary_table("aime25 (runs/a-long-run-folder-name)", summarize(rows)))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for method in ("duet@1024", "m-alone", "M@1024", "M-alone"):
        assert re.search(rf"^{re.escape(method)} ", text, re.MULTILINE)  # whole, not cut to `meth…`
    assert "…" not in text
    for column in ("$/sol", "p@k", "fb %"):
        assert column in text


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"), [(2, 1, 1, 0.5), (4, 0, 2, 0.0), (4, 1, 2, 0.5), (3, 3, 2, 1.0)]
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_report_on_a_folder_above_runs_names_them(tmp_path):
    from duetlm.evaluate.report import load_summaries

    for name in ("gsm8k", "math"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("")
    with pytest.raises(InputError, match=r"not a run folder, but holds 2: .*gsm8k, .*math; report one"):
        load_summaries(tmp_path)
    with pytest.raises(InputError, match=r"has no results\.jsonl"):
        load_summaries(tmp_path / "gsm8k" / "nothing-here")


def test_plot_labels_stay_inside_the_frame():
    import matplotlib

    matplotlib.use("Agg")
    from duetlm.evaluate.report import task_figure

    rows = [
        {"method": "M-alone", "M_output_tokens_mean": 126.0, "accuracy": 1.0, "stderr": 0.0},
        {"method": "duet", "M_output_tokens_mean": 40.0, "accuracy": 0.98, "stderr": 0.014},
        {"method": "m-alone", "M_output_tokens_mean": 0.0, "accuracy": 0.13, "stderr": 0.034},
    ]
    figure = task_figure("builtin", rows)
    figure.canvas.draw()
    frame = figure.axes[0].get_window_extent()
    for label in figure.axes[0].texts:
        box = label.get_window_extent()
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, label
    assert max(figure.axes[0].get_yticks()) <= 100


def _folder(path: Path, rows: list[dict], kind: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "run.json").write_text(json.dumps({"kind": kind} if kind else {}))
    return path


def _probe_row(qid: str, oracle_tokens: int | None, thinking: int = 100) -> dict:
    return {
        "task": "t",
        "method": "probe",
        "id": qid,
        "capable_correct": True,
        "capable_output_tokens": 120,
        "light_alone_correct": False,
        "thinking_tokens": thinking,
        "oracle_tokens": oracle_tokens,
        "light_calls": 4,
    }


def test_report_adds_other_runs_and_the_probe_oracle(tmp_path):
    from duetlm.evaluate.compose import composed_summaries
    from duetlm.evaluate.summary import pareto_front

    base = _folder(
        tmp_path / "base",
        [_row(m, f"q{i}", 0, True, t) for i in range(4) for m, t in (("M-alone", 100), ("duet", 80))],
    )
    trained = _folder(tmp_path / "trained", [_row("duet", f"q{i}", 0, i > 0, 30) for i in range(4)])
    probe = _folder(
        tmp_path / "probe", [_probe_row(f"q{i}", [40, 50, 60, None][i]) for i in range(4)], "probe"
    )
    summaries = composed_summaries(base, {"trained DUET": str(trained), "probe oracle": str(probe)})
    rows = {s["method"]: s for s in summaries}
    assert list(rows) == ["trained DUET", "probe oracle", "duet", "M-alone"]  # by M tokens
    # the added run is paired with the main run's M-alone on the same ids
    assert rows["trained DUET"]["savings_pct"] == pytest.approx(70.0)
    assert rows["trained DUET"]["accuracy_delta"] == pytest.approx(-0.25)
    oracle = rows["probe oracle"]
    assert oracle["accuracy"] == 0.75 and oracle["M_output_tokens_mean"] == pytest.approx(
        (40 + 50 + 60 + 100) / 4
    )
    assert oracle["savings_pct"] == pytest.approx(100 * (1 - 62.5 / 120))
    # the oracle is no more accurate than trained DUET at more tokens; M-alone no more than duet
    assert [s["method"] for s in pareto_front(summaries)] == ["trained DUET", "duet"]
    with pytest.raises(InputError, match="in the main run already"):
        composed_summaries(base, {"duet": str(trained)})
    shown = run_command(
        [
            DUET,
            "report",
            str(base),
            "--add",
            f"trained DUET={trained}",
            "--add",
            f"oracle={probe}",
            "--format",
            "markdown",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert shown.returncode == 0, shown.stderr
    assert "| trained DUET |" in shown.stdout and "| oracle |" in shown.stdout
    assert (base / "plot_t.png").stat().st_size > 1000
    refused = run_command(
        [DUET, "report", str(base), "--add", "nolabel"], capture_output=True, text=True, env=ENV
    )
    assert refused.returncode != 0 and "LABEL=DIR" in refused.stderr
