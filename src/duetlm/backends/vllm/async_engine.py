"""vLLM's async engine as a streaming backend, for `duet serve --capable vllm:...`.

vLLM schedules every request in flight itself (continuous batching, paged KV cache), so the
server hands each request over as it comes and streams what vLLM returns: `generate()` of
`vllm.AsyncLLMEngine` with `RequestOutputKind.DELTA` yields the new tokens of each step, and
`abort(request_id)` stops a request whose client left.

The engine lives on an event loop of its own, in a thread of this backend: vLLM's output
handler is a task bound to the loop it first ran on, and the same engine is used from the
server's loop (`astream`) and from plain calls (`generate`, e.g. `Duet.solve`). Each stream
runs as a task on the engine's loop and hands its items to the caller's loop through an
`Inbox`; a caller that stops reading cancels that task, which aborts the vLLM request.
Prompts are rendered and counted as the offline backend does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from duetlm.backends.base import ContextGuard, GenerationRequest, GenerationResult, StreamItem
from duetlm.backends.handoff import Inbox
from duetlm.backends.vllm.offline import VLLMTokenizing, result_of, vllm_sampling
from duetlm.backends.vllm.start import VLLMSettings, engine_arguments, require_vllm, start
from duetlm.errors import BackendError

_END = object()  # after the result: the stream is over


class VLLMAsyncBackend(VLLMTokenizing):
    streams = True

    def __init__(
        self, path_or_id: str, *, settings: VLLMSettings | None = None, spec: str | None = None
    ) -> None:
        vllm = require_vllm()
        from vllm.sampling_params import RequestOutputKind

        from duetlm.backends.hf import resolve_model_location

        settings = settings or VLLMSettings()
        location, local = resolve_model_location(path_or_id)
        self._vllm, self._delta = vllm, RequestOutputKind.DELTA
        self.spec = spec or f"vllm:{path_or_id}"
        args = vllm.AsyncEngineArgs(**engine_arguments(location, settings, self.spec))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-async", daemon=True)
        self._thread.start()
        try:
            self.engine = start(self.spec, lambda: self._on_loop(self._build(vllm, args)), settings)
        except BaseException:
            self._stop_loop()
            raise
        self._load_tokenizer(location, local)
        self.context = ContextGuard(self.spec, self.engine.model_config.max_model_len)

    @staticmethod
    async def _build(vllm, args):
        return vllm.AsyncLLMEngine.from_engine_args(args)

    def _on_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def running_requests(self) -> int:
        """Requests vLLM holds now (0 once every stream ended or was aborted)."""
        return self.engine.get_num_unfinished_requests()

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """Text deltas, then the result with vLLM's exact token counts; closing the iterator
        (a client that left) aborts the request in vLLM."""
        ids = self.prompt_ids(request)
        budget = self.context.fit(len(ids), request.sampling.max_tokens)
        if budget == 0:
            yield ContextGuard.overflow_result(len(ids))
            return
        inbox = Inbox(asyncio.get_running_loop())
        task = asyncio.run_coroutine_threadsafe(self._produce(request, ids, budget, inbox.post), self._loop)
        try:
            while True:
                for item in await inbox.take():
                    if item is _END:
                        return
                    if isinstance(item, BaseException):
                        raise BackendError(f"{self.spec}: generation failed ({item})") from item
                    yield item
        finally:
            task.cancel()

    async def _produce(self, request: GenerationRequest, ids: list[int], budget: int, post) -> None:
        """On the engine's loop: run one request, posting deltas, the result, then the end."""

        def deliver(item) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's event loop is gone
                post(item)

        sampling = replace(request.sampling, max_tokens=budget)
        params = vllm_sampling(self._vllm, sampling, output_kind=self._delta)
        request_id, started, text, tokens = uuid.uuid4().hex, time.perf_counter(), "", []
        last = None
        finished = False
        try:
            async for output in self.engine.generate({"prompt_token_ids": ids}, params, request_id):
                step = output.outputs[0]
                tokens += list(step.token_ids)
                last = step
                if step.text:
                    text += step.text
                    deliver(step.text)
                finished = output.finished
            if last is None:
                raise BackendError("vLLM returned no output")
            seconds = time.perf_counter() - started
            result = result_of(last, len(ids), request.sampling, seconds, text=text, token_ids=tokens)
            result.budget_clamped = budget < request.sampling.max_tokens
            deliver(result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            deliver(exc)
        finally:
            if not finished:
                await self.engine.abort(request_id)  # the caller left before the end
            deliver(_END)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Every request at once through the engine (it batches them), from any thread."""

        async def one(request: GenerationRequest) -> GenerationResult:
            return [item async for item in self.astream(request)][-1]

        async def every() -> list[GenerationResult]:
            return list(await asyncio.gather(*(one(r) for r in requests)))

        runner = concurrent.futures.ThreadPoolExecutor(1)  # a loop of its own, whatever the caller's
        try:
            return runner.submit(asyncio.run, every()).result()
        finally:
            runner.shutdown()

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            self._on_loop(self._shutdown(engine))
        self._stop_loop()

    @staticmethod
    async def _shutdown(engine) -> None:
        """On the engine's loop: its output handler stops before the engine core does (else it
        reads from a dead core and logs an error)."""
        handler = getattr(engine, "output_handler", None)
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(BaseException):
                await handler
        engine.shutdown()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
