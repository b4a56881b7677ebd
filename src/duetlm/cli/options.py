"""What several commands share: the option types, one builder of backend options for M and m,
the DuetConfig a command runs with, and small parsers of repeated KEY=VALUE flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from duetlm.backends import BackendOptions
from duetlm.config import DuetConfig
from duetlm.errors import InputError
from duetlm.problems import Problem

DEFAULT_CAPABLE = "tiny-M"
DEFAULT_LIGHT = "tiny-m"

CapableOpt = Annotated[
    str,
    typer.Option(
        "--capable",
        "-M",
        help="Capable model M: hf:PATH_OR_ID, openai:MODEL@URL, vllm:PATH_OR_ID, llamacpp:FILE.gguf, "
        "or an installed model's name after any of them (hf:qwen2.5-coder-1.5b; `duet models list`).",
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
DeviceOpt = Annotated[str, typer.Option(help="hf backend device: auto, cpu, cuda, mps.")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="hf and vllm: auto, float32, bfloat16 or float16. auto on a CPU: bfloat16 for a model "
        "stored in bfloat16 when the CPU computes it natively (AVX512-BF16, AMX), else float32."
    ),
]
ApiKeyOpt = Annotated[str | None, typer.Option(help="Key for openai: specs (else $OPENAI_API_KEY).")]
CapableTokenizerOpt = Annotated[
    str | None, typer.Option(help="openai: M's tokenizer (a folder or hub id), for exact token counts.")
]
LightTokenizerOpt = Annotated[
    str | None,
    typer.Option(
        help="openai: m's tokenizer, to send its pre-filled turn as a completion (without it, a chat "
        "request continues the turn; a server that echoes the prefill has it stripped)."
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(min=1, help="llamacpp: CPU threads of each llama.cpp server (default: all cores)."),
]
CapableEngineOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="KEY=VALUE (repeatable): M's own engine settings, over the shared ones: "
        "tensor_parallel_size, gpu_memory_utilization, max_model_len (vllm), threads (llamacpp), dtype."
    ),
]
LightEngineOpt = Annotated[
    list[str] | None,
    typer.Option(help="KEY=VALUE (repeatable): m's own engine settings, as --capable-engine."),
]
FieldOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="PART=EXPR (repeatable): which fields hold the question, answer, choices or id, for every "
        "task read from a file or the hub. EXPR: a field (a|b: the first present; a.b: nested), a "
        "format string '{Body} {Question}', boxed:FIELD (gold in its last \\boxed), ####:FIELD. "
        "meta.NAME=EXPR keeps a field on each example for report --by NAME.",
    ),
]


ENGINE_KEYS = {
    "gpu_memory_utilization": float,
    "tensor_parallel_size": int,
    "max_model_len": int,
    "threads": int,
    "dtype": str,
}
"""What `--capable-engine` / `--light-engine KEY=VALUE` may set for one role's engine."""


def role_engine(items: list[str] | None, flag: str) -> dict:
    """`KEY=VALUE` engine settings of one role, typed; a clear error for any other key or value."""
    settings = {}
    for key, value in key_values(items, flag, "KEY=VALUE").items():
        if key not in ENGINE_KEYS:
            raise InputError(f"{flag} {key}=...: use one of {', '.join(ENGINE_KEYS)}")
        try:
            settings[key] = ENGINE_KEYS[key](value)
        except ValueError:
            raise InputError(f"{flag} {key}={value!r}: expected a {ENGINE_KEYS[key].__name__}") from None
    return settings


def backend_options(
    *,
    device: str = "auto",
    dtype: str = "auto",
    api_key: str | None = None,
    gpu_memory_utilization: float | None = None,
    capable_tokenizer: str | None = None,
    light_tokenizer: str | None = None,
    threads: int | None = None,
    capable_engine: list[str] | None = None,
    light_engine: list[str] | None = None,
    **settings,
) -> tuple[BackendOptions, BackendOptions]:
    """M's and m's backend options from a command's flags: the same settings for both, then
    each role's own (`--capable-engine`, `--light-engine`: a 32B M over 4 GPUs beside a small m
    on one) and the tokenizer each model's pre-filled turns are rendered with."""
    shared = BackendOptions(
        device=device,
        dtype=dtype,
        api_key=api_key,
        gpu_memory_utilization=gpu_memory_utilization,
        threads=threads,
        **settings,
    )
    capable = role_engine(capable_engine, "--capable-engine")
    light = role_engine(light_engine, "--light-engine")
    return (
        dataclasses.replace(shared, tokenizer=capable_tokenizer, **capable),
        dataclasses.replace(shared, tokenizer=light_tokenizer, **light),
    )


def build_config(
    path,
    signal_max_tokens,
    answer_max_tokens,
    temperature,
    seed,
    specs: tuple[str, ...] = (),
    settle: list[str] | None = None,
) -> DuetConfig:
    """The DuetConfig of a command: the file's, else the defaults for these models (the
    embedded pair's budgets, an installed pair's own prompts and budgets), with the flags on
    top (`--settle KEY=VALUE` on its section)."""
    from duetlm.config import validate_config
    from duetlm.models import config_defaults

    base = DuetConfig.load(path) if path is not None else config_defaults(*specs)
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


def key_values(items: list[str] | None, flag: str, form: str) -> dict[str, str]:
    """`KEY=VALUE` options as a dict; a clear error for any other form."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} takes {form}, got {item!r}")
        pairs[key.strip()] = value
    return pairs


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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
