"""The `duet` application object, its consoles and the one place library errors become CLI
messages. Every command module registers itself on `app`."""

from __future__ import annotations

import functools
import logging
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from duetlm.errors import DuetError

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
