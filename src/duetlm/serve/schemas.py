"""Request shapes of the server (a subset of the OpenAI chat API plus `duet`), validated so
that anything a client can send that would fail later fails here, with a 400."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from duetlm.problems import Problem


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("content holds a lone surrogate (invalid Unicode)") from None
    return text


class ChatMessage(BaseModel):
    """A message; `content` is text or a list of parts, of which only text parts are served."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        if content is None:
            return ""
        if isinstance(content, str):
            return _valid_unicode(content)
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are served (got type {part.get('type')!r})")
            texts.append(_valid_unicode(part["text"]))
        return "\n".join(texts)


class DuetOptions(BaseModel):
    """Per-request DUET settings, sent as `extra_body={"duet": {...}}` by OpenAI clients."""

    model_config = ConfigDict(extra="forbid")

    mode: str = Field("duet", description="duet, M-alone, m-alone, duet@B, M@B, settle or M-settle.")
    signal_max_tokens: int | None = Field(None, ge=1, le=131072, description="M's signal budget.")
    return_signal: bool = Field(
        True,
        description="Return M's signal as `reasoning_content` (streamed while M writes it), as servers of "
        "reasoning models return their reasoning; false keeps it out of the response.",
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Unknown OpenAI fields are ignored (clients send many); known ones are validated."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=131072, description="m's answer budget.")
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="A 64-bit seed.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    duet: DuetOptions = Field(default_factory=DuetOptions)

    def problem(self) -> Problem:
        """The conversation as DUET answers it: the last user turn is the question, and M and m
        both see every turn before it (a system prompt included). Raises ValueError when
        there is no user turn, or something follows the last one."""
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users or not self.messages[users[-1]].content.strip():
            raise ValueError("messages need a non-empty user message")
        if users[-1] != len(self.messages) - 1:
            raise ValueError("DUET answers the last user turn: nothing may follow it")
        earlier = self.messages[: users[-1]]
        if any(m.role == "tool" for m in earlier):
            raise ValueError("tool messages are not served")
        history = tuple(("system" if m.role == "developer" else m.role, m.content) for m in earlier)
        return Problem(self.messages[users[-1]].content, history=history)
