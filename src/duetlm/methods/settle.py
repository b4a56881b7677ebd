"""Settle: m watches M think and takes over once its answer has settled (docs/settle.md).

No training. M thinks as in `duet`, but in steps: each step ends at the first line end after
`probe_every` more of its tokens, and there M is paused while the prober answers greedily from
the thinking so far, closed with the think tag (or, with `probe = continue`, in a turn of its
own from there, free to finish the reasoning), within `probe_max_tokens`. Once `agree`
probes in a row extract the same answer, M is not resumed: the settling probe's write-up is
the result, and M's tokens after that point are never generated. A question whose probes
never settle runs to M's own end and is then answered as `duet` answers it.

In `settle` the prober is m, so a probe costs m's tokens; in `M-settle` (the self-probe
baseline, as single-model early-exit methods work) it is M itself, and every probe costs M.

A step resumes M from the token ids it already wrote (`GenerationRequest.continue_ids`), so
on hf and vLLM the thinking is token for token the one `duet` gets, only shorter; an
OpenAI-compatible M resumes from the text. Every step re-sends the prompt and the thinking so
far: the usage counts those tokens as sent, and `resent_prompt_tokens` says how many of them
were M's own earlier output (a server with prefix caching, vLLM's, reads them from cache).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from duetlm.backends.base import Backend, GenerationRequest, GenerationResult, capabilities_of, stream
from duetlm.errors import GenerationError, InputError
from duetlm.grading import extract_answer
from duetlm.methods.base import Method
from duetlm.methods.registry import MethodEntry, Mode, register
from duetlm.problems import Problem, SolveResult
from duetlm.requests import (
    answer_again_request,
    asks_again,
    capable_request,
    light_request,
    sampling,
    user_prompt,
)
from duetlm.results import answered_again, handed_over_result, usage_of
from duetlm.signals import first_marker, signal_from_stage1, style_of
from duetlm.streaming import AnswerDelta, Event, Finished, Probing, ThinkingSplitter, write_up_deltas
from duetlm.usage import ModelUsage, Usage

if TYPE_CHECKING:
    from duetlm.protocol import Duet


@dataclass
class Probe:
    """One probe: where it was taken (M's output tokens so far) and what it gave."""

    at_tokens: int
    answer: str | None
    prob: float | None
    output_tokens: int


def answer_key(answer: str | None) -> str | None:
    """Answers agree when they are the same text up to whitespace."""
    return None if answer is None else "".join(answer.split())


def settled(probes: Sequence[Probe], agree: int, min_prob: float | None) -> bool:
    """The stopping rule: the last `agree` probes gave one answer (and, with `min_prob`, each
    was at least that sure of it). A probe without an answer breaks a run."""
    if len(probes) < agree:
        return False
    last = probes[-agree:]
    keys = {answer_key(p.answer) for p in last}
    if len(keys) != 1 or None in keys:
        return False
    return min_prob is None or all(p.prob is not None and p.prob >= min_prob for p in last)


def answer_probability(result: GenerationResult, answer: str | None, tokenizer) -> float | None:
    """The prober's probability of the tokens that spell its answer (the last place the answer
    appears in its text), or of its whole output when the extracted answer is not verbatim
    there. None without log-probs."""
    if result.logprobs is None or answer is None:
        return None
    logprobs = result.logprobs
    start = result.text.rfind(answer)
    if start < 0 or tokenizer is None or not result.token_ids:
        return math.exp(sum(logprobs))
    end = start + len(answer)
    ids = result.token_ids[: len(logprobs)]
    total, previous = 0.0, 0
    for index in range(len(ids)):
        reached = len(tokenizer.decode(ids[: index + 1], skip_special_tokens=False))
        if reached > start and previous < end:
            total += logprobs[index]
        previous = reached
        if reached >= end:
            break
    return math.exp(total)


@dataclass
class Watch:
    """One question while M thinks: what M wrote so far, its usage, the probes."""

    problem: Problem
    budget: int
    ids: list[int] = field(default_factory=list)
    text: str = ""  # M's output so far
    exact_ids: bool = True  # every step came back with its token ids
    tokens: int = 0
    since_probe: int = 0
    steps: int = 0
    resent: int = 0
    capable: ModelUsage = field(default_factory=ModelUsage)
    prober: ModelUsage = field(default_factory=ModelUsage)
    probes: list[Probe] = field(default_factory=list)
    ended: GenerationResult | None = None  # M's own end (close tag, end of turn or budget)
    settled_by: GenerationResult | None = None
    retries: int = 0
    clamped: bool = False

    @property
    def active(self) -> bool:
        return self.ended is None and self.settled_by is None

    @property
    def left(self) -> int:
        return self.budget - self.tokens


class Settler:
    """Runs the settle modes for a `Duet`: batched (`solve_batch`) and streamed (`astream`)."""

    def __init__(self, duet: Duet, mode: Mode) -> None:
        self.duet, self.mode, self.cfg = duet, mode, duet.config
        self.rule = self.cfg.settle
        self.self_probe = mode.kind == "M-settle"
        self.prober: Backend = duet.capable if self.self_probe else duet.light
        self.prober_price = self.cfg.capable_price if self.self_probe else self.cfg.light_price
        # M's ids are decoded here when M has a local tokenizer; else its steps resume from text
        self.tokenizer = duet.capable.tokenizer if capabilities_of(duet.capable).tokenizer else None
        self.prober_tokenizer = self.prober.tokenizer if capabilities_of(self.prober).tokenizer else None
        self.usage_of = usage_of
        self.style = style_of(self.cfg)
        check(duet, mode)

    # --- requests ---------------------------------------------------------------------------

    def step_request(self, watch: Watch, max_tokens: int, line_end: bool) -> GenerationRequest:
        """M's next step: up to `max_tokens` more, ending at the close tag (or, `line_end`,
        at the end of the current line)."""
        cfg = self.cfg
        stops = (*self.style.stops(), "\n") if line_end else self.style.stops()
        params = sampling(cfg, max_tokens, stops)
        if params.seed is not None:  # a fresh draw per step, the same on a rerun
            params = dataclasses.replace(params, seed=params.seed + 1_000_003 * watch.steps)
        request = GenerationRequest.chat(
            user_prompt(watch.problem, cfg),
            params,
            prefill=watch.text,
            chat_template_kwargs=cfg.capable_template_kwargs,
            history=watch.problem.history,
        )
        if watch.exact_ids and watch.ids:
            request = dataclasses.replace(request, continue_ids=tuple(watch.ids))
        return request

    def probe_request(self, watch: Watch) -> GenerationRequest:
        """The prober's greedy answer from the thinking so far: closed with the answer cue, or
        (`probe = continue`) its own turn from there, as duet's m would answer."""
        cfg = self.cfg
        kwargs = cfg.capable_template_kwargs if self.self_probe else cfg.light_template_kwargs
        closed = self.rule.probe == "answer"
        request = light_request(watch.problem, self.thinking(watch), cfg, kwargs, closed=closed)
        greedy = dataclasses.replace(
            request.sampling,
            max_tokens=self.rule.probe_max_tokens,
            temperature=0.0,
            logprobs=self.rule.min_prob is not None,
        )
        return dataclasses.replace(request, sampling=greedy)

    def final_request(self, watch: Watch) -> GenerationRequest:
        """At M's own end: m answers from the whole thinking as in `duet`; in `M-settle`, M
        writes its own answer after it as in M-alone."""
        cfg = self.cfg
        kwargs = cfg.capable_template_kwargs if self.self_probe else cfg.light_template_kwargs
        return light_request(watch.problem, self.thinking(watch), cfg, kwargs)

    def asks_again(self, final: GenerationResult) -> bool:
        """Whether m's final turn was empty and is asked again (`answer_retry`, as in `duet`);
        M's own answer in `M-settle` is not, as M-alone's is not."""
        return not self.self_probe and asks_again(self.cfg, final)

    def thinking(self, watch: Watch) -> str:
        """M's reasoning so far: its text up to where its signal ends (the close tag, an answer
        marker), when it got there."""
        if self.style.name == "answer":
            at = first_marker(watch.text, self.style.stops())
            return (watch.text if at is None else watch.text[:at]).strip()
        text = watch.text.partition(self.cfg.prompts.think_close)[0]
        return signal_from_stage1(text, self.cfg.prompts.think_open)

    # --- taking results in --------------------------------------------------------------------

    def absorb(self, watch: Watch, result: GenerationResult) -> None:
        """Add M's step to the watch; decide whether M ended on its own."""
        watch.resent += watch.tokens
        watch.capable = watch.capable + self.usage_of(result, self.cfg.capable_price)
        watch.retries += result.retries
        watch.clamped = watch.clamped or result.budget_clamped
        watch.steps += 1
        watch.tokens += result.output_tokens
        watch.since_probe += result.output_tokens
        if "reasoning" in result.extra:
            raise GenerationError(
                f"{self.mode}: {self.duet.capable.spec} returned its thinking parsed out of the "
                "content; watching it needs the raw text (serve M without a reasoning parser)"
            )
        if result.token_ids is not None and self.tokenizer is not None and watch.exact_ids:
            watch.ids += result.token_ids
            shown = watch.ids[:-1] if result.finish_reason == "eos" and result.token_ids else watch.ids
            watch.text = self.tokenizer.decode(shown, skip_special_tokens=False)
        else:
            watch.exact_ids = False
            watch.text += result.text + (result.stop_string if result.stop_string == "\n" else "")
        own_end = result.finish_reason == "eos" or result.stop_string in self.style.stops()
        if own_end or watch.left <= 0 or (result.finish_reason == "length" and result.budget_clamped):
            watch.ended = result

    def at_line_end(self, watch: Watch) -> bool:
        return watch.text.rstrip(" \t").endswith("\n")

    def take_probe(self, watch: Watch, result: GenerationResult) -> None:
        answer = extract_answer(result.text, choices=len(watch.problem.choices))
        prob = answer_probability(result, answer, self.prober_tokenizer)
        watch.probes.append(Probe(watch.tokens, answer, prob, result.output_tokens))
        watch.prober = watch.prober + self.usage_of(result, self.prober_price)
        watch.since_probe = 0
        if settled(watch.probes, self.rule.agree, self.rule.min_prob):
            watch.settled_by = result

    def result(self, watch: Watch, final: GenerationResult | None) -> SolveResult:
        written = watch.settled_by if watch.settled_by is not None and final is None else final
        assert written is not None
        probes = watch.prober
        if self.self_probe:
            capable = (
                watch.capable + probes + (usage_of(final, self.cfg.capable_price) if final else ModelUsage())
            )
            usage = Usage(capable=capable)
        else:
            light = probes + (usage_of(final, self.cfg.light_price) if final else ModelUsage())
            usage = Usage(watch.capable, light)
        handover = {
            "settled": watch.settled_by is not None,
            "probes": len(watch.probes),
            "probe_answers": [p.answer for p in watch.probes],
            "probe_at_tokens": [p.at_tokens for p in watch.probes],
            "probe_probs": [p.prob for p in watch.probes] if self.rule.min_prob is not None else None,
            "probe_output_tokens": probes.output_tokens,
            "probe_prompt_tokens": probes.prompt_tokens,
            "probe_wall_s": probes.wall_s,
            "capable_steps": watch.steps,
            "resent_prompt_tokens": watch.resent,
            "prober": "M" if self.self_probe else "m",
        }
        if final is not None and final.extra.get("answer_retried"):
            handover["answer_retried"] = True
        return handed_over_result(
            watch.problem,
            str(self.mode),
            written,
            self.thinking(watch),
            watch.tokens,
            watch.ended,
            watch.settled_by is not None,
            usage,
            watch.text,
            watch.retries,
            watch.clamped,
            handover,
            self.self_probe,
        )

    def next_step(self, watch: Watch) -> GenerationRequest:
        """M's next step: a new stretch of `probe_every`, or, after one that stopped mid-line,
        the rest of that line."""
        if watch.since_probe >= self.rule.probe_every:
            return self.step_request(watch, min(self.rule.line_max_tokens, watch.left), line_end=True)
        return self.step_request(
            watch, min(self.rule.probe_every - watch.since_probe, watch.left), line_end=False
        )

    def wants_probe(self, watch: Watch) -> bool:
        """After a step: probe now (a line has ended past `probe_every`, or the line ran past
        `line_max_tokens`), or let M go on."""
        if not watch.active or watch.since_probe < self.rule.probe_every:
            return False
        return (
            self.at_line_end(watch) or watch.since_probe >= self.rule.probe_every + self.rule.line_max_tokens
        )

    # --- batched ------------------------------------------------------------------------------

    def solve_batch(self, problems: Sequence[Problem]) -> list[SolveResult]:
        """Every question's M step in one backend call, then every due probe in one call of
        the prober, until each question has settled or M has ended."""
        budget = self.mode.budget or self.cfg.signal_max_tokens
        watches = [Watch(problem, budget) for problem in problems]
        while active := [w for w in watches if w.active]:
            steps = self.duet.capable.generate([self.next_step(w) for w in active])
            for watch, result in zip(active, steps, strict=True):
                self.absorb(watch, result)
            due = [w for w in active if self.wants_probe(w)]
            if due:
                answers = self.prober.generate([self.probe_request(w) for w in due])
                for watch, result in zip(due, answers, strict=True):
                    self.take_probe(watch, result)
        answering = [w for w in watches if w.settled_by is None or self.rule.finish == "continue"]
        finals = dict(
            zip(map(id, answering), self.prober.generate([self.final_request(w) for w in answering]))
        )
        again = [w for w in answering if self.asks_again(finals[id(w)])]
        if again:
            requests = [answer_again_request(w.problem, self.thinking(w), self.cfg) for w in again]
            for watch, second_try in zip(again, self.prober.generate(requests), strict=True):
                finals[id(watch)] = answered_again(finals[id(watch)], second_try)
        return [self.result(w, finals.get(id(w))) for w in watches]

    # --- streamed -----------------------------------------------------------------------------

    async def astream(self, problem: Problem) -> AsyncIterator[Event]:
        """One question as events: M's thinking as `SignalDelta`s while it writes, a `Probing`
        event per probe, then the write-up and `Finished`. Closing the iterator cancels the
        request in flight, M's step or the probe (M waits idle during a probe)."""
        cfg = self.cfg
        watch = Watch(problem, self.mode.budget or cfg.signal_max_tokens)
        split = ThinkingSplitter(cfg.prompts.think_open, cfg.prompts.think_close, untagged="thinking")
        fed = ""
        while watch.active:
            result = None
            async for item in stream(self.duet.capable, self.next_step(watch)):
                if isinstance(item, GenerationResult):
                    result = item
                elif isinstance(item, str):
                    fed += item
                    for event in split.feed(item):
                        yield event
            assert result is not None
            self.absorb(watch, result)
            head = watch.text.partition(cfg.prompts.think_close)[0]
            if head.startswith(fed) and len(head) > len(fed):  # what a stop cut from the stream
                for event in split.feed(head[len(fed) :]):
                    yield event
                fed = head
            if self.wants_probe(watch):
                yield Probing(watch.tokens, len(watch.probes) + 1)
                started, probe = time.perf_counter(), None
                async for item in stream(self.prober, self.probe_request(watch)):
                    if isinstance(item, GenerationResult):
                        probe = item
                assert probe is not None
                probe.wall_s = probe.wall_s or time.perf_counter() - started
                self.take_probe(watch, probe)
        for event in split.close():
            yield event
        if watch.settled_by is not None and self.rule.finish == "probe":
            final = None
            text = watch.settled_by.text.strip()
            if text:
                yield AnswerDelta(text)
        else:
            final = None

            def again(answer: GenerationResult) -> GenerationRequest | None:
                empty = self.asks_again(answer)
                return answer_again_request(problem, self.thinking(watch), cfg) if empty else None

            async for item in write_up_deltas(self.prober, self.final_request(watch), again):
                if isinstance(item, GenerationResult):
                    final = item
                else:
                    yield item
        yield Finished(self.result(watch, final))


def check(duet: Duet, mode: Mode) -> None:
    """Refuse, before any work, what the settle modes cannot watch: a sketch (no reasoning), and
    `min_prob` with a prober that gives no per-token log-probabilities."""
    if style_of(duet.config).sketch:
        raise InputError(
            f"{mode}: M must reason before its answer (signal_style 'think' or 'answer'); a sketch has no "
            "reasoning to watch"
        )
    prober = duet.capable if mode.kind == "M-settle" else duet.light
    if duet.config.settle.min_prob is not None:
        capabilities_of(prober).require(
            "logprobs",
            f"{mode} with settle.min_prob",
            prober.spec,
            "use hf:, vllm: or llamacpp:, or min_prob = None",
        )


class Settle(Method):
    """`settle` (m probes M's reasoning and takes over once its answers agree) and `M-settle`
    (M probes itself)."""

    def check(self, duet: Duet) -> None:
        check(duet, self.mode)

    def first_read(self, duet: Duet, problem: Problem) -> tuple[Backend, GenerationRequest]:
        budget = self.mode.budget or duet.config.signal_max_tokens
        return duet.capable, capable_request(problem, duet.config, budget)

    def solve_batch(self, duet: Duet, problems: Sequence[Problem]) -> list[SolveResult]:
        return Settler(duet, self.mode).solve_batch(problems)

    async def astream(self, duet: Duet, problem: Problem) -> AsyncIterator[Event]:
        async for event in Settler(duet, self.mode).astream(problem):
            yield event


register(
    MethodEntry(
        "settle", "duet, M stopped once m's answers probed from its reasoning so far agree", Settle, order=4
    )
)
register(MethodEntry("M-settle", "M alone, stopped once its own probed answers agree", Settle, order=5))
