"""Backend for GGUF models on llama.cpp: `llamacpp:FILE.gguf` or `llamacpp:NAME` (installed).

duetlm starts llama.cpp's server for the model (`server.py`, loopback, one slot per request of
a batch) and talks to it with the same `openai` client as to any server, retries and timeouts
included, but on llama.cpp's own endpoints rather than its OpenAI-shaped ones, because only
those say what the protocol must know exactly:

- `/apply-template` renders a chat with the GGUF's own template, so a pre-filled assistant turn
  (m's signal) is continued as raw text on `/completion` and never echoed back; a request that
  resumes a turn (`continue_ids`) sends its token ids as they are;
- `/completion` says why generation ended (`stop_type`: end of turn, a stop string and which,
  or the budget), which the OpenAI shape folds into one `stop`, returns the generated token ids
  and, when asked, each token's log-probability; its counts (`tokens_evaluated`,
  `tokens_predicted`) are the usage.

Sampling is set in full on every request (llama.cpp's own defaults, top_k 40, top_p 0.95 and
min_p 0.05, would silently change the distribution).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai

from duetlm.backends.base import (
    Capabilities,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    StreamItem,
    join_prefill,
)
from duetlm.backends.llamacpp.server import LlamaCppServer
from duetlm.backends.openai import OpenAIBackend
from duetlm.errors import GenerationError

_FINISH: dict[str, FinishReason] = {"eos": "eos", "word": "stop", "limit": "length"}
DEADLINE_S = 7 * 24 * 3600.0


class LlamaCppBackend(OpenAIBackend):
    """A GGUF model served by a llama.cpp server that this backend starts and stops.

    `parallel`: slots, i.e. requests decoded together (the batch size); `ctx_per_slot`: the
    context each slot holds (prompt plus output); `threads`: CPU threads (default: all cores)."""

    def __init__(
        self,
        model: str | Path,
        *,
        parallel: int = 8,
        ctx_per_slot: int = 4096,
        threads: int | None = None,
        max_retries: int = 2,
        spec: str | None = None,
    ) -> None:
        self.server = LlamaCppServer(model, parallel=parallel, ctx_per_slot=ctx_per_slot, threads=threads)
        url = self.server.start()
        super().__init__(
            Path(model).name,
            url,
            api_key="none",
            concurrency=parallel,
            max_retries=max_retries,
            # no deadline on a server of our own: on a CPU, 32 slots decoding 4,096 tokens each take
            # hours, and a request abandoned at a deadline would be sent again from its start; a
            # server that dies drops the connection, which fails the call at once
            timeout_s=DEADLINE_S,
            spec=spec or f"llamacpp:{model}",
        )

    @property
    def context_length(self) -> int:
        return self.server.ctx_per_slot

    @property
    def capabilities(self) -> Capabilities:
        """Log-probabilities and token ids from `/completion`, its own stream, token counts from
        `/tokenize`; no local tokenizer (the GGUF's is in the server)."""
        return Capabilities(
            logprobs=True,
            token_ids=True,
            streaming=True,
            text_tokens=True,
            context_length=self.context_length,
        )

    def count_tokens(self, text: str) -> int:
        """The server's own count (`/tokenize`, no special tokens added): exact for any GGUF."""
        response = httpx.post(
            f"{self.server.url}/tokenize", json={"content": text, "add_special": False}, timeout=60.0
        )
        tokens = response.json().get("tokens") if response.status_code == 200 else None
        if not isinstance(tokens, list):
            raise GenerationError(
                f"{self.spec}: /tokenize answered {response.status_code}: {response.text[:200]}"
            )
        return len(tokens)

    # --- requests -------------------------------------------------------------------------------

    async def _prompt(self, client: openai.AsyncOpenAI, request: GenerationRequest) -> str | list:
        """The prompt as llama.cpp takes it: the chat rendered by the GGUF's template, then the
        pre-filled start of the turn as text, or the ids of a resumed turn as they are."""
        body: dict = {"messages": request.message_dicts()}
        if request.chat_template_kwargs:
            body["chat_template_kwargs"] = dict(request.chat_template_kwargs)
        rendered = await client.post("/apply-template", cast_to=object, body=body)
        if not isinstance(rendered, dict) or not isinstance(rendered.get("prompt"), str):
            raise GenerationError(f"{self.spec}: /apply-template returned no prompt")
        if request.continue_ids:
            return [rendered["prompt"], *request.continue_ids]
        return join_prefill(rendered["prompt"], request.prefill)

    def _body(self, request: GenerationRequest, prompt: str | list, stream: bool) -> dict:
        sampling = request.sampling
        body = {
            "prompt": prompt,
            "n_predict": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,  # 0: no cut, as in SamplingParams
            "min_p": 0.0,
            "repeat_penalty": 1.0,
            "stop": list(sampling.stop),
            "seed": sampling.seed if sampling.seed is not None else -1,
            "cache_prompt": True,
            "return_tokens": True,
            "stream": stream,
        }
        if sampling.logprobs:
            body["n_probs"] = 1
        return body

    async def _call(self, client: openai.AsyncOpenAI, request: GenerationRequest) -> GenerationResult:
        prompt = await self._prompt(client, request)
        try:
            response = await client.post(
                "/completion", cast_to=object, body=self._body(request, prompt, False)
            )
        except openai.BadRequestError as exc:
            if "context" in str(exc).lower():  # the prompt alone does not fit a slot
                return self._overflow(exc)
            raise
        if not isinstance(response, dict) or "tokens_predicted" not in response:
            raise GenerationError(f"{self.spec}: /completion returned no token counts")
        return self._result(response, request)

    def _overflow(self, exc: openai.BadRequestError) -> GenerationResult:
        body = exc.body if isinstance(exc.body, dict) else {}
        prompt_tokens = int(body.get("n_prompt_tokens") or 0)
        result = GenerationResult("", prompt_tokens, 0, "length", budget_clamped=True)
        result.extra["error"] = "context_length_exceeded"
        return result

    def _result(self, done: dict, request: GenerationRequest) -> GenerationResult:
        prompt_tokens, output_tokens = int(done["tokens_evaluated"]), int(done["tokens_predicted"])
        finish = _FINISH.get(str(done.get("stop_type")), "length")
        stop = done.get("stopping_word") or None
        probabilities = done.get("completion_probabilities")
        return GenerationResult(
            text=done.get("content", ""),
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            finish_reason=finish,
            stop_string=stop if finish == "stop" else None,
            token_ids=list(done["tokens"]) if isinstance(done.get("tokens"), list) else None,
            budget_clamped=finish == "length"
            and output_tokens < request.sampling.max_tokens
            and prompt_tokens + output_tokens >= self.context_length,
            logprobs=[float(p["logprob"]) for p in probabilities]
            if request.sampling.logprobs and probabilities
            else None,
        )

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """llama.cpp's own stream of `/completion`: text deltas, then the result from the last
        event, which carries the counts and why generation ended."""
        started = time.perf_counter()
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=self.timeout_s
        )
        async with client:
            prompt = await self._prompt(client, request)
            stream = await client.post(
                "/completion",
                cast_to=object,
                body=self._body(request, prompt, True),
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
            final: dict | None = None
            text, ids, probabilities = "", [], []
            async with stream:
                async for event in stream:
                    if not isinstance(event, dict):
                        continue
                    piece = event.get("content") or ""
                    ids += event.get("tokens") or []
                    probabilities += event.get("completion_probabilities") or []
                    if piece:
                        text += piece
                        yield piece
                    if event.get("stop"):
                        final = event
        if final is None:
            raise GenerationError(f"{self.spec}: the stream ended without its final event")
        result = self._result(
            final | {"content": text, "tokens": ids, "completion_probabilities": probabilities}, request
        )
        result.wall_s = time.perf_counter() - started
        yield result

    def close(self) -> None:
        self.server.stop()


def default_parallel(batch_size: int) -> int:
    """Slots for a batch: one per request, up to 32. A slot keeps its request's prompt cached,
    so a question resumed step by step (settle) or probed again finds its prefix there; each
    slot holds a KV cache of `ctx_per_slot` tokens (for a 1.5B Qwen2.5, 28 KB a token: 32 slots
    of 4,096 tokens take 3.7 GB)."""
    return max(1, min(batch_size, 32))
