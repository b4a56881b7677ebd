"""The FastAPI app: thin routes that translate OpenAI requests into `Duet` calls.

Routes: POST /v1/chat/completions (streaming and not), GET /v1/models, GET /health,
GET /metrics (Prometheus text). Every error leaves in the OpenAI shape
`{"error": {"message", "type", "param", "code"}}`, from one table of exception types.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from duetlm.errors import BackendError, ConfigError, GenerationError, InputError
from duetlm.protocol import Duet, Problem, SolveResult, parse_mode
from duetlm.serve.batcher import Batcher, BatchKey
from duetlm.serve.metrics import Metrics
from duetlm.serve.schemas import ChatCompletionRequest

logger = logging.getLogger(__name__)


class ServeConfig(BaseModel):
    """Server settings; the defaults are the safe ones (loopback, small bodies)."""

    name: str = Field("duet", description="The model name clients ask for.")
    api_key: str | None = Field(None, description="When set, /v1 routes need `Authorization: Bearer KEY`.")
    batch_window_ms: float = Field(10.0, ge=0, description="How long the first request waits for others.")
    max_batch: int = Field(32, ge=1, description="Most requests in one protocol batch.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")


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


def create_app(duet: Duet, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    metrics = Metrics()
    batcher = Batcher(duet, config.batch_window_ms / 1000, config.max_batch, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="duetlm", lifespan=lifespan)
    app.state.metrics, app.state.batcher = metrics, batcher

    def fail(status: int, message: str, kind: str, param=None, code=None) -> JSONResponse:
        metrics.observe_error(kind)
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        if request.url.path.startswith("/v1/"):
            if config.api_key is not None:
                header = request.headers.get("authorization", "")
                if header != f"Bearer {config.api_key}":
                    response = fail(
                        401,
                        "missing or wrong API key (Authorization: Bearer ...)",
                        "invalid_request_error",
                        code="invalid_api_key",
                    )
                    metrics.observe_request(401, time.perf_counter() - started)
                    return response
            length = request.headers.get("content-length")
            if request.method == "POST" and length is None:
                return fail(411, "a Content-Length header is required", "invalid_request_error")
            if length is not None and int(length) > config.max_body_bytes:
                metrics.observe_request(413, time.perf_counter() - started)
                return fail(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
        response = await call_next(request)
        if request.url.path == "/v1/chat/completions":
            metrics.observe_request(response.status_code, time.perf_counter() - started)
        return response

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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return fail(500, f"internal error: {type(exc).__name__}", "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "capable": duet.capable.spec, "light": duet.light.spec}

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
    async def chat_completions(body: ChatCompletionRequest):
        if body.model != config.name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {config.name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        if not body.question.strip():
            raise APIError(400, "messages need a non-empty user message", "invalid_request_error", "messages")
        try:
            mode = parse_mode(body.duet.mode)
        except InputError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "duet.mode") from None
        result = await batcher.submit(batch_key(body, str(mode)), Problem(body.question))
        metrics.observe_usage(result.usage)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                stream_chunks(completion_id, config.name, body, result, include_usage),
                media_type="text/event-stream",
            )
        return completion(completion_id, config.name, body, result)

    return app


def batch_key(body: ChatCompletionRequest, mode: str) -> BatchKey:
    update: dict = {}
    answer_budget = body.max_completion_tokens or body.max_tokens
    if answer_budget is not None:
        update |= {
            "answer_max_tokens": answer_budget,
            "alone_max_tokens": answer_budget,
            "light_alone_max_tokens": answer_budget,
        }
    if body.duet.signal_max_tokens is not None:
        update["signal_max_tokens"] = body.duet.signal_max_tokens
    for name in ("temperature", "top_p", "seed"):
        if getattr(body, name) is not None:
            update[name] = getattr(body, name)
    return BatchKey(mode, tuple(sorted(update.items())))


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


def stream_chunks(
    completion_id: str, name: str, body: ChatCompletionRequest, result: SolveResult, include_usage: bool
):
    """SSE chunks of a finished result: the protocol runs to completion first (m's answer is
    short), then the answer is sent in word-sized deltas."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
        }
        if usage is not None:
            data["usage"] = usage
            data["duet"] = duet_body(body, result)
        return f"data: {json.dumps(data)}\n\n"

    first = {"role": "assistant", "content": ""}
    if body.duet.return_signal:
        first["reasoning_content"] = result.signal
    yield chunk(first)
    text, start = result.text, 0
    while start < len(text):
        end = text.find(" ", start + 1)
        end = len(text) if end < 0 else end
        yield chunk({"content": text[start:end]})
        start = end
    yield chunk({}, finish_reason(result))
    if include_usage:
        yield chunk({}, usage=usage_body(result), choices=False)
    yield "data: [DONE]\n\n"
