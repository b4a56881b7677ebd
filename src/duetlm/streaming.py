"""DUET as a stream of events while the models write (`Duet.astream`, `duet serve`): what the
events are, and `ThinkingSplitter`, which routes streamed text into thinking and answer. Each
method streams its own stages (`duetlm.methods`); the `Finished` event carries the same
`SolveResult` that `Duet.solve` gives, built by the same functions (`duetlm.results`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from duetlm.backends.base import Backend, GenerationRequest, GenerationResult, ReasoningDelta, stream
from duetlm.problems import SolveResult
from duetlm.results import answered_again


@dataclass(frozen=True)
class SignalDelta:
    """More of M's signal (or, in the alone modes, of the model's own thinking)."""

    text: str


@dataclass(frozen=True)
class AnswerDelta:
    """More of the final write-up."""

    text: str


@dataclass(frozen=True)
class Probing:
    """The settle modes: M is paused at `at_tokens` of its output while probe number `index`
    runs."""

    at_tokens: int
    index: int


@dataclass(frozen=True)
class Finished:
    result: SolveResult


Event = SignalDelta | AnswerDelta | Probing | Finished


class ThinkingSplitter:
    """Routes streamed text into thinking and answer: the opening tag is dropped, text up to
    the close tag is thinking, the rest is the answer; a server's parsed reasoning is thinking
    as it comes. Text that may still turn out to be a tag is held back.

    Output that does not open with the tag (some chat templates write it into the prompt) is
    `untagged`: thinking for M's first stage (it stops at the close tag: all of it is the
    signal), answer for a model that never thinks, or `wait`: held until the close tag shows
    it was thinking or the end shows it was the answer (the alone modes, which cannot know)."""

    def __init__(self, think_open: str, think_close: str, untagged: str = "wait") -> None:
        self.open, self.close_tag, self.untagged = think_open, think_close, untagged
        self.state = "start"
        self.buffer, self.thinking, self.answering = "", False, False

    def feed(self, item: str | ReasoningDelta) -> list[Event]:
        if isinstance(item, ReasoningDelta):
            return [SignalDelta(item.text)] if item.text else []
        self.buffer += item
        return self._drain(final=False)

    def close(self) -> list[Event]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(self.open):
                    self.buffer, self.state = head[len(self.open) :].lstrip("\n"), "thinking"
                    continue
                if self.open.startswith(head) and not final:
                    return events  # may still be the opening tag
                self.state = self.untagged
                continue
            if self.state == "wait":
                if self.close_tag in self.buffer:
                    self.state = "thinking"
                elif final:
                    self.state = "answer"
                else:
                    return events
                continue
            if self.state == "thinking":
                index = self.buffer.find(self.close_tag)
                if index >= 0:
                    text = self.buffer[:index].rstrip()  # the signal ends where its text ends
                    text = text if self.thinking else text.lstrip()
                    if text:
                        events.append(SignalDelta(text))
                    self.buffer, self.state = self.buffer[index + len(self.close_tag) :].lstrip(), "answer"
                    continue
                keep = 0 if final else len(self.close_tag) - 1
                cut = max(0, len(self.buffer) - keep)
                text, self.buffer = self.buffer[:cut], self.buffer[cut:]
                # Trailing whitespace waits: before the close tag it is not part of the signal,
                # so the streamed signal reads as the whole one does.
                body = text.rstrip()
                text, self.buffer = body, ("" if final else text[len(body) :]) + self.buffer
                text = text if self.thinking else text.lstrip()  # no blank start
                if text:
                    events.append(SignalDelta(text))
                    self.thinking = True
                return events
            text = self.buffer if self.answering else self.buffer.lstrip()  # no blank start
            if text:
                events.append(AnswerDelta(text))
                self.answering = True
            self.buffer = ""
            return events


async def answer_deltas(
    answerer: Backend, request: GenerationRequest
) -> AsyncIterator[AnswerDelta | GenerationResult]:
    """A write-up as `AnswerDelta`s without its leading blank space, then its result."""
    leading = True
    async for item in stream(answerer, request):
        if isinstance(item, GenerationResult):
            yield item
            return
        text = item.text if isinstance(item, ReasoningDelta) else item
        if leading:
            text, leading = text.lstrip(), not text.strip()
        if text:
            yield AnswerDelta(text)


async def write_up_deltas(
    answerer: Backend,
    request: GenerationRequest,
    again: Callable[[GenerationResult], GenerationRequest | None],
) -> AsyncIterator[AnswerDelta | GenerationResult]:
    """A write-up as `answer_deltas`, asked once more where `again` gives a second request for
    its result (`answer_retry`: an empty turn), so that a stream answers as the batch path does;
    then the write-up's result, both tries as one (`answered_again`)."""
    answer = None
    async for item in answer_deltas(answerer, request):
        if isinstance(item, GenerationResult):
            answer = item
        else:
            yield item
    assert answer is not None
    second = again(answer)
    if second is not None:
        async for item in answer_deltas(answerer, second):
            if isinstance(item, GenerationResult):
                answer = answered_again(answer, item)
            else:
                yield item
    yield answer
