"""A llama.cpp server that duetlm starts for one model and stops with it.

The server runs in a process of its own (`process.py`): llama.cpp's threads and memory stay out
of the caller's process, a crash in it is a clear error here rather than a dead interpreter, and
ending it frees everything it held. It listens on a loopback port the OS picks, so several
models (M and m) and several runs never collide.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from duetlm.errors import BackendError

logger = logging.getLogger(__name__)


class LlamaCppServer:
    """Start with `start()`; `url` is then the server's root; `stop()` (or the interpreter's
    exit) ends it."""

    def __init__(
        self, model: str | Path, *, parallel: int = 1, ctx_per_slot: int = 4096, threads: int | None = None
    ) -> None:
        self.model = Path(model)
        self.parallel, self.ctx_per_slot = parallel, ctx_per_slot
        self.threads = threads or os.cpu_count() or 1
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.log_path: Path | None = None

    def start(self, timeout_s: float = 300.0) -> str:
        if self.process is not None:
            return self.url or ""
        if not self.model.is_file():
            raise BackendError(f"llamacpp: no GGUF file at {self.model}")
        try:
            import xllamacpp  # noqa: F401  (fail here, with the fix, not in the child)
        except ImportError as exc:
            raise BackendError("llamacpp: models need xllamacpp: pip install 'duetlm[llamacpp]'") from exc
        log = tempfile.NamedTemporaryFile(prefix="duetlm-llamacpp-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(log.name)
        command = [
            sys.executable,
            "-m",
            "duetlm.backends.llamacpp.process",
            "--model",
            str(self.model),
            "--parallel",
            str(self.parallel),
            "--ctx-per-slot",
            str(self.ctx_per_slot),
            "--threads",
            str(self.threads),
        ]
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1
        )
        log.close()
        atexit.register(self.stop)
        line = self._first_line(timeout_s)
        try:
            self.url = json.loads(line)["url"]
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise BackendError(
                f"llamacpp: the server for {self.model.name} did not start: {self._log_tail()}"
            ) from None
        logger.info(
            "llamacpp: %s on %s (%d slots of %d tokens, %d threads) in %.1f s",
            self.model.name,
            self.url,
            self.parallel,
            self.ctx_per_slot,
            self.threads,
            time.perf_counter() - started,
        )
        return self.url

    def _first_line(self, timeout_s: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            self.stop()
            raise BackendError(
                f"llamacpp: the server for {self.model.name} did not start within {timeout_s:.0f} s"
            )
        return self.process.stdout.readline()

    def _log_tail(self, lines: int = 8) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "no log"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "an empty log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """End the server (closing its stdin is its signal; a server that lingers is killed)."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        try:
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
