"""The requests each method sends: the prompts both models see, M's first stage, m's
pre-filled turn, a model answering alone, and M@B's forced answer (docs/design.md section 1).
Pure functions of a problem and a `DuetConfig`; where a signal ends and how m is handed it
is the signal style's (`duetlm.signals`)."""

from __future__ import annotations

import dataclasses

from duetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams
from duetlm.config import DuetConfig
from duetlm.problems import Problem
from duetlm.signals import style_of


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


def answer_again_request(problem: Problem, signal: str, config: DuetConfig) -> GenerationRequest:
    """m's second try after a turn it ended at once with nothing written (`answer_retry`): the
    same signal, closed with the cue that the answer comes now, within the forced budget."""
    request = light_request(problem, signal, config, config.light_template_kwargs, closed=True)
    return dataclasses.replace(request, sampling=sampling(config, config.forced_answer_max_tokens))


def asks_again(config: DuetConfig, answer: GenerationResult) -> bool:
    """Whether m's write-up is an empty turn that `answer_retry` asks again: in the answer
    style only, whose cue differs from the turn m was given (a think-style turn closed again
    would be the same request)."""
    return (
        config.answer_retry
        and config.signal_style == "answer"
        and answer.finish_reason in ("eos", "stop")
        and not answer.text.strip()
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
