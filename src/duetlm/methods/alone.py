"""`M-alone` and `m-alone`: one model thinks and answers by itself (the baselines every saving
is measured against)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from duetlm.backends.base import Backend, GenerationRequest, GenerationResult, stream
from duetlm.methods.base import Method
from duetlm.methods.registry import MethodEntry, Mode, register
from duetlm.problems import Problem, SolveResult
from duetlm.requests import alone_request
from duetlm.results import alone_result
from duetlm.streaming import Event, Finished, ThinkingSplitter

if TYPE_CHECKING:
    from duetlm.protocol import Duet


class Alone(Method):
    def __init__(self, mode: Mode) -> None:
        super().__init__(mode)
        self.capable = mode.kind == "M-alone"

    def _model(self, duet: Duet) -> tuple[Backend, int]:
        cfg = duet.config
        if self.capable:
            return duet.capable, cfg.capable_alone_budget
        return duet.light, cfg.light_alone_budget

    def first_read(self, duet: Duet, problem: Problem) -> tuple[Backend, GenerationRequest]:
        backend, budget = self._model(duet)
        return backend, alone_request(problem, duet.config, budget, self.capable)

    def solve_batch(self, duet: Duet, problems: Sequence[Problem]) -> list[SolveResult]:
        backend, budget = self._model(duet)
        outputs = backend.generate([alone_request(p, duet.config, budget, self.capable) for p in problems])
        return [
            alone_result(p, str(self.mode), out, self.capable, duet.config)
            for p, out in zip(problems, outputs, strict=True)
        ]

    async def astream(self, duet: Duet, problem: Problem) -> AsyncIterator[Event]:
        """The model's own thinking as `SignalDelta`s, its answer as `AnswerDelta`s; output that
        does not open with the think tag is held until the close tag or the end shows which it was."""
        cfg = duet.config
        backend, request = self.first_read(duet, problem)
        split = ThinkingSplitter(cfg.prompts.think_open, cfg.prompts.think_close, untagged="wait")
        async for item in stream(backend, request):
            if isinstance(item, GenerationResult):
                for event in split.close():
                    yield event
                yield Finished(alone_result(problem, str(self.mode), item, self.capable, cfg))
                return
            for event in split.feed(item):
                yield event


register(MethodEntry("M-alone", "M thinks and answers by itself", Alone, order=1))
register(MethodEntry("m-alone", "m thinks and answers by itself", Alone, order=2))
