"""Grading worker processes, for comparisons asked from threads other than the main one.

math-verify's timeout is an alarm signal, and only a main thread can take signals; a worker
process runs each comparison in its own main thread under that alarm. Workers are plain
`python -m duetlm.grading.workers` processes speaking JSON lines on stdin/stdout, not
`multiprocessing` children: those would re-import the user's main script (spawn) or copy a
process holding torch and CUDA state (fork). They start on first use, serve one comparison
at a time, and exit when the parent closes their stdin (or dies). A worker that does not
answer within the timeout plus a grace period is killed and replaced, so a hang costs one
comparison (reported as timed out), never the caller's thread.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
from collections.abc import Sequence

logger = logging.getLogger(__name__)

GRACE_S = 5.0
"""Seconds past the comparison's own timeout before a silent worker counts as hung."""


WORKER_COMMAND = (sys.executable, "-m", "duetlm.grading.workers")


class _Worker:
    def __init__(self, command: Sequence[str]) -> None:
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def ask(self, predicted: str, gold: str, timeout_s: float) -> bool | None:
        """The worker's verdict; raises TimeoutError when it stays silent, OSError when it died."""
        assert self.process.stdin is not None and self.process.stdout is not None
        request = json.dumps({"predicted": predicted, "gold": gold, "timeout_s": timeout_s})
        self.process.stdin.write(request.encode() + b"\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s + GRACE_S)
        if not ready:
            raise TimeoutError
        line = self.process.stdout.readline()
        if not line:
            raise OSError("grading worker exited")
        return json.loads(line)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class WorkerPool:
    """Up to `size` workers, each serving one thread at a time."""

    def __init__(self, size: int, command: Sequence[str] = WORKER_COMMAND) -> None:
        self.size, self.command = size, command
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []

    def _acquire(self) -> _Worker:
        while True:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                if len(self._workers) < self.size:
                    worker = _Worker(self.command)
                    self._workers.append(worker)
                    return worker
            try:  # all busy: wait for one, checking again for room left by a retired one
                return self._idle.get(timeout=0.1)
            except queue.Empty:
                continue

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._workers.remove(worker)

    def compare(self, predicted: str, gold: str, timeout_s: float) -> bool | None:
        for attempt in range(2):
            worker = self._acquire()
            try:
                verdict = worker.ask(predicted, gold, timeout_s)
            except TimeoutError:
                logger.warning("grading %r against %r: the worker hung; replacing it", predicted, gold)
                self._retire(worker)
                return None
            except (OSError, ValueError):  # it died (killed, out of memory): once more on a new one
                self._retire(worker)
                if attempt:
                    return None
                continue
            self._idle.put(worker)
            return verdict
        return None

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.kill()


_pool = WorkerPool(size=max(1, min(4, os.cpu_count() or 1)))
atexit.register(_pool.close)


def compare_in_worker(predicted: str, gold: str, timeout_s: float) -> bool | None:
    """math-verify's verdict from a worker process; None on timeout."""
    return _pool.compare(predicted, gold, timeout_s)


def _serve() -> None:
    from duetlm.grading.mathverify import compare_in_main_thread

    replies, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the replies
    for line in sys.stdin:
        request = json.loads(line)
        verdict = compare_in_main_thread(request["predicted"], request["gold"], request["timeout_s"])
        replies.write(json.dumps(verdict) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve()
