"""The one interface every backend implements: `generate(requests) -> results`.

A request is a chat (plus an optional pre-filled start of the assistant turn) and sampling
settings; a result is the continuation with exact token counts and why it ended. The protocol
builds requests and reads results and never learns which backend answered (DESIGN section 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "eos", "length"]
"""`stop`: a stop string was produced; `eos`: the model ended its turn; `length`: max_tokens."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one continuation. temperature 0 means greedy decoding."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A chat to continue.

    `prefill` is text that already starts the assistant's turn (e.g. m's
    `<think>\\n{signal}\\n</think>\\n\\n`); the model continues it, and the result's text does
    not repeat it. `chat_template_kwargs` go to the model's chat template (e.g.
    `{"enable_thinking": True}` for Qwen3)."""

    messages: tuple[tuple[str, str], ...]
    sampling: SamplingParams
    prefill: str = ""
    chat_template_kwargs: tuple[tuple[str, object], ...] = ()

    @staticmethod
    def chat(
        user: str,
        sampling: SamplingParams,
        prefill: str = "",
        system: str | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> GenerationRequest:
        messages = ((("system", system),) if system else ()) + (("user", user),)
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
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """What the protocol, the evaluator and the server need from a model."""

    spec: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def close(self) -> None: ...


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
