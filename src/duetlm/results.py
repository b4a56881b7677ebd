"""The one place a `SolveResult` is built: from a two-stage answer, a model answering alone, a
hand-over decided by probes (settle), or a stored row read back. What an unclosed thinking
means is decided here and in `duetlm.signals`: no answer, and counted (`truncated`,
`open_signal`)."""

from __future__ import annotations

import dataclasses
import logging

from duetlm.backends.base import GenerationResult
from duetlm.config import DuetConfig
from duetlm.grading import extract_answer
from duetlm.problems import Problem, SolveResult
from duetlm.signals import split_thinking, style_of
from duetlm.usage import ModelUsage, Price, Usage

logger = logging.getLogger(__name__)


def usage_of(result: GenerationResult, price: Price) -> ModelUsage:
    return ModelUsage(
        prompt_tokens=result.prompt_tokens,
        output_tokens=result.output_tokens,
        requests=int(result.extra.get("requests", 1)),
        wall_s=result.wall_s,
        cost=price.cost(result.prompt_tokens, result.output_tokens),
    )


def answered_again(first_try: GenerationResult, again: GenerationResult) -> GenerationResult:
    """m's empty first turn and its second try (`answer_retry`) as one write-up: the second's
    text and finish, the tokens, time and retries of both requests."""
    return dataclasses.replace(
        again,
        prompt_tokens=first_try.prompt_tokens + again.prompt_tokens,
        output_tokens=first_try.output_tokens + again.output_tokens,
        wall_s=first_try.wall_s + again.wall_s,
        retries=first_try.retries + again.retries,
        budget_clamped=first_try.budget_clamped or again.budget_clamped,
        token_ids=None,
        logprobs=None,
        extra=again.extra | {"requests": 2, "answer_retried": True},
    )


def two_stage_result(
    problem: Problem,
    mode: str,
    first: GenerationResult,
    signal: str,
    second: GenerationResult,
    cfg: DuetConfig,
    own_answer: bool = False,
) -> SolveResult:
    """duet, duet@B and M@B: M's signal (stage 1) and the write-up of stage 2 (m's, or, with
    `own_answer` (M@B), M's own: then one model's usage and its last finish reason)."""
    first_usage = usage_of(first, cfg.capable_price)
    if own_answer:
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
        mode=mode,
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
        handover={"answer_retried": True} if second.extra.get("answer_retried") else None,
    )


def alone_result(
    problem: Problem, mode: str, out: GenerationResult, capable: bool, cfg: DuetConfig
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
        mode=mode,
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


def handed_over_result(
    problem: Problem,
    mode: str,
    written: GenerationResult,
    signal: str,
    signal_tokens: int,
    ended: GenerationResult | None,
    settled: bool,
    usage: Usage,
    capable_text: str,
    retries: int,
    clamped: bool,
    handover: dict,
    self_probe: bool,
) -> SolveResult:
    """settle and M-settle: M stopped where the probes agreed (`settled`), or at its own end;
    `written` is the answer that stands (the settling probe's, or the final turn's)."""
    truncated = ended is not None and ended.finish_reason == "length"
    capable_finish = "settled" if settled else (ended.finish_reason if ended else None)
    return SolveResult(
        question=problem.question,
        mode=mode,
        text=written.text,
        answer=extract_answer(written.text, choices=len(problem.choices)),
        signal=signal,
        signal_tokens=signal_tokens,
        truncated=truncated,
        capable_finish=capable_finish,
        light_finish=None if self_probe else written.finish_reason,
        usage=usage,
        capable_text=capable_text,
        retries=retries + written.retries,
        budget_clamped=clamped or written.budget_clamped,
        empty_signal=not signal.strip(),
        handover=handover,
    )


def from_row(row: dict) -> SolveResult:
    """A stored eval row read back as the result it recorded (the probe takes M-alone's and
    m-alone's from an eval run this way)."""
    usage = row["usage"]
    return SolveResult(
        question=row["question"],
        mode=row["method"],
        text=row["text"],
        answer=None if row["no_answer"] else row["answer"],
        signal=row["signal"],
        signal_tokens=row["signal_tokens"],
        truncated=row["truncated"],
        capable_finish=row["capable_finish"],
        light_finish=row["light_finish"],
        usage=Usage(ModelUsage(**usage["capable"]), ModelUsage(**usage["light"])),
        capable_text=row["capable_text"],
        open_signal=bool(row.get("open_signal")),
    )
