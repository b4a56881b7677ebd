"""`duet eval`, `duet report`, `duet probe`, `duet check-grader` and `duet demo`: methods
measured on tasks into resumable run folders, and the reports read from them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from duetlm.backends import BackendOptions
from duetlm.cli.app import app, console, err_console, friendly_errors
from duetlm.cli.options import (
    DEFAULT_CAPABLE,
    DEFAULT_LIGHT,
    ApiKeyOpt,
    CapableEngineOpt,
    CapableOpt,
    CapableTokenizerOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    GpuMemoryOpt,
    LightEngineOpt,
    LightOpt,
    LightTokenizerOpt,
    SettleOpt,
    ThreadsOpt,
    backend_options,
    build_config,
    key_values,
    split_list,
)
from duetlm.cli.render import EMBEDDED_NOTE, print_report, write_plots
from duetlm.config import DuetConfig
from duetlm.errors import InputError
from duetlm.methods import method_help


@app.command("eval")
@friendly_errors
def eval_command(
    task: Annotated[
        list[str],
        typer.Option(
            "--task",
            "-t",
            help="Task name (repeatable): gsm8k, math500, "
            "aime24, aime25, amc23, gpqa_diamond, builtin, jsonl:PATH.",
        ),
    ],
    methods: Annotated[str, typer.Option(help=method_help("Comma-separated methods"))] = (
        "M-alone,duet,m-alone"
    ),
    capable: CapableOpt = DEFAULT_CAPABLE,
    light: LightOpt = DEFAULT_LIGHT,
    samples: Annotated[int, typer.Option(min=1, help="Samples per question.")] = 1,
    seed: Annotated[int, typer.Option(help="Sample k uses seed + k.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="First N questions per task.")] = None,
    out: Annotated[Path, typer.Option(help="Run folder (results.jsonl, run.json, report).")] = Path(
        "runs/eval"
    ),
    data: Annotated[list[str] | None, typer.Option(help="TASK=PATH: read a task from a local file.")] = None,
    field: FieldOpt = None,
    config: Annotated[Path | None, typer.Option(help="DuetConfig (TOML/YAML/JSON).")] = None,
    settle: SettleOpt = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0 = greedy).")] = None,
    signal_max_tokens: Annotated[int | None, typer.Option(help="M's signal budget in duet mode.")] = None,
    answer_max_tokens: Annotated[int | None, typer.Option(help="m's answer budget.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per batch.")] = 32,
    force: Annotated[
        bool, typer.Option(help="Start over when --out holds another configuration's results.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    api_key: ApiKeyOpt = None,
    capable_tokenizer: CapableTokenizerOpt = None,
    light_tokenizer: LightTokenizerOpt = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
    threads: ThreadsOpt = None,
    capable_engine: CapableEngineOpt = None,
    light_engine: LightEngineOpt = None,
) -> None:
    """Evaluate methods on tasks into a resumable store, then print the report."""
    from duetlm.config import validate_config
    from duetlm.evaluate import EvalConfig, load_summaries, run_eval

    data_map = key_values(data, "--data", "TASK=PATH")
    duet_config = build_config(
        config, signal_max_tokens, answer_max_tokens, temperature, None, (capable, light), settle
    )
    eval_config = validate_config(
        EvalConfig,
        {
            "tasks": task,
            "methods": split_list(methods),
            "capable": capable,
            "light": light,
            "samples": samples,
            "seed": seed,
            "limit": limit,
            "data": data_map,
            "fields": key_values(field, "--field", "PART=EXPR"),
            "batch_size": batch_size,
            "duet": duet_config.model_dump(),
        },
        source="eval options",
    )
    capable_options, light_options = backend_options(
        device=device,
        dtype=dtype,
        api_key=api_key,
        gpu_memory_utilization=gpu_memory_utilization,
        capable_tokenizer=capable_tokenizer,
        light_tokenizer=light_tokenizer,
        threads=threads,
        capable_engine=capable_engine,
        light_engine=light_engine,
        batch_size=batch_size,
    )
    run_eval(eval_config, out, force=force, backend_options=capable_options, light_options=light_options)
    print_report(out, load_summaries(out))


@app.command()
@friendly_errors
def report(
    directory: Annotated[Path, typer.Argument(help="A run folder written by duet eval or duet probe.")],
    format: Annotated[str, typer.Option("--format", help="markdown, json or table.")] = "table",
    plot: Annotated[
        bool, typer.Option(help="Write plot_TASK.png into the folder (needs matplotlib).")
    ] = True,
    baseline: Annotated[
        Path | None,
        typer.Option(help="Another run folder whose M-alone rows are the reference where this one has none."),
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(
            help="One report per value of a field: the examples' metadata (level, subject, year, steps, "
            "a --field meta.NAME) or a row field (capable_finish). Writes by_FIELD_TASK.png."
        ),
    ] = None,
    bins: Annotated[
        str | None,
        typer.Option(help="With --by on a numeric field: N buckets of about equal size, or edges '3,5,8'."),
    ] = None,
    add: Annotated[
        list[str] | None,
        typer.Option(
            help="LABEL=DIR (repeatable): another run's methods beside these, under LABEL (a trained "
            "pair's eval run), or a probe run's oracle as one point."
        ),
    ] = None,
) -> None:
    """Tables (and plots) of accuracy against M tokens from a run folder.

    `duet report runs/math --by level` splits it by MATH level; `--by steps --bins 3` buckets
    the builtin task's number of steps."""
    from duetlm.evaluate import load_summaries, markdown
    from duetlm.evaluate import plot as draw
    from duetlm.evaluate.report import json_rows

    if format not in ("markdown", "json", "table"):
        raise InputError(f"--format must be markdown, json or table, got {format!r}")
    from duetlm.evaluate.compose import is_probe_folder

    if is_probe_folder(directory):
        if baseline is not None:
            raise InputError("--baseline is for evaluation runs; a probe run holds its own M-alone rows")
        print_probe(directory, by, bins, format, plot)
        return
    if by is not None:
        if add:
            raise InputError("--add makes one report of several runs; it does not go with --by")
        report_by(directory, by, bins, format, plot, baseline)
        return
    if bins is not None:
        raise InputError("--bins goes with --by FIELD")
    if add:
        from duetlm.evaluate.compose import composed_summaries

        summaries = composed_summaries(directory, key_values(add, "--add", "LABEL=DIR"), baseline)
    else:
        summaries = load_summaries(directory, baseline)
    if format == "json":
        sys.stdout.write(json.dumps(json_rows(summaries), indent=2) + "\n")
    elif format == "markdown":
        sys.stdout.write(markdown(summaries) + "\n")
    else:
        print_report(directory, summaries, baseline)
    if plot:
        write_plots(lambda: draw(summaries, directory))


@app.command()
@friendly_errors
def probe(
    task: Annotated[
        str, typer.Option("--task", "-t", help="Task name, as for eval (builtin, math500, jsonl:PATH).")
    ],
    capable: CapableOpt = DEFAULT_CAPABLE,
    light: LightOpt = DEFAULT_LIGHT,
    limit: Annotated[int | None, typer.Option(min=1, help="First N questions of the task.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (resumable); default runs/probe-TASK.")] = None,
    data: Annotated[Path | None, typer.Option(help="Read the task from a local file.")] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Another split of the task: builtin train, for a warm start of duet train."),
    ] = None,
    field: FieldOpt = None,
    search: Annotated[
        str,
        typer.Option(
            help="binary (fewest m calls), linear (every cut from the start, --stride apart), or stable "
            "(down from the full thinking to the shortest cut from which every longer one works)."
        ),
    ] = "binary",
    stride: Annotated[
        int, typer.Option(min=1, help="linear: lines between two tried cuts; stable: cuts tried a round.")
    ] = 1,
    check_below: Annotated[
        int,
        typer.Option(min=0, help="Lines under the point found that are tried too (need is not monotone)."),
    ] = 2,
    by: Annotated[
        str | None, typer.Option(help="Also summarize per value of a field (steps, level).")
    ] = None,
    bins: Annotated[
        str | None, typer.Option(help="With --by on a numeric field: N buckets or edges.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="DuetConfig (TOML/YAML/JSON): budgets, templates.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per batch.")] = 32,
    reuse: Annotated[
        Path | None,
        typer.Option(
            help="An eval run (same models and config) whose M-alone and m-alone rows the probe takes "
            "instead of running them again."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Start over when --out holds another configuration's results.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    api_key: ApiKeyOpt = None,
    capable_tokenizer: CapableTokenizerOpt = None,
    light_tokenizer: LightTokenizerOpt = None,
    threads: ThreadsOpt = None,
    capable_engine: CapableEngineOpt = None,
    light_engine: LightEngineOpt = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
) -> None:
    """How much of M's thinking m needs, before any training: the oracle cut per question.

    M thinks once per question (as M-alone); m answers greedily from prefixes of that thinking
    cut at line boundaries, and the shortest prefix with which m is right is the oracle cut.
    `duet probe --task builtin --limit 200` probes the embedded pair."""
    from duetlm.config import validate_config
    from duetlm.evaluate.probe import ProbeConfig, run_probe

    duet_config = build_config(config, None, None, None, None, (capable, light))
    probe_config = validate_config(
        ProbeConfig,
        {
            "task": task,
            "capable": capable,
            "light": light,
            "limit": limit,
            "data": str(data) if data is not None else None,
            "split": split,
            "fields": key_values(field, "--field", "PART=EXPR"),
            "search": search,
            "stride": stride,
            "check_below": check_below,
            "batch_size": batch_size,
            "reuse": str(reuse) if reuse is not None else None,
            "duet": duet_config.model_dump(),
        },
        source="probe options",
    )
    from duetlm.evaluate.report import file_safe

    out = out or Path("runs") / f"probe-{file_safe(task)}{'-' + split if split else ''}"
    capable_options, light_options = backend_options(
        device=device,
        dtype=dtype,
        api_key=api_key,
        gpu_memory_utilization=gpu_memory_utilization,
        capable_tokenizer=capable_tokenizer,
        light_tokenizer=light_tokenizer,
        threads=threads,
        capable_engine=capable_engine,
        light_engine=light_engine,
        batch_size=batch_size,
    )
    err_console.print(
        f"duet probe: {task} with {capable} + {light}, rows written to {out}/ as batches finish"
    )
    run_probe(
        probe_config,
        out,
        force=force,
        backend_options=capable_options,
        light_options=light_options,
    )
    print_probe(out, by, bins, "table", plot=True)


def print_probe(directory: Path, by: str | None, bins: str | None, format: str, plot: bool) -> None:
    """The probe's summary per task (and per value of `by`), and its figure."""
    from duetlm.evaluate.groups import group_rows, parse_bins
    from duetlm.evaluate.probe_report import (
        probe_figure,
        probe_group_table,
        probe_markdown,
        probe_table,
        summarize_probe,
        summarize_tasks,
    )
    from duetlm.evaluate.report import results_rows

    rows = results_rows(directory)
    summaries = summarize_tasks(rows)
    groups = {}
    if by is not None:
        for s in summaries:
            task_rows = [r for r in rows if r["task"] == s["task"]]
            groups[s["task"]] = [
                (value, summarize_probe(members))
                for value, members in group_rows(task_rows, by, parse_bins(bins))
            ]
    elif bins is not None:
        raise InputError("--bins goes with --by FIELD")
    if format == "json":
        document = [
            s | ({"by": by, "groups": [{"value": v} | g for v, g in groups[s["task"]]]} if by else {})
            for s in summaries
        ]
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    elif format == "markdown":
        sys.stdout.write(probe_markdown(summaries) + "\n")
    else:
        for s in summaries:
            console.print(probe_table(f"{s['task']} probe ({directory})", s))
            if by is not None:
                console.print(probe_group_table(s["task"], by, groups[s["task"]]))
        if any(s["task"] == "builtin" for s in summaries):
            console.print(EMBEDDED_NOTE)
    if plot:
        write_plots(
            lambda: [probe_figure([r for r in rows if r["task"] == s["task"]], directory) for s in summaries]
        )


def report_by(directory: Path, by: str, bins: str | None, format: str, plot: bool, baseline: Path | None):
    """`duet report --by FIELD`: the report per value of a field, with a figure per task."""
    from duetlm.evaluate.group_view import group_json, group_markdown, group_plot, group_table
    from duetlm.evaluate.groups import parse_bins, summarize_by
    from duetlm.evaluate.report import results_rows, summarize

    rows = results_rows(directory)
    reference = results_rows(baseline) if baseline is not None else None
    summaries = summarize_by(rows, by, lambda members: summarize(members, reference), parse_bins(bins))
    if format == "json":
        sys.stdout.write(json.dumps(group_json(summaries), indent=2) + "\n")
    elif format == "markdown":
        sys.stdout.write(group_markdown(summaries) + "\n")
    else:
        for task in sorted({s["task"] for s in summaries}):
            console.print(group_table(f"{task} ({directory})", [s for s in summaries if s["task"] == task]))
        if any(s["task"] == "builtin" for s in summaries):
            console.print(EMBEDDED_NOTE)
    if plot:
        write_plots(lambda: group_plot(summaries, directory))


@app.command("check-grader")
@friendly_errors
def check_grader(
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task name (repeatable), as for eval.")],
    data: Annotated[list[str] | None, typer.Option(help="TASK=PATH: read a task from a local file.")] = None,
    field: FieldOpt = None,
    show: Annotated[int, typer.Option(min=0, help="Failures to list per task.")] = 20,
) -> None:
    """Check the grader on a task's own golds before trusting it with a model's answers: each
    gold must accept itself boxed and an equivalent rewriting written unboxed, and refuse the
    next question's gold. Exit code 1 when any check fails."""
    from duetlm.grading.selfcheck import check_golds
    from duetlm.tasks import load_task

    data_map, fields = key_values(data, "--data", "TASK=PATH"), key_values(field, "--field", "PART=EXPR")
    failed = 0
    for name in task:
        examples = load_task(name, data_map.get(name), fields=fields if name != "builtin" else None)
        failures = check_golds([e.gold for e in examples], [len(e.choices) for e in examples])
        failed += len(failures)
        status = "[green]all hold[/]" if not failures else f"[red]{len(failures)} failed[/]"
        console.print(f"{escape(name)}: {len(examples)} golds, {status}")
        for failure in failures[:show]:
            console.print(
                f"  {failure.check}: gold {escape(failure.gold)!r} (question {examples[failure.index].id}) "
                f"graded {escape(failure.response)!r} wrongly",
                highlight=False,
            )
    if failed:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def demo(
    capable: CapableOpt = DEFAULT_CAPABLE,
    light: LightOpt = DEFAULT_LIGHT,
    questions: Annotated[
        int, typer.Option("--questions", "-n", min=1, max=1000, help="Builtin test questions.")
    ] = 200,
    methods: Annotated[
        str, typer.Option(help=method_help("Comma-separated methods"))
    ] = "M-alone,duet,m-alone",
    out: Annotated[Path | None, typer.Option(help="Run folder (resumable); default runs/demo-N.")] = None,
    device: DeviceOpt = "auto",
    trained: Annotated[
        bool,
        typer.Option(help="Also run the jointly trained embedded pair (duet-M + duet-m) in duet mode."),
    ] = True,
) -> None:
    """DUET against its baselines on the builtin task, with the embedded pair by default:
    `duet eval --task builtin` with settings for the toy task, then its report; with the
    embedded pair, the jointly trained pair too."""
    from duetlm.evaluate import EvalConfig, load_summaries, run_eval
    from duetlm.models import EMBEDDED_BUDGETS

    out = out or Path(f"runs/demo-{questions}")
    runs = [(out, capable, light, split_list(methods))]
    if trained and (capable, light) == (DEFAULT_CAPABLE, DEFAULT_LIGHT):
        runs.append((out / "trained", "duet-M", "duet-m", ["duet"]))
    pairs = "; ".join(f"{', '.join(m)} on {c} + {lt}" for _, c, lt, m in runs)
    err_console.print(
        f"duet demo: {questions} builtin test questions ({pairs}), written to {out}/ as they finish "
        "(run it again to resume); on 2 CPU cores 200 questions take about a minute"
    )
    for folder, capable_spec, light_spec, run_methods in runs:
        eval_config = EvalConfig(
            tasks=["builtin"],
            methods=run_methods,
            capable=capable_spec,
            light=light_spec,
            limit=questions,
            batch_size=64,
            duet=DuetConfig(**EMBEDDED_BUDGETS),
        )
        run_eval(eval_config, folder, force=True, backend_options=BackendOptions(device=device))
    for folder, capable_spec, light_spec, _ in runs:
        console.print(f"[bold]{escape(capable_spec)} + {escape(light_spec)}[/]")
        baseline = None if folder == out else out  # the trained pair is compared with the base M-alone
        print_report(folder, load_summaries(folder, baseline), baseline)
