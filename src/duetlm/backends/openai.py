"""Backend for any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, hosted APIs).

Calls go through the official `openai` client, concurrently up to a limit, with retries and
exponential backoff on 429, 5xx, timeouts and refused connections (each retry counted in the
result). A pre-filled assistant turn (m's `<think>\\n{signal}\\n</think>\\n\\n`) goes to the
completions endpoint with the prompt rendered by m's own tokenizer when one is given, else to
chat completions with `continue_final_message` (vLLM supports it). Some servers (llama.cpp's
`llama-server`) continue a final assistant message but return it whole, the prefill and then
the continuation, as the content: the echoed prefill is cut off here (`strip_echo`), in
replies and in streams alike, so that m's text is only what m wrote and a box inside M's
signal is never graded as m's answer. Token counts are the server's `usage`, never estimated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence

import openai

from duetlm.backends.base import (
    BaseBackend,
    Capabilities,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ReasoningDelta,
    StreamItem,
    cut_at_stop,
    render_chat,
)
from duetlm.errors import BackendError, GenerationError

logger = logging.getLogger(__name__)


def strip_echo(content: str, prefill: str) -> tuple[str, bool]:
    """`content` without a copy of the pre-filled turn at its start, and whether there was one.
    A server may drop the prefill's trailing whitespace when it echoes it."""
    if not prefill:
        return content, False
    for head in (prefill, prefill.rstrip()):
        if head and content.startswith(head):
            return content[len(head) :], True
    return content, False


class EchoFilter:
    """The same cut on a stream: text is held until it either shows the echoed prefill (which
    is dropped) or departs from it (and is let through whole)."""

    def __init__(self, prefill: str) -> None:
        self.prefill, self.held, self.decided = prefill, "", not prefill
        self.echoed = False

    def feed(self, piece: str) -> str:
        if self.decided:
            return piece
        self.held += piece
        if self.prefill.startswith(self.held) or self.prefill.rstrip().startswith(self.held):
            return ""  # still inside a possible echo
        return self._decide()

    def close(self) -> str:
        return "" if self.decided else self._decide()

    def _decide(self) -> str:
        self.decided = True
        text, self.echoed = strip_echo(self.held, self.prefill)
        self.held = ""
        return text


_RETRYABLE = (
    openai.RateLimitError,
    openai.InternalServerError,
    openai.APITimeoutError,
    openai.APIConnectionError,
)


class OpenAIBackend(BaseBackend):
    """A model behind an OpenAI-compatible HTTP API.

    `tokenizer`: a local folder or hub id of the served model's tokenizer; needed only to
    render pre-filled turns for servers without `continue_final_message`."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        tokenizer: str | object | None = None,
        concurrency: int = 16,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 600.0,
        spec: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise BackendError(f"concurrency must be >= 1, got {concurrency}")
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.spec = spec or f"openai:{model}@{self.base_url}"
        self.tokenizer = self._load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer

    @property
    def capabilities(self) -> Capabilities:
        """It streams; it has a local tokenizer only when given one; the OpenAI shape returns
        no token ids, and its log-probabilities are not read (settle's `min_prob` needs them:
        `llamacpp:` gives them for a GGUF, `vllm:` in-process)."""
        return Capabilities(tokenizer=self.tokenizer is not None, streaming=True)

    @staticmethod
    def _load_tokenizer(path_or_id: str):
        from transformers import AutoTokenizer

        from duetlm.backends.hf import resolve_model_location

        location, is_local = resolve_model_location(path_or_id)
        try:
            return AutoTokenizer.from_pretrained(location, local_files_only=is_local)
        except (OSError, ValueError) as exc:
            raise BackendError(f"could not load tokenizer {path_or_id!r}: {exc}") from exc

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Blocking entry point; safe to call from inside a running event loop's thread too."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(requests))
        box: dict[str, object] = {}

        def runner() -> None:
            try:
                box["value"] = asyncio.run(self.agenerate(requests))
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=runner)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        started = time.perf_counter()
        limit = asyncio.Semaphore(self.concurrency)
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=self.timeout_s
        )
        async with client:

            async def one(request: GenerationRequest) -> GenerationResult:
                async with limit:
                    return await self._with_retries(client, request)

            results = await asyncio.gather(*(one(r) for r in requests))
        share = (time.perf_counter() - started) / max(len(requests), 1)
        for result in results:
            result.wall_s = share
        return list(results)

    async def _with_retries(self, client: openai.AsyncOpenAI, request: GenerationRequest) -> GenerationResult:
        for attempt in range(self.max_retries + 1):
            try:
                result = await self._call(client, request)
                result.retries = attempt
                return result
            except _RETRYABLE as exc:
                if attempt == self.max_retries:
                    raise BackendError(
                        f"{self.spec}: gave up after {attempt + 1} attempts ({type(exc).__name__}: {exc})"
                    ) from exc
                delay = self.backoff_s * 2**attempt * (1 + random.random())
                logger.warning("%s: %s, retry %d in %.1fs", self.spec, type(exc).__name__, attempt + 1, delay)
                await asyncio.sleep(delay)
            except openai.AuthenticationError as exc:
                raise BackendError(
                    f"{self.spec}: the server rejected the API key (401); set OPENAI_API_KEY or pass --api-key"
                ) from exc
            except openai.NotFoundError as exc:
                raise BackendError(
                    f"{self.spec}: model {self.model!r} or endpoint not found at {self.base_url} (404): {exc}"
                ) from exc
            except openai.APIStatusError as exc:
                raise self._refused(exc, request) from exc
        raise AssertionError("unreachable")

    def _refused(self, exc: openai.APIStatusError, request: GenerationRequest) -> BackendError:
        """A refusal as one line; for a pre-filled turn sent as chat, the likely cause and fix."""
        message = f"{self.spec}: request refused ({exc.status_code}): {exc}"
        if request.prefill and self.tokenizer is None and exc.status_code in (400, 422):
            message += (
                ". The pre-filled turn went to /v1/chat/completions with continue_final_message, which "
                "this server may not support: pass --light-tokenizer PATH_OR_ID (the model's own "
                "tokenizer) to render the prompt locally and send it to /v1/completions"
            )
        return BackendError(message)

    def _common(self, sampling) -> dict:
        common = {
            "model": self.model,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.seed is not None:
            common["seed"] = sampling.seed
        if sampling.stop:
            common["stop"] = list(sampling.stop)
        return common

    @staticmethod
    def _sampling_extra(sampling) -> dict | None:
        return {"top_k": sampling.top_k} if sampling.top_k else None  # not an OpenAI field

    def _chat_messages(self, request: GenerationRequest) -> tuple[list[dict], dict | None]:
        """Messages and extra body for chat completions: the prefill as a final assistant
        message that the server continues (`continue_final_message`, vLLM's)."""
        kwargs = dict(request.chat_template_kwargs)
        messages = request.message_dicts()
        extra_body: dict = (self._sampling_extra(request.sampling) or {}) | (
            {"chat_template_kwargs": kwargs} if kwargs else {}
        )
        if request.prefill:
            messages.append({"role": "assistant", "content": request.prefill})
            extra_body |= {"continue_final_message": True, "add_generation_prompt": False}
        return messages, extra_body or None

    async def _call(self, client: openai.AsyncOpenAI, request: GenerationRequest) -> GenerationResult:
        sampling = request.sampling
        common = self._common(sampling)
        if request.prefill and self.tokenizer is not None:
            response = await client.completions.create(
                prompt=render_chat(self.tokenizer, request),
                extra_body=self._sampling_extra(sampling),
                **common,
            )
            if not response.choices:
                raise GenerationError(f"{self.spec}: the server returned no choices")
            choice = response.choices[0]
            text, reasoning, echoed = choice.text or "", None, False
        else:
            messages, extra_body = self._chat_messages(request)
            response = await client.chat.completions.create(
                messages=messages, extra_body=extra_body, **common
            )
            if not response.choices:
                raise GenerationError(f"{self.spec}: the server returned no choices")
            choice = response.choices[0]
            text, echoed = strip_echo(choice.message.content or "", request.prefill)
            reasoning = getattr(choice.message, "reasoning_content", None) or getattr(
                choice.message, "reasoning", None
            )
        if response.usage is None:
            raise GenerationError(f"{self.spec}: the server sent no `usage`; exact token accounting needs it")
        text, stop_string = cut_at_stop(text, sampling.stop)
        return GenerationResult(
            text=text,
            prompt_tokens=response.usage.prompt_tokens,
            output_tokens=response.usage.completion_tokens,
            finish_reason=self._finish_reason(
                choice.finish_reason, getattr(choice, "model_extra", None) or {}, stop_string, sampling.stop
            ),
            stop_string=stop_string,
            extra=({"reasoning": reasoning} if reasoning else {})
            | ({"echoed_prefill": True} if echoed else {}),
        )

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """The upstream server's own stream: content deltas (a server's parsed reasoning as
        `ReasoningDelta`s), then the result, its counts from the stream's final `usage` chunk.
        Opening the stream is retried like a call; a stream that broke midway is an error.
        Closing the iterator closes the connection, and the server stops generating."""
        started = time.perf_counter()
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=self.timeout_s
        )
        sampling = request.sampling
        async with client:
            stream, completions = await self._open_stream(client, request)
            text, reasoning, usage, finish, extra = "", "", None, None, {}
            echo = EchoFilter("" if completions else request.prefill)
            async with stream:
                async for chunk in stream:
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                        extra = getattr(choice, "model_extra", None) or extra
                        if completions:
                            piece, thought = choice.text or "", None
                        else:
                            piece = choice.delta.content or ""
                            thought = getattr(choice.delta, "reasoning_content", None) or getattr(
                                choice.delta, "reasoning", None
                            )
                        if thought:
                            reasoning += thought
                            yield ReasoningDelta(thought)
                        piece = echo.feed(piece)
                        if piece:
                            text += piece
                            yield piece
            rest = echo.close()
            if rest:
                text += rest
                yield rest
        if usage is None:
            raise GenerationError(
                f"{self.spec}: the server's stream sent no `usage`; exact token accounting needs it"
            )
        text, stop_string = cut_at_stop(text, sampling.stop)
        yield GenerationResult(
            text=text,
            prompt_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            finish_reason=self._finish_reason(finish, extra, stop_string, sampling.stop),
            wall_s=time.perf_counter() - started,
            stop_string=stop_string,
            extra=({"reasoning": reasoning} if reasoning else {})
            | ({"echoed_prefill": True} if echo.echoed else {}),
        )

    async def _open_stream(self, client: openai.AsyncOpenAI, request: GenerationRequest):
        """(stream, is_completions): the same endpoint choice as `_call`, streamed."""
        common = self._common(request.sampling) | {"stream": True, "stream_options": {"include_usage": True}}
        for attempt in range(self.max_retries + 1):
            try:
                if request.prefill and self.tokenizer is not None:
                    prompt = render_chat(self.tokenizer, request)
                    return await client.completions.create(
                        prompt=prompt, extra_body=self._sampling_extra(request.sampling), **common
                    ), True
                messages, extra_body = self._chat_messages(request)
                return await client.chat.completions.create(
                    messages=messages, extra_body=extra_body, **common
                ), False
            except _RETRYABLE as exc:
                if attempt == self.max_retries:
                    raise BackendError(
                        f"{self.spec}: gave up after {attempt + 1} attempts ({type(exc).__name__}: {exc})"
                    ) from exc
                await asyncio.sleep(self.backoff_s * 2**attempt * (1 + random.random()))
            except openai.APIStatusError as exc:
                raise self._refused(exc, request) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _finish_reason(
        finish: str | None, extra: dict, stop_string: str | None, stops: Sequence[str]
    ) -> FinishReason:
        """OpenAI says `stop` for both a stop string and EOS; vLLM's `stop_reason` tells them
        apart (the string, or None for EOS). Without it, a requested stop string is assumed."""
        if finish == "length":
            return "length"
        if stop_string is not None:
            return "stop"
        if "stop_reason" in extra:
            return "stop" if isinstance(extra["stop_reason"], str) else "eos"
        return "stop" if stops else "eos"

    def close(self) -> None:
        pass
