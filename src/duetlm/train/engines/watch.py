"""An engine that outlives its trainer holds its memory forever, so each engine watches the
trainer that started it and ends itself when the trainer is gone.

vLLM puts its worker (where the watch runs) in one of three places, and the watch must end
the engine in each without touching anything else:

- **mp**: trainer -> engine core process -> worker process (vLLM's CPU build; several GPUs);
- **uni**: trainer -> engine core process, the worker inside it (CUDA with one GPU per engine);
- **in-process**: the worker inside the trainer's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).

The engine's *top* process is the one on the worker's chain of parents whose parent is the
trainer: the engine core in the first two layouts, none in the third (the engine dies with
the trainer's process, and there is nothing to watch). The top is found once, while the
trainer lives (an orphan is re-parented, and its chain no longer leads to the trainer). The
trainer is known by its pid and its start time, so a new process that reuses the pid is not
taken for it. When the trainer is gone the watch kills the top (which takes a worker process
with it through vLLM's own shutdown) and ends its own process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)


def process_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, else None (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie has ended; only its exit status is left
        return None
    return int(fields[1]), int(fields[19])


def engine_top(trainer_pid: int, pid: int | None = None) -> int | None:
    """The process on `pid`'s chain of parents whose parent is the trainer (the engine's top),
    `pid` itself when the trainer is its parent; None when `pid` is the trainer's own process
    or the trainer is no ancestor of it."""
    current = os.getpid() if pid is None else pid
    if current == trainer_pid:
        return None
    for _ in range(64):  # a chain of parents is short; a cycle or a broken /proc ends here
        stat = process_stat(current)
        if stat is None or stat[0] <= 1:
            return None
        if stat[0] == trainer_pid:
            return current
        current = stat[0]
    return None


def watch_owner(trainer_pid: int, interval_s: float = 1.0) -> bool:
    """Start watching the trainer from the engine this process belongs to; False when there is
    nothing to watch (the worker runs in the trainer's own process, or /proc tells nothing)."""
    top = engine_top(trainer_pid)
    owner = process_stat(trainer_pid)
    if top is None or owner is None:
        return False
    started = owner[1]
    threading.Thread(target=_watch, args=(trainer_pid, started, top, interval_s), daemon=True).start()
    return True


def _watch(trainer_pid: int, started: int, top: int, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        stat = process_stat(trainer_pid)
        if stat is not None and stat[1] == started:
            continue
        # the trainer is gone: end the engine's top process (unless it is this one) and this one
        if top != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(top, signal.SIGKILL)
        os._exit(1)
