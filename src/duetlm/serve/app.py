"""The FastAPI app: thin routes that translate OpenAI requests into `Duet` calls.

Routes: POST /v1/chat/completions (streaming and not), GET /v1/models, GET /health,
GET /metrics (Prometheus text), GET / (the playground page). Every error leaves in the OpenAI
shape `{"error": {"message", "type", "param", "code"}}`, from one table of exception types;
unknown routes and methods too.

Scheduling (`ServeConfig.scheduler`): `continuous` (the default) runs each request through
`Duet.astream`: M's tokens stream as `reasoning_content` while M writes, the request moves
on to m as soon as its own signal ends, and the hf backend batches every request in flight
step by step (`duet serve` puts each model's engine in a process of its own:
`backends.hf.process`). `batch` gathers requests for `batch_window_ms` and runs them through
`solve_batch` together (the older scheduler, kept for comparison): nothing streams until
the whole protocol is done. A client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from duetlm.backends.base import capabilities_of
from duetlm.errors import BackendError, ConfigError, GenerationError, InputError
from duetlm.methods import method_for, parse_mode
from duetlm.protocol import Duet, Problem, SolveResult
from duetlm.serve.batcher import Batcher, BatchKey
from duetlm.serve.guard import Guard
from duetlm.serve.metrics import Metrics
from duetlm.serve.schemas import ChatCompletionRequest
from duetlm.streaming import AnswerDelta, Finished, SignalDelta

logger = logging.getLogger(__name__)

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions")


class ServeConfig(BaseModel):
    """Server settings; the defaults are the safe ones (loopback, small bodies)."""

    name: str = Field("duet", description="The model name clients ask for.")
    api_key: str | None = Field(
        None,
        description="When set, /v1 routes need `Authorization: Bearer KEY` (CLI: --api-key or $DUET_API_KEY).",
    )
    scheduler: Literal["continuous", "batch"] = Field(
        "continuous",
        description="continuous: stream and batch step by step; batch: gather, then solve together.",
    )
    batch_window_ms: float = Field(
        10.0, ge=0, description="batch scheduler: how long the first request waits."
    )
    max_batch: int = Field(32, ge=1, description="batch scheduler: most requests in one protocol batch.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    stream_interval_ms: float = Field(
        40.0,
        ge=0,
        description="Streams send text at most this often per kind (reasoning, answer); what comes sooner "
        "is joined into the next chunk. 0 sends every delta. 40 ms is faster than a reader notices.",
    )


class APIError(Exception):
    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


# One table: library exception type -> (HTTP status, OpenAI error type).
ERROR_TABLE: dict[type[Exception], tuple[int, str]] = {
    InputError: (400, "invalid_request_error"),
    ConfigError: (400, "invalid_request_error"),
    BackendError: (502, "backend_error"),
    GenerationError: (500, "generation_error"),
}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(duet: Duet, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    metrics = Metrics()
    batcher = (
        Batcher(duet, config.batch_window_ms / 1000, config.max_batch, metrics)
        if config.scheduler == "batch"
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if batcher is not None:
            batcher.start()
        yield
        if batcher is not None:
            await batcher.stop()

    app = FastAPI(title="duetlm", lifespan=lifespan)
    app.state.metrics, app.state.batcher = metrics, batcher

    def fail(status: int, message: str, kind: str, param=None, code=None) -> JSONResponse:
        metrics.observe_error(kind)
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    app.add_middleware(
        Guard,
        api_key=config.api_key,
        max_body_bytes=config.max_body_bytes,
        routes=ROUTES,
        observe=metrics.observe_request,
        fail=fail,
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        messages = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        return fail(exc.status_code, messages.get(exc.status_code, str(exc.detail)), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return fail(400, "the request body is not valid JSON", "invalid_request_error")
        return fail(
            400, f"{'.'.join(loc) or 'body'}: {first['msg']}", "invalid_request_error", ".".join(loc) or None
        )

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return fail(exc.status, exc.message, exc.kind, exc.param, exc.code)

    async def library_error(request: Request, exc: Exception):
        status, name = next(v for k, v in ERROR_TABLE.items() if isinstance(exc, k))
        return fail(status, str(exc), name)

    for kind in ERROR_TABLE:
        app.add_exception_handler(kind, library_error)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        metrics.observe_disconnect()
        return Response(status_code=499)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(
            resources.files("duetlm.serve").joinpath("static/playground.html").read_text("utf-8")
        )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "capable": duet.capable.spec,
            "light": duet.light.spec,
            "scheduler": config.scheduler,
        }

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": config.name, "object": "model", "created": 0, "owned_by": "duetlm"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != config.name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {config.name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        try:
            problem = body.problem()
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "messages") from None
        try:
            mode = parse_mode(body.duet.mode)
        except InputError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "duet.mode") from None
        solver = Duet(duet.capable, duet.light, duet.config.model_copy(update=config_update(body)))
        check_context(solver, problem, mode)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if batcher is not None:
            events = batched_events(
                batcher, BatchKey(str(mode), tuple(sorted(config_update(body).items()))), problem
            )
        else:
            events = solver.astream(problem, mode)
        if body.stream:
            return StreamingResponse(
                sse(completion_id, config.name, body, events, metrics, config.stream_interval_ms / 1000),
                media_type="text/event-stream",
            )
        result = await until_finished(events, request)
        metrics.observe_usage(result.usage)
        return completion(completion_id, config.name, body, result)

    return app


def config_update(body: ChatCompletionRequest) -> dict:
    """The request's own settings over the server's DuetConfig. An unseeded request samples
    with a fresh seed (two of them differ); a seeded one repeats."""
    update: dict = {"seed": body.seed}
    answer_budget = body.max_completion_tokens or body.max_tokens
    if answer_budget is not None:
        update |= {
            "answer_max_tokens": answer_budget,
            "alone_max_tokens": answer_budget,
            "light_alone_max_tokens": answer_budget,
        }
    if body.duet.signal_max_tokens is not None:
        update["signal_max_tokens"] = body.duet.signal_max_tokens
    for name in ("temperature", "top_p"):
        if getattr(body, name) is not None:
            update[name] = getattr(body, name)
    return update


def check_context(solver: Duet, problem: Problem, mode) -> None:
    """Refuse, before any work, a prompt that leaves no room in the context of the model that
    reads it first (the method says which); budgets are cut to what is left when generating.
    A backend that cannot count a prompt, or knows no context length, is not checked here."""
    backend, request = method_for(mode).first_read(solver, problem)
    capabilities = capabilities_of(backend)
    limit = capabilities.context_length
    if limit is None or not capabilities.prompt_tokens:
        return
    tokens = backend.prompt_tokens(request)
    if tokens >= limit:
        raise APIError(
            400,
            f"the prompt has {tokens} tokens; {backend.spec} reads at most {limit}, and needs room to answer",
            "invalid_request_error",
            "messages",
            "context_length_exceeded",
        )


async def batched_events(batcher: Batcher, key: BatchKey, problem: Problem) -> AsyncIterator:
    """The batch scheduler's result as the same events, all at the end."""
    result = await batcher.submit(key, problem)
    if result.signal:
        yield SignalDelta(result.signal)
    yield AnswerDelta(result.text)
    yield Finished(result)


async def until_finished(events: AsyncIterator, request: Request) -> SolveResult:
    """The final result, abandoning the work if the client disconnects first."""

    async def consume() -> SolveResult:
        async for event in events:
            if isinstance(event, Finished):
                return event.result
        raise GenerationError("the protocol ended without a result")

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await events.aclose()


def usage_body(result: SolveResult) -> dict:
    c, m = result.usage.capable, result.usage.light
    prompt, output = c.prompt_tokens + m.prompt_tokens, c.output_tokens + m.output_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "duet": {
            "capable": {"prompt_tokens": c.prompt_tokens, "output_tokens": c.output_tokens},
            "light": {"prompt_tokens": m.prompt_tokens, "output_tokens": m.output_tokens},
            "signal_tokens": result.signal_tokens,
            "cost": result.usage.cost,
        },
    }


def finish_reason(result: SolveResult) -> str:
    last = result.light_finish if result.light_finish is not None else result.capable_finish
    return "length" if last == "length" else "stop"


def duet_body(body: ChatCompletionRequest, result: SolveResult) -> dict:
    extra = {
        "mode": result.mode,
        "signal_tokens": result.signal_tokens,
        "truncated": result.truncated,
        "answer": result.answer,
    }
    if result.handover is not None:
        extra["handover"] = result.handover
    if body.duet.return_signal:
        extra["signal"] = result.signal
    return extra


def completion(completion_id: str, name: str, body: ChatCompletionRequest, result: SolveResult) -> dict:
    message = {"role": "assistant", "content": result.text}
    if body.duet.return_signal:
        message["reasoning_content"] = result.signal
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason(result), "logprobs": None}
        ],
        "usage": usage_body(result),
        "duet": duet_body(body, result),
    }


async def sse(
    completion_id: str,
    name: str,
    body: ChatCompletionRequest,
    events: AsyncIterator,
    metrics: Metrics,
    interval_s: float = 0.0,
):
    """Server-sent chunks as the events come: the signal as `reasoning_content` (when asked
    for), the answer as `content`, a finish chunk, usage when `stream_options.include_usage`.
    Text that arrives less than `interval_s` after the last chunk of its kind waits and goes
    out with the next one (or at the end), so a fast model costs fewer, larger chunks."""
    created = int(time.time())
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    head = json.dumps(
        {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name}
    )[:-1]

    def chunk(delta: dict, finish: str | None = None, extra: dict | None = None, choices: bool = True) -> str:
        listed = [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []
        tail = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in (extra or {}).items())
        return f'data: {head}, "choices": {json.dumps(listed)}{tail}}}\n\n'

    pending = {"reasoning_content": "", "content": ""}
    sent_at = {"reasoning_content": 0.0, "content": 0.0}

    def text_chunks(key: str, text: str, force: bool = False) -> list[str]:
        pending[key] += text
        now = time.perf_counter()
        if not pending[key] or (not force and now - sent_at[key] < interval_s):
            return []
        out, pending[key], sent_at[key] = [chunk({key: pending[key]})], "", now
        return out

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in events:
            if isinstance(event, SignalDelta):
                if body.duet.return_signal:
                    for line in text_chunks("reasoning_content", event.text):
                        yield line
            elif isinstance(event, AnswerDelta):
                for line in text_chunks("reasoning_content", "", force=True) + text_chunks(
                    "content", event.text
                ):
                    yield line
            elif isinstance(event, Finished):
                for key in ("reasoning_content", "content"):
                    for line in text_chunks(key, "", force=True):
                        yield line
                result = event.result
                metrics.observe_usage(result.usage)
                yield chunk({}, finish_reason(result))
                if include_usage:
                    yield chunk(
                        {},
                        extra={"usage": usage_body(result), "duet": duet_body(body, result)},
                        choices=False,
                    )
                finished = True
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the stream has begun: the error goes in it, in the OpenAI shape
        status, kind = next(
            (v for k, v in ERROR_TABLE.items() if isinstance(exc, k)), (500, "internal_error")
        )
        logger.warning("stream failed (%s): %s", status, exc)
        metrics.observe_error(kind)
        yield f"data: {json.dumps(error_body(str(exc), kind))}\n\n"
        finished = True
    finally:
        if not finished:
            metrics.observe_disconnect()
        await events.aclose()
