"""Request and response shapes of the server (a subset of the OpenAI chat API plus `duet`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class DuetOptions(BaseModel):
    """Per-request DUET settings, sent as `extra_body={"duet": {...}}` by OpenAI clients."""

    model_config = ConfigDict(extra="forbid")

    mode: str = Field("duet", description="duet, M-alone, m-alone, duet@B or M@B.")
    signal_max_tokens: int | None = Field(None, ge=1, le=131072, description="M's signal budget.")
    return_signal: bool = Field(False, description="Include M's signal in the response.")


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
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    duet: DuetOptions = Field(default_factory=DuetOptions)

    @property
    def question(self) -> str:
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else ""
