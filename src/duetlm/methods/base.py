"""What a method is: a way to answer a batch of problems with a pair of models, and the same
as a stream of events while the models write."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from duetlm.backends.base import Backend, GenerationRequest
from duetlm.methods.registry import Mode
from duetlm.problems import Problem, SolveResult
from duetlm.streaming import AnswerDelta, Event, Finished, SignalDelta

if TYPE_CHECKING:
    from duetlm.protocol import Duet


class Method(ABC):
    """One method for one `Mode`. `solve_batch` answers many problems (each stage one batched
    backend call); `astream` answers one as events (by default the batch answer of that one
    problem, handed out at the end); `first_read` is the request whose prompt the first model
    reads, which a server checks against that model's context before any work; `check`
    refuses, before any work, backends that lack what the method needs."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode

    def __str__(self) -> str:
        return str(self.mode)

    def check(self, duet: Duet) -> None:  # noqa: B027  (most methods need nothing more)
        """Raise a clear error when a backend lacks a capability this method needs."""

    @abstractmethod
    def solve_batch(self, duet: Duet, problems: Sequence[Problem]) -> list[SolveResult]: ...

    @abstractmethod
    def first_read(self, duet: Duet, problem: Problem) -> tuple[Backend, GenerationRequest]: ...

    async def astream(self, duet: Duet, problem: Problem) -> AsyncIterator[Event]:
        [result] = await asyncio.to_thread(self.solve_batch, duet, [problem])
        if result.signal:
            yield SignalDelta(result.signal)
        if result.text:
            yield AnswerDelta(result.text)
        yield Finished(result)
