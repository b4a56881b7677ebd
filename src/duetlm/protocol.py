"""The two-stage DUET protocol (arXiv 2605.01111; docs/design.md section 1).

Stage 1: the capable model M thinks; generation stops at `</think>` (or EOS, or the signal
budget) and the thinking is the *signal*. Stage 2: the light model m gets the same question
with its assistant turn pre-filled as `<think>\\n{signal}\\n</think>\\n\\n` and writes the
answer. The same object runs the baselines (M-alone, m-alone, duet@B, M@B) so that every
method is measured by one code path. This module knows no backend class: it builds
`GenerationRequest`s and reads `GenerationResult`s.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from duetlm.backends.base import (
    Backend,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from duetlm.config import DuetConfig
from duetlm.errors import InputError
from duetlm.grading import extract_answer
from duetlm.signals import split_thinking, style_of
from duetlm.usage import ModelUsage, Price, Usage

if TYPE_CHECKING:
    from duetlm.streaming import Event

logger = logging.getLogger(__name__)

MODE_KINDS = ("duet", "M-alone", "m-alone", "duet@B", "M@B", "settle", "M-settle")
_BUDGETED = re.compile(r"^(duet|M)@(\d+)$")


@dataclass(frozen=True)
class Mode:
    """How to answer: `duet`, `M-alone`, `m-alone`, `duet@B` (signal cut at B tokens), `M@B`
    (M alone with a thinking budget of B: a thinking cut at B is closed with an instruction to
    answer now, and M answers within `forced_answer_max_tokens`), `settle` (m probes M's
    thinking as it grows and takes over once its answer has settled; `duetlm.settle`) or
    `M-settle` (the same with M probing itself)."""

    kind: str
    budget: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}@{self.budget}" if self.budget is not None else self.kind


def parse_mode(text: str | Mode) -> Mode:
    if isinstance(text, Mode):
        return text
    if text in ("duet", "M-alone", "m-alone", "settle", "M-settle"):
        return Mode(text)
    match = _BUDGETED.match(text)
    if match and int(match.group(2)) > 0:
        return Mode(match.group(1), int(match.group(2)))
    raise InputError(
        f"unknown mode {text!r}: use duet, M-alone, m-alone, settle, M-settle, duet@B or M@B with B a "
        "positive token budget"
    )


@dataclass(frozen=True)
class Problem:
    """A question, with lettered options when it is multiple choice. `history` holds the
    conversation before it ((role, content) pairs, a system prompt included): both models
    see it, and the question is the last user turn."""

    question: str
    choices: tuple[str, ...] = ()
    history: tuple[tuple[str, str], ...] = ()

    @property
    def letters(self) -> str:
        return string.ascii_uppercase[: len(self.choices)]


def as_problem(item: str | Problem) -> Problem:
    problem = item if isinstance(item, Problem) else Problem(item)
    if not isinstance(problem.question, str) or not problem.question.strip():
        raise InputError("the question is empty")
    if len(problem.choices) > 26:
        raise InputError(f"a question may have at most 26 options, got {len(problem.choices)}")
    return problem


@dataclass
class SolveResult:
    """Everything one question produced, in one shape for every mode and backend.

    `text` is the final write-up (m's in duet modes, the part after M's thinking otherwise),
    `answer` what was extracted from it (None: counted as no answer), `signal` what M handed
    over, `truncated` whether M was cut by its budget before closing its thinking."""

    question: str
    mode: str
    text: str
    answer: str | None
    signal: str | None
    signal_tokens: int | None
    truncated: bool
    capable_finish: FinishReason | None
    light_finish: FinishReason | None
    usage: Usage = field(default_factory=Usage)
    capable_text: str | None = None
    retries: int = 0
    budget_clamped: bool = False  # a budget was cut to fit a model's context (see ContextGuard)
    empty_signal: bool = False  # M ended without thinking: m answered from nothing (two-stage modes)
    open_signal: bool = False  # M ended its turn without closing its signal: its whole answer went to m
    handover: dict | None = None  # the settle modes: probes, their answers and costs (duetlm.settle)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["usage"] = self.usage.to_dict()
        return data


# --- pure helpers: prompts, the signal cut ------------------------------------------------


def user_prompt(problem: Problem, config: DuetConfig, sketch: bool = False) -> str:
    prompts = config.prompts
    if sketch:
        return prompts.sketch_instruction.replace("{question}", problem.question)
    if not problem.choices:
        return prompts.math_instruction.replace("{question}", problem.question)
    options = "\n".join(f"{letter}) {text}" for letter, text in zip(problem.letters, problem.choices))
    return (
        prompts.choice_instruction.replace("{question}", problem.question)
        .replace("{options}", options)
        .replace("{letters}", problem.letters)
    )


def sampling(config: DuetConfig, max_tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens, config.temperature, config.top_p, config.seed, stop, config.top_k)


def capable_request(problem: Problem, config: DuetConfig, budget: int) -> GenerationRequest:
    """Stage 1: M reasons about the problem, stopped where its signal style ends a signal (the
    close tag, an answer marker) or at the budget."""
    style = style_of(config)
    return GenerationRequest.chat(
        user_prompt(problem, config, sketch=style.sketch),
        sampling(config, budget, style.stops()),
        chat_template_kwargs=config.capable_template_kwargs,
        history=problem.history,
    )


def light_request(
    problem: Problem, signal: str, config: DuetConfig, template_kwargs: dict, closed: bool = False
) -> GenerationRequest:
    """Stage 2: the same question, the assistant turn pre-filled with the signal (`closed`:
    with the cue that the answer comes now, as a settle probe needs)."""
    style = style_of(config)
    return GenerationRequest.chat(
        user_prompt(problem, config),
        sampling(config, config.answer_max_tokens),
        prefill=style.close(signal) if closed else style.prefill(signal),
        chat_template_kwargs=template_kwargs,
        history=problem.history,
    )


def alone_request(problem: Problem, config: DuetConfig, budget: int, capable: bool) -> GenerationRequest:
    """M-alone or m-alone: the model thinks and answers by itself."""
    kwargs = config.capable_template_kwargs if capable else config.light_template_kwargs
    return GenerationRequest.chat(
        user_prompt(problem, config),
        sampling(config, budget),
        chat_template_kwargs=kwargs,
        history=problem.history,
    )


def forced_request(
    problem: Problem, signal: str, first: GenerationResult, config: DuetConfig
) -> GenerationRequest:
    """M@B's second part: M answers after its own thinking. A thinking that M closed within
    B continues as M-alone would; one cut at B is closed with a short instruction to answer
    now and gets a small answer budget (budget forcing), so the baseline's M tokens are
    bounded by B plus that budget."""
    cut = first.finish_reason == "length"
    style = style_of(config)
    return GenerationRequest.chat(
        user_prompt(problem, config),
        sampling(config, config.forced_answer_max_tokens if cut else config.answer_max_tokens),
        prefill=style.budget_close(signal) if cut else style.prefill(signal),
        chat_template_kwargs=config.capable_template_kwargs,
        history=problem.history,
    )


def signal_of(result: GenerationResult, config: DuetConfig) -> str:
    """The signal in a stage-1 result."""
    return style_of(config).signal(result)


# --- the protocol -------------------------------------------------------------------------


class Duet:
    """A capable model M and a light model m answering together.

    >>> duet = Duet(load_backend("hf:Qwen/Qwen3-8B"), load_backend("hf:Qwen/Qwen3-0.6B"))
    >>> duet.solve("What is 17 * 23?").answer
    '391'
    """

    def __init__(self, capable: Backend, light: Backend, config: DuetConfig | None = None) -> None:
        self.capable = capable
        self.light = light
        self.config = config or DuetConfig()
        self._told_empty = self._told_open = False

    def close(self) -> None:
        """Release both models (a llama.cpp server, an engine process); the Duet is unusable after."""
        self.capable.close()
        if self.light is not self.capable:
            self.light.close()

    def note_empty_signals(self, results: Sequence[SolveResult]) -> None:
        """Say once per Duet when M hands m an empty signal (a base model, or one served so that
        it ends its turn at once, silently turns DUET into m-alone), and once when M ends its
        turn without closing its signal (a model without think tags in the think style hands
        over its whole answer: nothing is saved, and m may only copy M's answer)."""
        opened = sum(r.open_signal for r in results)
        if opened and not self._told_open:
            self._told_open = True
            style = self.config.signal_style
            where = (
                f"its thinking ({self.config.prompts.think_close!r})"
                if style == "think"
                else f"its reasoning at an answer marker ({', '.join(map(repr, self.config.prompts.answer_markers))})"
            )
            hint = (
                "Is M a reasoning model with think tags? For a model without them use signal_style = "
                "'answer' (M stops at its answer marker) or 'sketch'"
                if style == "think"
                else "Add the marker M writes before its answer to prompts.answer_markers"
            )
            logger.warning(
                "%s ended its turn without closing %s on %d of %d question(s): its whole answer became the "
                "signal, so nothing was saved on those. %s (eval rows record this as open_signal)",
                self.capable.spec,
                where,
                opened,
                len(results),
                hint,
            )
        empty = sum(r.empty_signal for r in results)
        if empty and not self._told_empty:
            self._told_empty = True
            logger.warning(
                "%s ended its turn without thinking on %d of %d question(s): m answered from an empty "
                "signal. Is M a reasoning model with think tags? (signal_style = 'sketch' is for one "
                "without; eval rows record this as empty_signal)",
                self.capable.spec,
                empty,
                len(results),
            )

    def solve(self, question: str | Problem, mode: str | Mode = "duet") -> SolveResult:
        return self.solve_batch([question], mode)[0]

    def solve_batch(self, questions: Sequence[str | Problem], mode: str | Mode = "duet") -> list[SolveResult]:
        """Answer many questions; each stage is one batched backend call."""
        parsed = parse_mode(mode)
        problems = [as_problem(q) for q in questions]
        if not problems:
            return []
        if parsed.kind == "M-alone":
            return self._alone(problems, parsed, self.capable, self.config.capable_alone_budget, capable=True)
        if parsed.kind == "m-alone":
            return self._alone(problems, parsed, self.light, self.config.light_alone_budget, capable=False)
        if parsed.kind in ("settle", "M-settle"):
            from duetlm.settle import Settler

            results = Settler(self, parsed).solve_batch(problems)
            self.note_empty_signals(results)
            return results
        return self._two_stage(problems, parsed)

    def _two_stage(self, problems: list[Problem], mode: Mode) -> list[SolveResult]:
        cfg = self.config
        budget = mode.budget or cfg.signal_max_tokens
        firsts = self.capable.generate([capable_request(p, cfg, budget) for p in problems])
        signals = [signal_of(r, cfg) for r in firsts]
        if mode.kind == "M":
            seconds = self.capable.generate(
                [forced_request(p, s, f, cfg) for p, s, f in zip(problems, signals, firsts)]
            )
        else:
            seconds = self.finish(problems, signals)
        results = [
            two_stage_result(p, mode, f, s, r, cfg) for p, f, s, r in zip(problems, firsts, signals, seconds)
        ]
        self.note_empty_signals(results)
        return results

    def finish(self, problems: Sequence[str | Problem], signals: Sequence[str]) -> list[GenerationResult]:
        """Stage 2 alone: m answers each problem given a signal. Used for budget-cut curves and
        training rollouts, where the signal is chosen by the caller."""
        cfg = self.config
        return self.light.generate(
            [
                light_request(as_problem(p), s, cfg, cfg.light_template_kwargs)
                for p, s in zip(problems, signals, strict=True)
            ]
        )

    def _alone(
        self, problems: list[Problem], mode: Mode, backend: Backend, budget: int, capable: bool
    ) -> list[SolveResult]:
        outputs = backend.generate([alone_request(p, self.config, budget, capable) for p in problems])
        return [alone_result(p, mode, out, capable, self.config) for p, out in zip(problems, outputs)]

    async def astream(self, question: str | Problem, mode: str | Mode = "duet") -> AsyncIterator[Event]:
        """One question as events, while the models write (see `duetlm.streaming.astream`)."""
        from duetlm.streaming import astream

        async for event in astream(self, question, mode):
            yield event


# --- assembling results (shared by the batch and the streaming paths) -----------------------


def usage_of(result: GenerationResult, price: Price) -> ModelUsage:
    return ModelUsage(
        prompt_tokens=result.prompt_tokens,
        output_tokens=result.output_tokens,
        requests=1,
        wall_s=result.wall_s,
        cost=price.cost(result.prompt_tokens, result.output_tokens),
    )


def two_stage_result(
    problem: Problem,
    mode: Mode,
    first: GenerationResult,
    signal: str,
    second: GenerationResult,
    cfg: DuetConfig,
) -> SolveResult:
    """duet, duet@B and M@B: M's signal (stage 1) and the write-up of stage 2 (m's, or M's own
    under M@B: then one model's usage and its last finish reason)."""
    first_usage = usage_of(first, cfg.capable_price)
    if mode.kind == "M":
        usage = Usage(first_usage + usage_of(second, cfg.capable_price))
        capable_finish, light_finish = second.finish_reason, None
    else:
        usage = Usage(first_usage, usage_of(second, cfg.light_price))
        capable_finish, light_finish = first.finish_reason, second.finish_reason
    truncated = first.finish_reason == "length"
    open_signal = style_of(cfg).open_signal(first)
    if truncated:
        logger.info("signal cut at %d tokens (M did not close its thinking)", first.output_tokens)
    return SolveResult(
        question=problem.question,
        mode=str(mode),
        text=second.text,
        answer=extract_answer(second.text, choices=len(problem.choices)),
        signal=signal,
        signal_tokens=first.output_tokens,
        truncated=truncated,
        capable_finish=capable_finish,
        light_finish=light_finish,
        usage=usage,
        capable_text=first.text,
        retries=first.retries + second.retries,
        budget_clamped=first.budget_clamped or second.budget_clamped,
        empty_signal=not signal.strip(),
        open_signal=open_signal,
    )


def alone_result(
    problem: Problem, mode: Mode, out: GenerationResult, capable: bool, cfg: DuetConfig
) -> SolveResult:
    """M-alone or m-alone: the thinking is split off; an unclosed thinking is no answer."""
    prompts = cfg.prompts
    if "reasoning" in out.extra:
        thinking, final = str(out.extra["reasoning"]).strip(), out.text.strip()
    else:
        thinking, final = split_thinking(out.text, prompts.think_open, prompts.think_close)
        if thinking is None and prompts.think_open not in out.text:
            final = out.text  # a model that answered without thinking tags
    usage = usage_of(out, cfg.capable_price if capable else cfg.light_price)
    unclosed = thinking is None and prompts.think_open in out.text
    return SolveResult(
        question=problem.question,
        mode=str(mode),
        text=final,
        answer=None if unclosed else extract_answer(final, choices=len(problem.choices)),
        signal=thinking,
        signal_tokens=None,
        truncated=unclosed and out.finish_reason == "length",
        capable_finish=out.finish_reason if capable else None,
        light_finish=None if capable else out.finish_reason,
        usage=Usage(capable=usage) if capable else Usage(light=usage),
        capable_text=out.text if capable else None,
        retries=out.retries,
        budget_clamped=out.budget_clamped,
    )
