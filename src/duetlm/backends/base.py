"""The one interface every backend implements: `generate(requests) -> results`.

A request is a chat (plus an optional pre-filled start of the assistant turn) and sampling
settings; a result is the continuation with exact token counts and why it ended. The protocol
builds requests and reads results and never learns which backend answered (docs/design.md section 3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from duetlm.errors import BackendError

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "eos", "length", "cancelled", "settled"]
"""`stop`: a stop string was produced; `eos`: the model ended its turn; `length`: max_tokens;
`cancelled`: the caller gave up (a client that left), nothing is returned to anyone;
`settled`: M was not resumed because its prober's answer had settled (the settle modes)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one continuation: exactly this distribution, whatever a model's
    `generation_config.json` suggests (temperature 0 means greedy decoding; top_k 0 and top_p
    1 mean no truncation). `logprobs` asks for the log-probability of each sampled token under
    the distribution it was sampled from."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0
    logprobs: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """A chat to continue.

    `prefill` is text that already starts the assistant's turn (e.g. m's
    `<think>\\n{signal}\\n</think>\\n\\n`); the model continues it, and the result's text does
    not repeat it. `chat_template_kwargs` go to the model's chat template (e.g.
    `{"enable_thinking": True}` for Qwen3).

    `continue_ids` resumes a turn this model was writing: the token ids it already produced,
    appended to the rendered prompt as they are. Re-tokenizing generated text does not always
    give back the sampled ids, so a backend with a local tokenizer (hf, vllm) takes the ids and
    ignores `prefill`; one without (openai) continues `prefill`, which then holds their text."""

    messages: tuple[tuple[str, str], ...]
    sampling: SamplingParams
    prefill: str = ""
    chat_template_kwargs: tuple[tuple[str, object], ...] = ()
    continue_ids: tuple[int, ...] = ()

    @staticmethod
    def chat(
        user: str,
        sampling: SamplingParams,
        prefill: str = "",
        system: str | None = None,
        chat_template_kwargs: dict | None = None,
        history: tuple[tuple[str, str], ...] = (),
    ) -> GenerationRequest:
        """The turns before the last user turn are `history` ((role, content) pairs, a system
        prompt included); `system` is a shorthand for a history of one system turn."""
        messages = ((("system", system),) if system else ()) + tuple(history) + (("user", user),)
        return GenerationRequest(
            messages, sampling, prefill, tuple(sorted((chat_template_kwargs or {}).items()))
        )

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class GenerationResult:
    """One continuation with exact accounting. `text` excludes the prefill and the stop string;
    `wall_s` is this request's share of the batch's wall time, so sums over requests equal the
    time actually spent."""

    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: FinishReason
    wall_s: float = 0.0
    stop_string: str | None = None
    retries: int = 0
    token_ids: list[int] | None = None  # the generated ids, where the backend exposes them (hf, vllm)
    budget_clamped: bool = False  # max_tokens was cut so that prompt + output fit the context
    logprobs: list[float] | None = None  # per output token, when the request asked (hf, vllm)
    extra: dict = field(default_factory=dict)


class ContextGuard:
    """Fits each request's output budget into a model's context window.

    Asking a model for more tokens than its positions hold makes transformers warn and run
    far past what the model was trained on (the embedded models have 512 positions; the
    default budgets are 4,096 + 1,024). So a budget is cut to `context - prompt` (the result
    says `budget_clamped`), one warning per backend says how many, and a prompt that alone
    fills the context gets an empty `length` result marked `context_length_exceeded`."""

    def __init__(self, spec: str, context_length: int | None) -> None:
        self.spec, self.context_length = spec, context_length
        self.clamped = self.too_long = 0

    def fit(self, prompt_tokens: int, max_tokens: int) -> int:
        """The budget to use: `max_tokens`, or what is left of the context (0: none left)."""
        if self.context_length is None or prompt_tokens + max_tokens <= self.context_length:
            return max_tokens
        room = max(self.context_length - prompt_tokens, 0)
        if room == 0:
            self.too_long += 1
            if self.too_long == 1:
                logger.warning(
                    "%s: a prompt of %d tokens fills the %d-token context; such requests get no output "
                    "(counted as context_length_exceeded)",
                    self.spec,
                    prompt_tokens,
                    self.context_length,
                )
        else:
            self.clamped += 1
            if self.clamped == 1:
                logger.warning(
                    "%s: budgets cut to fit the %d-token context (first: %d prompt + %d asked -> %d); "
                    "lower --signal-max-tokens / --answer-max-tokens to fit it",
                    self.spec,
                    self.context_length,
                    prompt_tokens,
                    max_tokens,
                    room,
                )
        return room

    @staticmethod
    def overflow_result(prompt_tokens: int) -> GenerationResult:
        return GenerationResult(
            "", prompt_tokens, 0, "length", budget_clamped=True, extra={"error": "context_length_exceeded"}
        )


@dataclass(frozen=True)
class ReasoningDelta:
    """Streamed text that a server returned as reasoning (parsed out of the content, e.g. by
    vLLM's reasoning parsers); plain `str` items of a stream are content."""

    text: str


StreamItem = str | ReasoningDelta | GenerationResult
"""What `astream` yields: text deltas, then exactly one final GenerationResult."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond `generate`, declared once per backend class. A method that
    needs one of them refuses a backend without it when it starts (`require`), never by probing
    the object for methods."""

    tokenizer: bool = False  # `backend.tokenizer` is a local tokenizer: exact counts, ids decoded here
    logprobs: bool = False  # honours `SamplingParams.logprobs` (one log-probability per output token)
    token_ids: bool = False  # results carry the generated ids, and `continue_ids` resumes from them
    streaming: bool = False  # `astream` yields text while the model writes (else all of it at the end)
    prompt_tokens: bool = False  # `prompt_tokens(request)` counts a prompt before it is generated
    text_tokens: bool = False  # `count_tokens(text)` counts a text in the model's vocabulary (server side)
    context_length: int | None = None  # the tokens one request may hold, prompt and output; None: unknown

    def require(self, what: str, needed_by: str, spec: str, fix: str = "") -> None:
        """Refuse a backend without capability `what` (a field name), naming who needs it."""
        if not dataclasses.asdict(self)[what]:
            raise BackendError(
                f"{needed_by} needs {CAPABILITY_WORDS[what]}, which {spec} does not give"
                + (f" ({fix})" if fix else "")
            )


CAPABILITY_WORDS = {
    "tokenizer": "a local tokenizer",
    "logprobs": "per-token log-probabilities",
    "token_ids": "the generated token ids",
    "streaming": "streaming",
    "prompt_tokens": "prompt token counts",
    "text_tokens": "token counts of a text",
}


@runtime_checkable
class Backend(Protocol):
    """The least a model must offer the protocol: `generate`, `close` and a `spec` naming it.
    duetlm's own backends derive from `BaseBackend`, which declares what more they can do; an
    object that only has these three (a user's own backend) can do nothing more."""

    spec: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def close(self) -> None: ...


class BaseBackend:
    """What every duetlm backend has, with the defaults of a backend that can do nothing
    beyond generating: no local tokenizer, a stream that is one call of `generate`, nothing to
    start or stop. Subclasses override what they do better and declare it in `capabilities`."""

    spec: str = "backend"
    tokenizer = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """Text deltas, then exactly one GenerationResult; here one `generate` call off the event
        loop, handed out as a single delta."""
        [result] = await asyncio.to_thread(self.generate, [request])
        if "reasoning" in result.extra:
            yield ReasoningDelta(str(result.extra["reasoning"]))
        if result.text:
            yield result.text
        yield result

    def prompt_tokens(self, request: GenerationRequest) -> int:
        raise BackendError(f"{self.spec} cannot count a prompt's tokens before generating")

    def count_tokens(self, text: str) -> int:
        """The tokens `text` takes in the model's own vocabulary: by the local tokenizer, or
        (a backend declaring `text_tokens`) by the server that holds it."""
        if not self.capabilities.tokenizer:
            raise BackendError(f"{self.spec} cannot count a text's tokens: it has no tokenizer here")
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def start(self) -> None:
        """Load or start what the first request would (an engine process); by default nothing."""

    def close(self) -> None:
        """Release what the backend holds (a server, an engine process); by default nothing."""


def capabilities_of(backend: Backend) -> Capabilities:
    """What a backend declares; an object that is no `BaseBackend` (a user's own, with only
    `generate`) declares nothing."""
    return backend.capabilities if isinstance(backend, BaseBackend) else Capabilities()


def counts_tokens(backend: Backend) -> bool:
    """Whether `backend.count_tokens` gives exact counts (a local tokenizer, or the server's)."""
    capabilities = capabilities_of(backend)
    return capabilities.tokenizer or capabilities.text_tokens


async def stream(backend: Backend, request: GenerationRequest) -> AsyncIterator[StreamItem]:
    """A backend's stream of a request (`BaseBackend.astream`); for an object that is no
    `BaseBackend`, one call of its `generate` off the event loop."""
    source = backend if isinstance(backend, BaseBackend) else _Adapted(backend)
    async for item in source.astream(request):
        yield item


def start_backend(backend: Backend) -> None:
    """Start what a backend would start at its first request (`BaseBackend.start`)."""
    if isinstance(backend, BaseBackend):
        backend.start()


class _Adapted(BaseBackend):
    """A user's backend with only `generate`, given BaseBackend's defaults."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.spec = backend, backend.spec

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self.backend.generate(requests)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Text up to the earliest stop string, and which one ended it (None when none occurs).

    Backends differ in whether the stop string is returned; cutting here makes them agree."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return text, None
    return text[: best[0]], best[1]


def join_prefill(rendered_prompt: str, prefill: str, min_overlap: int = 3) -> str:
    """Append the assistant prefill to a rendered generation prompt without doubling the part
    the chat template already wrote (some templates end the generation prompt in `<think>\\n`)."""
    if not prefill:
        return rendered_prompt
    for k in range(min(len(prefill), len(rendered_prompt)), min_overlap - 1, -1):
        if rendered_prompt.endswith(prefill[:k]):
            return rendered_prompt + prefill[k:]
    return rendered_prompt + prefill


def prompt_token_ids(tokenizer, request: GenerationRequest) -> list[int]:
    """The ids a local model continues: the rendered prompt, then `continue_ids` when the
    request resumes a turn (its prefill text is then not tokenized)."""
    if request.continue_ids:
        head = render_chat(tokenizer, dataclasses.replace(request, prefill=""))
        return tokenizer(head, add_special_tokens=False)["input_ids"] + list(request.continue_ids)
    return tokenizer(render_chat(tokenizer, request), add_special_tokens=False)["input_ids"]


def render_chat(tokenizer, request: GenerationRequest) -> str:
    """The exact prompt text a local tokenizer's chat template gives for `request`.

    Falls back to a plain `role: content` layout for tokenizers without a chat template (base
    models), so any causal LM runs."""
    kwargs = dict(request.chat_template_kwargs)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            request.message_dicts(), tokenize=False, add_generation_prompt=True, **kwargs
        )
    else:
        rendered = "".join(f"{role}: {content}\n" for role, content in request.messages) + "assistant: "
    return join_prefill(rendered, request.prefill)
