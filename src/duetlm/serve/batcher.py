"""Collects concurrent requests into protocol batches.

Requests wait in a queue; the worker takes the first, waits up to `window_s` for more (or
until `max_batch`), groups them by settings and runs each group as one `Duet.solve_batch` in
a worker thread. Only one batch runs at a time (a local model is not re-entrant), and the
requests that arrive meanwhile form the next batch, so throughput grows with concurrency. If
a batch fails, its requests are retried one by one, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass

from duetlm.protocol import Duet, Problem, SolveResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchKey:
    """Requests batch together only when every setting that changes generation is equal."""

    mode: str
    config_update: tuple[tuple[str, object], ...]


class Batcher:
    def __init__(self, duet: Duet, window_s: float = 0.01, max_batch: int = 32, metrics=None) -> None:
        self.duet, self.window_s, self.max_batch, self.metrics = duet, window_s, max_batch, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        while not self.queue.empty():
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()

    async def submit(self, key: BatchKey, problem: Problem) -> SolveResult:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((key, problem, future))
        return await future

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            deadline = asyncio.get_running_loop().time() + self.window_s
            while len(items) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            groups: dict[BatchKey, list] = defaultdict(list)
            for item in items:
                groups[item[0]].append(item)
            for key, group in groups.items():
                await self._run_group(key, group)

    async def _run_group(self, key: BatchKey, group: list) -> None:
        live = [(problem, future) for _, problem, future in group if not future.done()]
        if not live:
            return
        duet = Duet(
            self.duet.capable, self.duet.light, self.duet.config.model_copy(update=dict(key.config_update))
        )
        try:
            results = await asyncio.to_thread(duet.solve_batch, [p for p, _ in live], key.mode)
        except Exception as exc:
            if len(live) == 1:
                if not live[0][1].done():
                    live[0][1].set_exception(exc)
                return
            logger.warning("a batch of %d failed (%s); retrying its requests one by one", len(live), exc)
            for problem, future in live:
                await self._run_group(key, [(key, problem, future)])
            return
        if self.metrics is not None:
            self.metrics.observe_batch(len(live))
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)
