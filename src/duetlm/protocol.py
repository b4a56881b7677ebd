"""The two-stage DUET protocol (arXiv 2605.01111; DESIGN section 1).

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from duetlm.backends.base import Backend, FinishReason, GenerationRequest, GenerationResult, SamplingParams
from duetlm.config import DuetConfig
from duetlm.errors import InputError
from duetlm.grading import extract_answer
from duetlm.usage import ModelUsage, Price, Usage

logger = logging.getLogger(__name__)

MODE_KINDS = ("duet", "M-alone", "m-alone", "duet@B", "M@B")
_BUDGETED = re.compile(r"^(duet|M)@(\d+)$")


@dataclass(frozen=True)
class Mode:
    """How to answer: `duet`, `M-alone`, `m-alone`, `duet@B` (signal cut at B tokens) or `M@B`
    (M alone, thinking cut at B tokens, then M writes the answer itself)."""

    kind: str
    budget: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}@{self.budget}" if self.budget is not None else self.kind


def parse_mode(text: str | Mode) -> Mode:
    if isinstance(text, Mode):
        return text
    if text in ("duet", "M-alone", "m-alone"):
        return Mode(text)
    match = _BUDGETED.match(text)
    if match and int(match.group(2)) > 0:
        return Mode(match.group(1), int(match.group(2)))
    raise InputError(
        f"unknown mode {text!r}: use duet, M-alone, m-alone, duet@B or M@B with B a positive token budget"
    )


@dataclass(frozen=True)
class Problem:
    """A question, with lettered options when it is multiple choice."""

    question: str
    choices: tuple[str, ...] = ()

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


def split_thinking(text: str, think_open: str, think_close: str) -> tuple[str | None, str]:
    """(thinking, rest) of a reasoning model's output. thinking is None when the close tag never
    came; the open tag is optional because some chat templates write it into the prompt."""
    head, closed, rest = text.partition(think_close)
    if not closed:
        return None, text
    _, opened, after_open = head.partition(think_open)
    return (after_open if opened else head).strip(), rest.strip()


def signal_from_stage1(text: str, think_open: str) -> str:
    """The signal in a stage-1 output that was stopped at the close tag (or cut by the budget):
    everything after the open tag, whitespace stripped."""
    _, opened, after = text.partition(think_open)
    return (after if opened else text).strip()


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
        return self._two_stage(problems, parsed)

    def _sampling(self, max_tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
        cfg = self.config
        return SamplingParams(max_tokens, cfg.temperature, cfg.top_p, cfg.seed, stop)

    @property
    def _sketch(self) -> bool:
        return self.config.signal_style == "sketch"

    def _two_stage(self, problems: list[Problem], mode: Mode) -> list[SolveResult]:
        cfg, prompts = self.config, self.config.prompts
        budget = mode.budget or cfg.signal_max_tokens
        stop = () if self._sketch else (prompts.think_close,)
        signal_results = self.capable.generate(
            [
                GenerationRequest.chat(
                    user_prompt(p, cfg, sketch=self._sketch),
                    self._sampling(budget, stop),
                    chat_template_kwargs=cfg.capable_template_kwargs,
                )
                for p in problems
            ]
        )
        signals = [self._signal_of(r) for r in signal_results]
        answerer = self.capable if mode.kind == "M" else self.light
        answer_kwargs = cfg.capable_template_kwargs if mode.kind == "M" else cfg.light_template_kwargs
        answer_results = answerer.generate(
            [
                GenerationRequest.chat(
                    user_prompt(p, cfg),
                    self._sampling(cfg.answer_max_tokens),
                    prefill=prompts.light_prefill.replace("{signal}", signal),
                    chat_template_kwargs=answer_kwargs,
                )
                for p, signal in zip(problems, signals)
            ]
        )
        results = []
        for problem, first, signal, second in zip(problems, signal_results, signals, answer_results):
            if mode.kind == "M":
                usage = Usage(
                    capable=self._usage(first, cfg.capable_price) + self._usage(second, cfg.capable_price)
                )
            else:
                usage = Usage(self._usage(first, cfg.capable_price), self._usage(second, cfg.light_price))
            truncated = first.finish_reason == "length"
            if truncated:
                logger.info("signal cut at %d tokens (M did not close its thinking)", first.output_tokens)
            results.append(
                SolveResult(
                    question=problem.question,
                    mode=str(mode),
                    text=second.text,
                    answer=extract_answer(second.text, choices=bool(problem.choices)),
                    signal=signal,
                    signal_tokens=first.output_tokens,
                    truncated=truncated,
                    capable_finish=first.finish_reason,
                    light_finish=second.finish_reason,
                    usage=usage,
                    capable_text=first.text,
                    retries=first.retries + second.retries,
                )
            )
        return results

    def _signal_of(self, result: GenerationResult) -> str:
        if "reasoning" in result.extra:  # a server that parses thinking out of the content
            return str(result.extra["reasoning"]).strip()
        if self._sketch:
            return result.text.strip()
        return signal_from_stage1(result.text, self.config.prompts.think_open)

    def _alone(
        self, problems: list[Problem], mode: Mode, backend: Backend, budget: int, capable: bool
    ) -> list[SolveResult]:
        cfg, prompts = self.config, self.config.prompts
        kwargs = cfg.capable_template_kwargs if capable else cfg.light_template_kwargs
        outputs = backend.generate(
            [
                GenerationRequest.chat(
                    user_prompt(p, cfg), self._sampling(budget), chat_template_kwargs=kwargs
                )
                for p in problems
            ]
        )
        results = []
        for problem, out in zip(problems, outputs):
            if "reasoning" in out.extra:
                thinking, final = str(out.extra["reasoning"]).strip(), out.text.strip()
            else:
                thinking, final = split_thinking(out.text, prompts.think_open, prompts.think_close)
                if thinking is None and prompts.think_open not in out.text:
                    final = out.text  # a model that answered without thinking tags
            usage = self._usage(out, cfg.capable_price if capable else cfg.light_price)
            unclosed = thinking is None and prompts.think_open in out.text
            results.append(
                SolveResult(
                    question=problem.question,
                    mode=str(mode),
                    text=final,
                    answer=None if unclosed else extract_answer(final, choices=bool(problem.choices)),
                    signal=thinking,
                    signal_tokens=None,
                    truncated=unclosed and out.finish_reason == "length",
                    capable_finish=out.finish_reason if capable else None,
                    light_finish=None if capable else out.finish_reason,
                    usage=Usage(capable=usage) if capable else Usage(light=usage),
                    capable_text=out.text if capable else None,
                    retries=out.retries,
                )
            )
        return results

    @staticmethod
    def _usage(result: GenerationResult, price: Price) -> ModelUsage:
        return ModelUsage(
            prompt_tokens=result.prompt_tokens,
            output_tokens=result.output_tokens,
            requests=1,
            wall_s=result.wall_s,
            cost=price.cost(result.prompt_tokens, result.output_tokens),
        )
