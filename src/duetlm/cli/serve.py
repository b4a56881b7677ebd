"""`duet serve`: DUET behind an OpenAI-compatible endpoint (docs/serving.md)."""

from __future__ import annotations

import concurrent.futures
import contextlib
from pathlib import Path
from typing import Annotated

import typer

from duetlm.backends import load_backend
from duetlm.backends.base import start_backend
from duetlm.cli.app import app, err_console, friendly_errors
from duetlm.cli.options import (
    DEFAULT_CAPABLE,
    DEFAULT_LIGHT,
    CapableEngineOpt,
    CapableOpt,
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
)
from duetlm.errors import InputError
from duetlm.protocol import Duet


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
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
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
    light_tokenizer: LightTokenizerOpt = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
    threads: ThreadsOpt = None,
    capable_engine: CapableEngineOpt = None,
    light_engine: LightEngineOpt = None,
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
    capable_options, light_options = backend_options(
        device=device,
        dtype=dtype,
        api_key=upstream_api_key,
        gpu_memory_utilization=gpu_memory_utilization,
        light_tokenizer=light_tokenizer,
        threads=threads,
        capable_engine=capable_engine,
        light_engine=light_engine,
        streaming=streaming,
        decode_step=decode_step,
        engine=engine if streaming else "thread",  # the batch scheduler runs generate() here
        engine_threads=engine_threads or None,
        batch_size=max_batch,
    )
    duet_config = build_config(config, None, None, None, None, (capable, light), settle)
    duet = Duet(load_backend(capable, capable_options), load_backend(light, light_options), duet_config)
    if streaming:  # engine processes load their models now, side by side, not at the first request
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(start_backend, (duet.capable, duet.light)))
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
        duet.close()
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
