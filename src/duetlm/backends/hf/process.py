"""A model's streaming engine in a process of its own (`duet serve --engine process`).

In one process, the engine thread and the server's event loop take turns at the GIL: a
decode step of a small model is mostly Python calling short torch operations, and each
chunk the server formats holds up the next step. And on a CPU, an engine whose torch
operations are split over every core (OpenMP) stalls whenever anything else runs: each
operation waits for its slowest thread, and that thread's core was lent to the HTTP side.
Measured on a 2-core machine with the embedded pair (`bench/engine_ceiling.py`), the two
engines in one thread with 2 torch threads did 59 requests/s alone and 35 beside a process
keeping a core 35% busy; one process per model with one torch thread each did 59 alone and
59 beside the same load.

So each model gets a process that loads it and steps a
`StepEngine` from its main thread. The server process keeps the tokenizer (prompts are
rendered and counted there) and talks to each engine over a pipe: a submit or a cancel per
message one way, and one message per engine step the other way, holding every text delta
and result of that step. A reader thread hands them to the requests' listeners, so
`EngineProcess.submit` is a drop-in for `StepEngine.submit`.

The processes come from a fork server where there is one (Linux, macOS): a process started
clean that imports torch, transformers and the engine once, and never runs a torch operation,
so that each engine is a fork of it (safe, unlike a fork of a process whose torch has run)
and skips the 8 seconds of imports a fresh interpreter pays. Elsewhere they are spawned.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from duetlm.backends.base import GenerationResult, SamplingParams
from duetlm.errors import BackendError

logger = logging.getLogger(__name__)

Listener = Callable[[str | GenerationResult], None]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine process needs to load its model as the server's backend did."""

    location: str  # a local folder or a hub id, as resolved by the parent
    spec: str  # for messages
    device: str = "cpu"
    dtype: str = "auto"
    trust_remote_code: bool = False
    decode_step: str = "auto"
    threads: int | None = 1  # torch CPU threads of the process; None: torch's default
    admit_wait_s: float = 0.025  # as StepEngine


def failure(prompt_tokens: int, reason: str) -> GenerationResult:
    """The result a request gets when its engine cannot finish it (the shape StepEngine's own
    failures have: the backend turns it into a BackendError)."""
    return GenerationResult("", prompt_tokens, 0, "length", extra={"failure": reason})


class _OwnLoop:
    """The engine process steps its engine from its main thread: nothing to wake."""

    def register(self, engine) -> None:
        pass

    def wake(self) -> None:
        pass


# what the fork server imports once for every engine process it forks
PRELOAD = [
    "duetlm.backends.hf.engine",
    "duetlm.backends.hf.loading",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.generation.utils",
]


def _context():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts, with the first engine
    return context


def _load_engine(spec: EngineSpec):
    """The model loaded here, in this process, set up exactly as `HFBackend` sets up its own,
    under a step engine driven from this process's main thread."""
    from duetlm.backends.base import ContextGuard
    from duetlm.backends.hf.engine import StepEngine
    from duetlm.backends.hf.loading import (
        end_ids,
        eos_ids,
        load_tokenizer,
        load_weights,
        pick_device,
        resolve_model_location,
    )

    location, local = resolve_model_location(spec.location)
    tokenizer = load_tokenizer(location, local, spec.trust_remote_code)
    model = load_weights(location, local, spec.dtype, pick_device(spec.device), spec.trust_remote_code)
    context = ContextGuard(spec.spec, getattr(model.config, "max_position_embeddings", None))
    return StepEngine(
        model,
        tokenizer,
        end_ids(eos_ids(model.generation_config, tokenizer, spec.spec), tokenizer),
        context,
        decode_step=spec.decode_step,
        loop=_OwnLoop(),
        admit_wait_s=spec.admit_wait_s,
    )


def _serve(spec: EngineSpec, conn) -> None:  # the engine process's main
    # Ctrl-C reaches the whole process group; the server then drains its requests, so the
    # engine keeps stepping until the server closes it (or its end of the pipe goes away).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        engine = _load_engine(spec)
    except BaseException as exc:  # the parent raises it as a BackendError
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    outbox: list[tuple[int, str | GenerationResult]] = []
    handles: dict[int, object] = {}  # request id -> its StepEngine handle (None while submitting)

    def listener_for(request_id: int):
        def listener(event) -> None:
            outbox.append((request_id, event))
            if isinstance(event, GenerationResult):
                handles.pop(request_id, None)

        return listener

    try:
        conn.send(("ready", torch.get_num_threads()))
        while True:
            if not engine.has_work:
                conn.poll(None)  # idle: sleep until a message (or the parent's end) comes
            while conn.poll(0):
                message = conn.recv()
                if message is None:
                    return
                for command in message:
                    if command[0] == "submit":
                        _, request_id, prompt, sampling = command
                        handles[request_id] = None  # registered before submit may finish it
                        handle = engine.submit(prompt, sampling, listener_for(request_id))
                        if request_id in handles:
                            handles[request_id] = handle
                    elif command[0] == "cancel" and handles.get(command[1]) is not None:
                        handles[command[1]].cancel()
            if engine.has_work:
                try:
                    engine.step()
                except Exception as exc:  # a failed step fails its requests, never the process
                    logger.exception("engine step failed")
                    engine.fail_all(exc)
            if outbox:
                conn.send(outbox)
                outbox = []
    except (EOFError, BrokenPipeError):
        return  # the server went away


class ProcessHandle:
    """What a caller holds for a request in an engine process: it can cancel it."""

    def __init__(self, engine: EngineProcess, request_id: int) -> None:
        self._engine, self._id = engine, request_id

    def cancel(self) -> None:
        self._engine._cancel(self._id)


class EngineProcess:
    """A `StepEngine` in a child process, with `StepEngine.submit`'s interface. Listeners are
    called from one reader thread, in the order the engine produced the events."""

    def __init__(self, spec: EngineSpec, start_timeout_s: float = 900.0) -> None:
        self.spec = spec
        context = _context()
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(spec, child), name=f"duetlm-engine[{spec.spec}]", daemon=True
        )
        self._process.start()
        child.close()
        self.threads = self._wait_ready(start_timeout_s)
        self._send_lock = threading.Lock()
        self._listeners: dict[int, tuple[Listener, int]] = {}  # id -> (listener, prompt tokens)
        self._ids = itertools.count()
        self._closed = False
        self._gone: str | None = None  # why the process no longer answers, once it does not
        self._reader = threading.Thread(
            target=self._read, name=f"duetlm-engine-reader[{spec.spec}]", daemon=True
        )
        self._reader.start()
        logger.info("engine process %s for %s (%s torch threads)", self._process.pid, spec.spec, self.threads)

    def _wait_ready(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if not self._process.is_alive():
                raise BackendError(f"{self.spec.spec}: the engine process exited ({self._process.exitcode})")
            if time.monotonic() > deadline:
                self._process.kill()
                raise BackendError(
                    f"{self.spec.spec}: the engine process did not load within {timeout_s:.0f} s"
                )
        try:
            kind, detail = self._conn.recv()
        except EOFError:
            raise BackendError(f"{self.spec.spec}: the engine process exited while loading") from None
        if kind == "error":
            self._process.join(timeout=10)
            raise BackendError(f"{self.spec.spec}: the engine process could not start: {detail}")
        return int(detail)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def in_flight(self) -> int:
        """Requests submitted whose final result has not come back."""
        return len(self._listeners)

    def submit(self, prompt: list[int], sampling: SamplingParams, listener: Listener) -> ProcessHandle:
        request_id = next(self._ids)
        if self._gone is not None:
            listener(failure(len(prompt), self._gone))
            return ProcessHandle(self, request_id)
        self._listeners[request_id] = (listener, len(prompt))
        try:
            self._send([("submit", request_id, list(prompt), sampling)])
        except BackendError as exc:
            self._finish(request_id, failure(len(prompt), str(exc)))
        return ProcessHandle(self, request_id)

    def _cancel(self, request_id: int) -> None:
        if request_id in self._listeners:
            with contextlib.suppress(BackendError):  # the process is gone: the reader fails the request
                self._send([("cancel", request_id)])

    def _send(self, message) -> None:
        with self._send_lock:
            if self._closed:
                raise BackendError(f"{self.spec.spec}: the engine process is closed")
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:
                raise BackendError(f"{self.spec.spec}: the engine process is gone ({exc})") from None

    def _read(self) -> None:
        while True:
            try:
                events = self._conn.recv()
            except (EOFError, OSError):
                break
            for request_id, event in events:
                if isinstance(event, GenerationResult):
                    self._finish(request_id, event)
                else:
                    entry = self._listeners.get(request_id)
                    if entry is not None:
                        self._call(request_id, entry[0], event)
        # the process ended: every request still waiting gets a failure, none hangs
        reason = "the engine process ended" if self._closed else f"the engine process died ({self._exit()})"
        self._gone = reason
        for request_id in list(self._listeners):
            entry = self._listeners.get(request_id)
            if entry is not None:
                self._finish(request_id, failure(entry[1], reason))

    def _exit(self) -> str:
        self._process.join(timeout=5)
        code = self._process.exitcode
        return f"exit code {code}" if code is not None else "still running"

    def _finish(self, request_id: int, result: GenerationResult) -> None:
        entry = self._listeners.pop(request_id, None)
        if entry is not None:
            self._call(request_id, entry[0], result)

    def _call(self, request_id: int, listener: Listener, event: str | GenerationResult) -> None:
        """A listener that fails (its event loop is gone) means nobody waits: cancel."""
        try:
            listener(event)
        except Exception:
            self._cancel(request_id)

    def close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(None)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._reader.join(timeout=5)
        self._conn.close()
