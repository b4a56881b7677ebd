"""The `duet` command line: a thin face over the library (docs/design.md section 3).

Every command builds the same objects a Python user would (`load_backend`, `Duet`,
`DuetConfig`) and renders their results with rich. Errors of the library (`DuetError`) are
printed as one red line with exit code 2, never as a traceback.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from duetlm.backends import BackendOptions, load_backend
from duetlm.config import DuetConfig
from duetlm.errors import ConfigError, DuetError, InputError
from duetlm.protocol import Duet, Problem, SolveResult, parse_mode
from duetlm.usage import Usage, savings_pct

app = typer.Typer(
    name="duet",
    help="DUET: a capable model M thinks, a light model m answers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",  # a docstring's paragraph is one paragraph, wrapped to the terminal
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line, whole, for logs and greps

DEFAULT_CAPABLE = "tiny-M"
DEFAULT_LIGHT = "tiny-m"


def friendly_errors(command):
    """Turn the library's own errors into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DuetError as exc:
            where = ""
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of torchrun's processes: say which
                where = f" (process {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']})"
            err_console.print(f"[bold red]error{where}:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False):
    # vLLM logs to stdout at INFO by default, into `--json` output; its engine processes
    # inherit these settings, which must be in place before vllm is imported
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


CapableOpt = Annotated[
    str,
    typer.Option(
        "--capable", "-M", help="Capable model M: hf:PATH_OR_ID, openai:MODEL@URL, vllm:PATH_OR_ID."
    ),
]
LightOpt = Annotated[str, typer.Option("--light", "-m", help="Light model m, same spec forms as --capable.")]
SettleOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="KEY=VALUE (repeatable): the settle modes' rule, e.g. probe_every=32, agree=3, "
        "min_prob=0.9, probe_max_tokens=48 (docs/settle.md).",
    ),
]
GpuMemoryOpt = Annotated[
    float | None,
    typer.Option(
        "--gpu-memory-utilization",
        min=0.01,
        max=1.0,
        help="vllm: models: the share of device memory vLLM reserves (on a CPU, of CPU memory). "
        "Default: 0.85 on a GPU; on a CPU an explicit 2 GiB KV cache.",
    ),
]


def read_questions_jsonl(path: Path) -> list[Problem]:
    """Questions from a JSONL file (or JSON/CSV/parquet): `question` per row, optional
    `choices` (a list of option texts). Errors name the file and line."""
    from duetlm.tasks.registry import read_rows

    problems = []
    for location, row in read_rows(path):
        if not isinstance(row.get("question"), str):
            raise InputError(f"{location}: each line needs a string field 'question'")
        choices = row.get("choices") or ()
        if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
            raise InputError(f"{location}: 'choices' must be a list of strings")
        problems.append(Problem(row["question"], tuple(choices)))
    if not problems:
        raise InputError(f"{path} holds no questions")
    return problems


def usage_table(title: str, usage: Usage, n: int, baseline: Usage | None = None) -> Table:
    """Tokens and time per model; the cost column only when prices are set (a cost of 0 would
    read as a measurement)."""
    priced = usage.cost > 0 or (baseline is not None and baseline.cost > 0)
    table = Table(title=title)
    columns = ("model", "prompt tok", "output tok", "time s") + (("cost",) if priced else ())
    for column in columns:
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, part in (("M (capable)", usage.capable), ("m (light)", usage.light)):
        cells = [name, str(part.prompt_tokens), str(part.output_tokens), f"{part.wall_s:.2f}"]
        table.add_row(*cells, *([f"{part.cost:.6f}"] if priced else []))
    total = ["total", "", str(usage.capable.output_tokens + usage.light.output_tokens), f"{usage.wall_s:.2f}"]
    table.add_row(*total, *([f"{usage.cost:.6f}"] if priced else []), style="bold")
    table.caption = None if priced else "no prices set (capable_price / light_price in --config)"
    if baseline is not None:
        saved = savings_pct(usage.capable.output_tokens, baseline.capable.output_tokens)
        compared = (
            f"M-alone on the same {n} question(s): {baseline.capable.output_tokens} M output tokens; "
            f"M-token savings: {'n/a' if saved is None else f'{saved:.1f}%'}"
        )
        table.caption = compared if table.caption is None else f"{compared}\n{table.caption}"
    return table


@app.command()
@friendly_errors
def solve(
    question: Annotated[
        str | None, typer.Argument(help="The question. Omit it and use --file for many.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="JSONL with a 'question' per line.")
    ] = None,
    capable: CapableOpt = DEFAULT_CAPABLE,
    light: LightOpt = DEFAULT_LIGHT,
    mode: Annotated[
        str, typer.Option(help="duet, M-alone, m-alone, duet@B, M@B, settle or M-settle.")
    ] = "duet",
    signal_max_tokens: Annotated[int | None, typer.Option(help="M's signal budget in tokens.")] = None,
    answer_max_tokens: Annotated[int | None, typer.Option(help="m's answer budget in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    config: Annotated[Path | None, typer.Option(help="DuetConfig as TOML/YAML/JSON.")] = None,
    settle: SettleOpt = None,
    compare: Annotated[bool, typer.Option(help="Also run M-alone and report M-token savings.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per question.")] = False,
    device: Annotated[str, typer.Option(help="hf backend device: auto, cpu, cuda, mps.")] = "auto",
    api_key: Annotated[str | None, typer.Option(help="Key for openai: specs (else $OPENAI_API_KEY).")] = None,
    light_tokenizer: Annotated[
        str | None, typer.Option(help="openai: m's tokenizer, to send its pre-filled turn as a completion.")
    ] = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
) -> None:
    """Answer questions with DUET (or a baseline mode) and print the usage per model."""
    if (question is None) == (file is None):
        raise InputError("give either a QUESTION argument or --file PATH (not both)")
    problems = read_questions_jsonl(file) if file is not None else [Problem(question or "")]
    if not problems[0].question.strip():
        raise InputError("the question is empty")
    parsed_mode = parse_mode(mode)
    options = BackendOptions(device=device, api_key=api_key, gpu_memory_utilization=gpu_memory_utilization)
    # the settings are checked before any model loads: a bad value fails at once
    duet_config = build_config(
        config, signal_max_tokens, answer_max_tokens, temperature, seed, (capable, light), settle
    )
    duet = Duet(
        load_backend(capable, options),
        load_backend(light, dataclasses.replace(options, tokenizer=light_tokenizer)),
        duet_config,
    )
    results = duet.solve_batch(problems, parsed_mode)
    baseline = duet.solve_batch(problems, "M-alone") if compare else None
    if as_json:
        for index, result in enumerate(results):
            row = result.to_dict()
            if baseline is not None:
                row["M_alone"] = baseline[index].to_dict()
            sys.stdout.write(json.dumps(row) + "\n")
        return
    render_results(results, baseline)


def build_config(
    path,
    signal_max_tokens,
    answer_max_tokens,
    temperature,
    seed,
    specs: tuple[str, ...] = (),
    settle: list[str] | None = None,
) -> DuetConfig:
    """The DuetConfig of a command: the file's, else the defaults (the embedded pair's budgets
    when every model is embedded), with the flags on top (`--settle KEY=VALUE` on its section)."""
    from duetlm.config import validate_config
    from duetlm.models import budget_defaults

    base = DuetConfig.load(path) if path is not None else DuetConfig(**budget_defaults(*specs))
    overrides = {
        k: v
        for k, v in {
            "signal_max_tokens": signal_max_tokens,
            "answer_max_tokens": answer_max_tokens,
            "temperature": temperature,
            "seed": seed,
        }.items()
        if v is not None
    }
    values = base.model_dump() | overrides
    if settle:
        values["settle"] = values["settle"] | key_values(settle, "--settle", "KEY=VALUE")
    return validate_config(DuetConfig, values, source="options")


def render_results(results: list[SolveResult], baseline: list[SolveResult] | None) -> None:
    for index, result in enumerate(results):
        if len(results) > 1:
            console.rule(f"question {index + 1}")
        console.print(
            f"[bold]answer:[/] {escape(result.answer) if result.answer is not None else '[red](none extracted)[/]'}",
            highlight=False,
        )
        if result.signal is not None and result.mode != "M-alone":
            console.print(
                f"[dim]signal ({result.signal_tokens} tokens):[/] {escape(result.signal)}", highlight=False
            )
        if result.truncated:
            console.print("[yellow]M did not close its thinking within its budget: the signal was cut[/]")
        if baseline is not None:
            console.print(f"[dim]M-alone answer:[/] {escape(str(baseline[index].answer))}", highlight=False)
    usage = sum((r.usage for r in results), Usage())
    base_usage = sum((r.usage for r in baseline), Usage()) if baseline is not None else None
    console.print(
        usage_table(f"usage ({results[0].mode}, {len(results)} question(s))", usage, len(results), base_usage)
    )


EMBEDDED_NOTE = (
    "[dim]The embedded models (tiny-M, tiny-m, duet-M, duet-m) are small models trained on a synthetic "
    "task; their numbers are not results on real LLMs.[/]"
)


def print_report(directory: Path, summaries: list[dict], baseline: Path | None = None) -> None:
    from duetlm.evaluate.table import summary_table

    for task in sorted({s["task"] for s in summaries}):
        table = summary_table(f"{task} ({directory})", [s for s in summaries if s["task"] == task])
        if baseline is not None:
            table.caption += f"; M-alone of {baseline}"
        console.print(table)
    if any(s["task"] == "builtin" for s in summaries):
        console.print(EMBEDDED_NOTE)


FieldOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="PART=EXPR (repeatable): which fields hold the question, answer, choices or id, for every "
        "task read from a file or the hub. EXPR: a field (a|b: the first present; a.b: nested), a "
        "format string '{Body} {Question}', boxed:FIELD (gold in its last \\boxed), ####:FIELD. "
        "meta.NAME=EXPR keeps a field on each example for report --by NAME.",
    ),
]


def key_values(items: list[str] | None, flag: str, form: str) -> dict[str, str]:
    """`KEY=VALUE` options as a dict; a clear error for any other form."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} takes {form}, got {item!r}")
        pairs[key.strip()] = value
    return pairs


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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
    methods: Annotated[
        str, typer.Option(help="Comma-separated: duet, M-alone, m-alone, duet@B, M@B, settle, M-settle.")
    ] = ("M-alone,duet,m-alone"),
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
    device: Annotated[str, typer.Option(help="hf backend device.")] = "auto",
    api_key: Annotated[str | None, typer.Option(help="Key for openai: specs.")] = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
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
            "methods": _split(methods),
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
    options = BackendOptions(device=device, api_key=api_key, gpu_memory_utilization=gpu_memory_utilization)
    run_eval(eval_config, out, force=force, backend_options=options)
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
    if is_probe_run(directory):
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
    force: Annotated[
        bool, typer.Option(help="Start over when --out holds another configuration's results.")
    ] = False,
    device: Annotated[str, typer.Option(help="hf backend device.")] = "auto",
    api_key: Annotated[str | None, typer.Option(help="Key for openai: specs.")] = None,
    capable_tokenizer: Annotated[
        str | None, typer.Option(help="openai: M's tokenizer, for exact signal token counts.")
    ] = None,
    light_tokenizer: Annotated[
        str | None, typer.Option(help="openai: m's tokenizer, to send its pre-filled turn as a completion.")
    ] = None,
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
            "duet": duet_config.model_dump(),
        },
        source="probe options",
    )
    out = out or Path("runs") / f"probe-{file_safe_name(task)}{'-' + split if split else ''}"
    options = BackendOptions(device=device, api_key=api_key, gpu_memory_utilization=gpu_memory_utilization)
    err_console.print(
        f"duet probe: {task} with {capable} + {light}, rows written to {out}/ as batches finish"
    )
    run_probe(
        probe_config,
        out,
        force=force,
        backend_options=dataclasses.replace(options, tokenizer=capable_tokenizer),
        light_options=dataclasses.replace(options, tokenizer=light_tokenizer),
    )
    print_probe(out, by, bins, "table", plot=True)


def file_safe_name(task: str) -> str:
    from duetlm.evaluate.report import file_safe

    return file_safe(task)


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


def write_plots(draw) -> None:
    """Draw a report's figures and name them; without matplotlib, say the plot was skipped."""
    try:
        paths = draw()
    except ImportError:
        err_console.print("plot skipped: matplotlib is not installed (pip install 'duetlm\\[eval]')")
        return
    for path in paths:
        err_console.print(f"plot: {path}")


def is_probe_run(directory: Path) -> bool:
    """Whether a run folder holds a probe's rows (its run.json says so)."""
    try:
        return json.loads((directory / "run.json").read_text(encoding="utf-8")).get("kind") == "probe"
    except (OSError, ValueError):
        return False


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
    methods: Annotated[str, typer.Option(help="Comma-separated modes to compare.")] = "M-alone,duet,m-alone",
    out: Annotated[Path | None, typer.Option(help="Run folder (resumable); default runs/demo-N.")] = None,
    device: Annotated[str, typer.Option(help="hf backend device.")] = "auto",
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
    runs = [(out, capable, light, _split(methods))]
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


@app.command()
@friendly_errors
def serve(
    capable: CapableOpt = DEFAULT_CAPABLE,
    light: LightOpt = DEFAULT_LIGHT,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DUET_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 (or $DUET_API_KEY)."
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="Model name clients ask for.")] = "duet",
    config: Annotated[Path | None, typer.Option(help="DuetConfig (TOML/YAML/JSON).")] = None,
    settle: SettleOpt = None,
    scheduler: Annotated[
        str,
        typer.Option(help="continuous (stream, batch step by step) or batch (gather, then solve together)."),
    ] = "continuous",
    batch_window_ms: Annotated[float, typer.Option(help="batch scheduler: wait for more requests.")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="batch scheduler: most requests per batch.")] = 32,
    stream_interval_ms: Annotated[
        float,
        typer.Option(help="Streams join text that comes sooner than this into one chunk (0: every delta)."),
    ] = 40.0,
    device: Annotated[str, typer.Option(help="hf backend device.")] = "auto",
    decode_step: Annotated[
        str,
        typer.Option(
            help="hf models, continuous scheduler: auto (the engine's own decode step for Llama, "
            "Qwen2 and Qwen3, the model's forward for others) or transformers (always the forward)."
        ),
    ] = "auto",
    engine: Annotated[
        str,
        typer.Option(
            help="hf models, continuous scheduler: process (each model's engine in a process of its "
            "own: no GIL shared with the HTTP side) or thread (in the server's process)."
        ),
    ] = "process",
    engine_threads: Annotated[
        int,
        typer.Option(help="hf engine processes: torch CPU threads each (0: torch's default)."),
    ] = 1,
    upstream_api_key: Annotated[str | None, typer.Option(help="Key for openai: model specs.")] = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
) -> None:
    """Serve DUET behind an OpenAI-compatible /v1/chat/completions endpoint."""
    try:
        import uvicorn

        from duetlm.serve import ServeConfig, create_app
    except ImportError as exc:
        raise InputError("duet serve needs fastapi and uvicorn: pip install 'duetlm[serve]'") from exc
    from duetlm.backends.hf import ENGINES

    if engine not in ENGINES:
        raise InputError(f"unknown --engine {engine!r} (choose from {', '.join(ENGINES)})")
    if engine_threads < 0:
        raise InputError(f"--engine-threads must be >= 0 (0: torch's default), got {engine_threads}")
    listener = bind_listener(host, port)  # a busy port fails now, before any model loads
    streaming = scheduler == "continuous"
    options = BackendOptions(
        device=device,
        api_key=upstream_api_key,
        streaming=streaming,
        decode_step=decode_step,
        engine=engine if streaming else "thread",  # the batch scheduler runs generate() here
        engine_threads=engine_threads or None,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    duet = Duet(
        load_backend(capable, options),
        load_backend(light, options),
        build_config(config, None, None, None, None, (capable, light), settle),
    )
    if streaming:  # engine processes load their models now, side by side, not at the first request
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda b: getattr(b, "start_engine", lambda: None)(), (duet.capable, duet.light)))
    from duetlm.config import validate_config

    serve_config = validate_config(
        ServeConfig,
        {
            "name": name,
            "api_key": api_key,
            "scheduler": scheduler,
            "batch_window_ms": batch_window_ms,
            "max_batch": max_batch,
            "stream_interval_ms": stream_interval_ms,
        },
        source="serve options",
    )
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err_console.print(f"[yellow]warning: serving on {host} without --api-key[/]")
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                err_console.print(
                    f"duet serve: listening on {url}/v1 as model {serve_config.name!r}; "
                    f"playground at {url}/ (Ctrl-C stops)"
                )

    server = AnnouncingServer(
        uvicorn.Config(create_app(duet, serve_config), timeout_graceful_shutdown=30, log_level="warning")
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it drained on
            server.run(sockets=[listener])
    finally:  # engine processes end with the server
        listener.close()
        duet.capable.close()
        duet.light.close()
        err_console.print("duet serve: stopped")


def bind_listener(host: str, port: int):
    """The server's listening socket, bound before the models load: a port in use is one clear
    line at once, not uvicorn's bare error after minutes of loading."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InputError(
                f"port {port} on {host} is in use: stop what holds it, or pick another --port"
            ) from None
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@app.command()
@friendly_errors
def train(
    config: Annotated[Path | None, typer.Option(help="TrainConfig as TOML/YAML/JSON (see configs/).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT/last exactly (optimizer, λ, RNG, data).")
    ] = False,
    out: Annotated[str | None, typer.Option(help="Override the run folder.")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of steps.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a knob: SECTION.KNOB=VALUE (a TOML value: --set objective.kl_beta=0 "
            "--set parallel.strategy='\"fsdp\"' or parallel.strategy=fsdp); repeatable.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Start over in a folder that holds a run (the old run is moved aside).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Load nothing; print the per-device memory plan and whether it fits.")
    ] = False,
    device_memory: Annotated[str, typer.Option(help="Memory of one device, for --dry-run.")] = "80GB",
    devices: Annotated[
        int | None,
        typer.Option(min=1, help="Devices (processes) for --dry-run; default $WORLD_SIZE or 1."),
    ] = None,
    nodes: Annotated[int, typer.Option(min=1, help="Nodes the devices are spread over, for --dry-run.")] = 1,
) -> None:
    """Joint DUET training (length-penalized GRPO) of M and m; see docs/design.md section 2.
    Several processes: torchrun --nproc_per_node N --no-python duet train ... (docs/training.md)."""
    from duetlm.train.config import TrainConfig, with_settings

    base = TrainConfig.load(config) if config is not None else TrainConfig()
    settings = {k: v for k, v in {"out": out, "steps": steps}.items() if v is not None}
    settings |= dict(_setting(text) for text in set_ or [])
    train_config = with_settings(base, settings, source=str(config or "defaults")) if settings else base
    if dry_run:
        from duetlm.train.memory import parse_size, render

        world = devices or int(os.environ.get("WORLD_SIZE", "1"))
        text, fits = render(train_config, parse_size(device_memory), world, nodes)
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(0 if fits else 1)
    from torch.distributed.elastic.multiprocessing.errors import record

    from duetlm.train.trainer import train as run_training

    # under torchrun, a process that fails writes its error where the launcher reports it
    folder = record(run_training)(train_config, resume=resume, force=force)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(
            f"run folder: {folder} (checkpoint: {folder / 'last'}, metrics: {folder / 'metrics.jsonl'})"
        )


def _setting(text: str) -> tuple[str, object]:
    """`section.knob=value` with the value read as TOML (a bare word is a string)."""
    from duetlm.config import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: write SECTION.KNOB=VALUE, e.g. --set objective.kl_beta=0")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


@app.command("plot-train")
@friendly_errors
def plot_train(run: Annotated[Path, typer.Argument(help="A run folder written by duet train.")]) -> None:
    """Signal length, λ and pair accuracy over steps, as RUN/training_curves.png."""
    from duetlm.train.plots import plot_training

    console.print(f"plot: {plot_training(run)}")


@app.command("pretrain-pair")
@friendly_errors
def pretrain_pair_command(
    out: Annotated[
        Path,
        typer.Option(help="Folder for tiny-M/ and tiny-m/ (copy them into src/duetlm/assets/ to ship them)."),
    ] = Path("runs/pretrain-pair"),
    seed: Annotated[int, typer.Option(help="Seed of data, initialization and tokenizer.")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.")] = 2,
    reuse_capable: Annotated[
        bool, typer.Option(help="Keep the M already trained in OUT; retrain m only.")
    ] = False,
    reuse_light: Annotated[
        bool, typer.Option(help="Keep the m already trained in OUT; retrain M only.")
    ] = False,
) -> None:
    """Retrain the embedded pair from scratch on the builtin task (about 25 minutes on 2 CPU cores)."""
    from duetlm.models.pretrain import PretrainConfig, pretrain_pair

    if reuse_capable and reuse_light:
        raise ConfigError("--reuse-capable and --reuse-light together leave nothing to train")
    report = pretrain_pair(
        out, PretrainConfig(seed=seed, threads=threads), reuse_capable=reuse_capable, reuse_light=reuse_light
    )
    for name in ("capable", "light"):
        part = report[name]
        status = "[green]passed[/]" if part["passed"] else "[red]did not pass[/]"
        console.print(
            f"{name}: {part['steps']} steps, {part['seconds']:.0f}s, gate {status}: {part['history'][-1]}"
        )
    console.print(f"saved to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
