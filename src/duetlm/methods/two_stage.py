"""The two-stage methods (docs/design.md section 1): `duet` (M's signal, m's answer), `duet@B`
(the signal cut at B tokens, untrained) and `M@B` (M alone with a thinking budget of B: a
thinking cut at B is closed with a cue to answer now, and M answers itself)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from duetlm.backends.base import Backend, GenerationRequest, GenerationResult, stream
from duetlm.methods.base import Method
from duetlm.methods.registry import MethodEntry, Mode, register
from duetlm.problems import Problem, SolveResult
from duetlm.requests import (
    answer_again_request,
    asks_again,
    capable_request,
    forced_request,
    light_request,
    signal_of,
)
from duetlm.results import answered_again, two_stage_result
from duetlm.streaming import Event, Finished, ThinkingSplitter, write_up_deltas

if TYPE_CHECKING:
    from duetlm.protocol import Duet


class TwoStage(Method):
    """M writes the signal; m (or, under M@B, M itself) writes the answer from it."""

    def __init__(self, mode: Mode) -> None:
        super().__init__(mode)
        self.own_answer = mode.kind == "M"  # M@B: M answers after its own (cut) thinking

    def budget(self, duet: Duet) -> int:
        return self.mode.budget or duet.config.signal_max_tokens

    def first_read(self, duet: Duet, problem: Problem) -> tuple[Backend, GenerationRequest]:
        return duet.capable, capable_request(problem, duet.config, self.budget(duet))

    def second(self, duet: Duet, problem: Problem, signal: str, first: GenerationResult):
        """Who writes the answer, and the request they get."""
        cfg = duet.config
        if self.own_answer:
            return duet.capable, forced_request(problem, signal, first, cfg)
        return duet.light, light_request(problem, signal, cfg, cfg.light_template_kwargs)

    def solve_batch(self, duet: Duet, problems: Sequence[Problem]) -> list[SolveResult]:
        cfg = duet.config
        firsts = duet.capable.generate([capable_request(p, cfg, self.budget(duet)) for p in problems])
        signals = [signal_of(r, cfg) for r in firsts]
        seconds = self.answer_all(duet, problems, signals, firsts)
        return [
            two_stage_result(p, str(self.mode), f, s, r, cfg, self.own_answer)
            for p, f, s, r in zip(problems, firsts, signals, seconds, strict=True)
        ]

    def answer_all(self, duet: Duet, problems, signals, firsts) -> list[GenerationResult]:
        """Every problem's second stage in one call of the model that writes it (and one more
        for the empty turns that `answer_retry` asks again)."""
        turns = [self.second(duet, p, s, f) for p, s, f in zip(problems, signals, firsts, strict=True)]
        backend = duet.capable if self.own_answer else duet.light
        answers = backend.generate([request for _, request in turns])
        if self.own_answer:
            return answers
        again = [i for i, answer in enumerate(answers) if asks_again(duet.config, answer)]
        if again:
            tries = backend.generate(
                [answer_again_request(problems[i], signals[i], duet.config) for i in again]
            )
            for i, second_try in zip(again, tries, strict=True):
                answers[i] = answered_again(answers[i], second_try)
        return answers

    async def astream(self, duet: Duet, problem: Problem) -> AsyncIterator[Event]:
        """M's signal as `SignalDelta`s while it writes, then the answer as `AnswerDelta`s;
        each stage streams from its backend, so a request moves on to m as soon as its own
        signal ends. Closing the iterator cancels the generation in flight."""
        cfg = duet.config
        first = None
        split = ThinkingSplitter(cfg.prompts.think_open, cfg.prompts.think_close, untagged="thinking")
        async for item in stream(duet.capable, capable_request(problem, cfg, self.budget(duet))):
            if isinstance(item, GenerationResult):
                first = item
            else:
                for event in split.feed(item):
                    yield event
        for event in split.close():
            yield event
        assert first is not None
        signal = signal_of(first, cfg)
        answerer, request = self.second(duet, problem, signal, first)

        def again(answer: GenerationResult) -> GenerationRequest | None:
            empty = not self.own_answer and asks_again(cfg, answer)
            return answer_again_request(problem, signal, cfg) if empty else None

        answer = None
        async for item in write_up_deltas(answerer, request, again):
            if isinstance(item, GenerationResult):
                answer = item
            else:
                yield item
        assert answer is not None
        yield Finished(two_stage_result(problem, str(self.mode), first, signal, answer, cfg, self.own_answer))


register(
    MethodEntry(
        "duet",
        "M writes the signal, m answers from it (duet@B: the signal cut at B tokens)",
        TwoStage,
        "optional",
        order=0,
    )
)
register(
    MethodEntry(
        "M", "M@B: M alone with a thinking budget of B tokens (budget forcing)", TwoStage, "required", order=3
    )
)
