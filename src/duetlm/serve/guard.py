"""What every request passes first: the API key, the body-size checks, and the count of its
status and time by route.

A plain ASGI middleware rather than a `BaseHTTPMiddleware`: that one sees a streamed
response only when its headers are ready, so a stream's latency was recorded as the time to
its first byte (a 0.4 s stream counted as a few milliseconds), and it relays every chunk
through an extra queue. Here the status is read from the response's start message and the
time is taken when its last byte is sent.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

Fail = Callable[..., Response]
"""fail(status, message, kind, param=None, code=None): an error response in the OpenAI shape."""


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        routes: tuple[str, ...],
        observe: Callable[[str, int, float], None],
        fail: Fail,
    ) -> None:
        self.app, self.max_body_bytes, self.routes, self.observe, self.fail = (
            app,
            max_body_bytes,
            routes,
            observe,
            fail,
        )
        self.expected_key = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, path = time.perf_counter(), scope["path"]
        status: int | None = None

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        refusal = self.refusal(path, scope["method"], Headers(scope=scope))
        try:
            if refusal is not None:
                await refusal(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        except Exception as exc:  # an error no handler turned into a response
            logger.exception("unhandled error")
            if status is not None:  # the response has begun: the server can only cut it off
                status = 500
                raise
            response = self.fail(500, f"internal error: {type(exc).__name__}", "internal_error")
            await response(scope, receive, send_counted)
        finally:
            route = path if path in self.routes else "other"
            self.observe(route, status or 500, time.perf_counter() - started)

    def refusal(self, path: str, method: str, headers: Headers) -> Response | None:
        """The error response a /v1 request gets before any work, or None."""
        if not path.startswith("/v1/"):
            return None
        given = headers.get("authorization", "").encode()
        if self.expected_key is not None and not hmac.compare_digest(given, self.expected_key):
            return self.fail(
                401,
                "missing or wrong API key (Authorization: Bearer ...)",
                "invalid_request_error",
                code="invalid_api_key",
            )
        length = headers.get("content-length")
        if method == "POST" and length is None:
            return self.fail(411, "a Content-Length header is required", "invalid_request_error")
        if length is not None and not length.isdigit():
            return self.fail(400, "the Content-Length header is not a number", "invalid_request_error")
        if int(length or 0) > self.max_body_bytes:
            return self.fail(413, f"request body over {self.max_body_bytes} bytes", "invalid_request_error")
        return None
