"""`duet` commands for the tests, each in a process of its own, forked from one that has already
imported torch, transformers and duetlm.

A fresh interpreter spends about 8 of a `duet solve`'s 11 seconds importing; the suite runs
the command line some forty times. Here a server process imports once, and every command is a
`fork()` of it that runs `python -m duetlm.cli ARGS` as the interpreter would: its own stdout,
stderr, exit status, environment, working folder, logging set-up and atexit handlers. What
the fork shares with the server is only what was imported, with the environment the server
read at import time; so a command whose environment differs in what libraries read when they
are imported (`HF_*`, `TRANSFORMERS_*`, thread settings...) runs in a fresh interpreter
instead, as does one that needs its stdin. Commands a test must kill or signal use
`subprocess` directly.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DUET = [str(Path(sys.executable).with_name("duet"))]
SERVER_ENV = os.environ | {"HF_HUB_OFFLINE": "1"}
# environment variables some library reads when it is imported: a command that wants other
# values than the server's cannot be a fork of it
IMPORT_TIME = ("HF_", "TRANSFORMERS_", "VLLM_", "TORCH", "OMP_", "MKL_", "PYTHON", "CUDA")

SERVER = r"""
import gc, json, os, selectors, socket, sys

gc.disable()  # until the fork: a collection in the server would touch every page its children share

import torch, transformers  # noqa: F401  the imports every command pays
import duetlm.cli, duetlm.backends.hf, duetlm.evaluate, duetlm.tasks.registry  # noqa: F401
import transformers.models.llama.modeling_llama, transformers.models.qwen3.modeling_qwen3  # noqa: F401

gc.freeze()  # what was imported stays out of every child's collections, and so shared

listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(16)
waiting = {}  # child pid -> the connection that waits for its exit status
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
sys.stdout.write("ready\n")
sys.stdout.flush()
while True:
    for _ in selector.select(timeout=0.02):
        connection, _ = listener.accept()
        request = json.loads(connection.makefile().readline())
        pid = os.fork()
        if pid == 0:  # the command: the interpreter's own exit path ends it
            listener.close()
            connection.close()
            selector.close()
            gc.enable()
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY), (2, request["stderr"], os.O_WRONLY)):
                os.dup2(os.open(path, mode), fd)
            sys.argv = ["duet", *request["args"]]
            import runpy

            runpy.run_module("duetlm.cli", run_name="__main__", alter_sys=True)
            sys.exit(0)
        connection.sendall(f"{pid}\n".encode())
        waiting[pid] = connection
    while waiting:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        connection = waiting.pop(pid)
        connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        connection.close()
"""

_server: dict = {}


def _socket_path() -> str:
    if "path" not in _server or _server["process"].poll() is not None:
        folder = tempfile.mkdtemp(prefix="duet-forks-")
        path = os.path.join(folder, "socket")
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, path], stdout=subprocess.PIPE, env=SERVER_ENV, text=True
        )
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the fork server for `duet` commands did not start")
        _server.update(path=path, process=process, folder=folder)
    return _server["path"]


def _forkable(env: dict[str, str]) -> bool:
    keys = {k for k in env.keys() | SERVER_ENV.keys() if k.startswith(IMPORT_TIME)}
    return all(env.get(k) == SERVER_ENV.get(k) for k in keys)


def run_duet(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 600,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """`duet ARGS` as `subprocess.run(..., capture_output=True, text=True)` gives it."""
    env = SERVER_ENV if env is None else env
    if input is not None or not _forkable(env):
        return subprocess.run(
            [*DUET, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, input=input
        )
    with tempfile.TemporaryDirectory(prefix="duet-run-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        out.touch()
        err.touch()
        request = {
            "args": list(args),
            "env": dict(env),
            "cwd": str(cwd or os.getcwd()),
            "stdout": str(out),
            "stderr": str(err),
        }
        with socket.socket(socket.AF_UNIX) as connection:
            connection.connect(_socket_path())
            connection.sendall((json.dumps(request) + "\n").encode())
            replies = connection.makefile()
            pid = int(replies.readline())
            connection.settimeout(timeout)
            start = time.monotonic()
            try:
                code = replies.readline()
            except TimeoutError:
                os.kill(pid, 9)
                raise subprocess.TimeoutExpired([*DUET, *args], time.monotonic() - start) from None
        return subprocess.CompletedProcess([*DUET, *args], int(code), out.read_text(), err.read_text())


def run_command(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 600,
    capture_output: bool = True,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, ...)` for a command that starts
    with the `duet` executable."""
    if Path(command[0]).name != "duet" or not (capture_output and text):
        raise ValueError(f"run_command runs `duet ...` with its output captured as text, not {command}")
    return run_duet(*command[1:], env=env, cwd=cwd, timeout=timeout)


def stop_server() -> None:
    process = _server.pop("process", None)
    if process is not None:
        process.kill()
        process.wait()
        shutil.rmtree(_server.pop("folder"), ignore_errors=True)
        _server.pop("path")


atexit.register(stop_server)
