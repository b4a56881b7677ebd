"""`duet solve`: questions answered by DUET or a baseline, with the usage per model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from duetlm.backends import load_backend
from duetlm.cli.app import app, console, friendly_errors
from duetlm.cli.options import (
    DEFAULT_CAPABLE,
    DEFAULT_LIGHT,
    ApiKeyOpt,
    CapableEngineOpt,
    CapableOpt,
    CapableTokenizerOpt,
    DeviceOpt,
    DtypeOpt,
    GpuMemoryOpt,
    LightEngineOpt,
    LightOpt,
    LightTokenizerOpt,
    SettleOpt,
    ThreadsOpt,
    backend_options,
    build_config,
    read_questions_jsonl,
)
from duetlm.cli.render import usage_table
from duetlm.errors import InputError
from duetlm.methods import method_help
from duetlm.protocol import Duet, Problem, SolveResult, parse_mode
from duetlm.usage import Usage


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
    mode: Annotated[str, typer.Option(help=method_help("One method"))] = "duet",
    signal_max_tokens: Annotated[int | None, typer.Option(help="M's signal budget in tokens.")] = None,
    answer_max_tokens: Annotated[int | None, typer.Option(help="m's answer budget in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    config: Annotated[Path | None, typer.Option(help="DuetConfig as TOML/YAML/JSON.")] = None,
    settle: SettleOpt = None,
    compare: Annotated[bool, typer.Option(help="Also run M-alone and report M-token savings.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per question.")] = False,
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
    """Answer questions with DUET (or a baseline mode) and print the usage per model."""
    if (question is None) == (file is None):
        raise InputError("give either a QUESTION argument or --file PATH (not both)")
    problems = read_questions_jsonl(file) if file is not None else [Problem(question or "")]
    if not problems[0].question.strip():
        raise InputError("the question is empty")
    parsed_mode = parse_mode(mode)
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
        batch_size=max(len(problems), 1) if file is not None else 1,
    )
    # the settings are checked before any model loads: a bad value fails at once
    duet_config = build_config(
        config, signal_max_tokens, answer_max_tokens, temperature, seed, (capable, light), settle
    )
    duet = Duet(load_backend(capable, capable_options), load_backend(light, light_options), duet_config)
    try:
        results = duet.solve_batch(problems, parsed_mode)
        baseline = duet.solve_batch(problems, "M-alone") if compare else None
    finally:
        duet.close()
    if as_json:
        for index, result in enumerate(results):
            row = result.to_dict()
            if baseline is not None:
                row["M_alone"] = baseline[index].to_dict()
            sys.stdout.write(json.dumps(row) + "\n")
        return
    render_results(results, baseline)


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
