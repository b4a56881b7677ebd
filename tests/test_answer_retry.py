"""`answer_retry` on the Qwen3 test bed: in the answer style, an m that ends its turn at once
after M's reasoning (as the real 0.5B does on about one GSM8K question in 27) is asked once more
with the answer cue. m is scripted to end at once on one question and to answer on the other,
so which rows are asked again, what they answer and what they cost are known in advance. The
same holds for settle's final turn: there m answers from M's whole reasoning as in duet."""

from __future__ import annotations

import asyncio

import pytest

from conftest import train_script
from duetlm.backends.base import render_chat
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig, SettleConfig
from duetlm.protocol import Duet, Problem, capable_request
from duetlm.requests import answer_again_request, light_request
from duetlm.streaming import AnswerDelta, Finished

SILENT, ANSWERED = "Start at 3, then +4, *2. Result?", "Start at 2, then +2. Result?"
REASONING = {SILENT: "step 3+4=7\nstep 7*2=14\nThe result is", ANSWERED: "step 2+2=4\nThe result is"}
RESULT = {SILENT: "14", ANSWERED: "4"}


def config(**changes) -> DuetConfig:
    return DuetConfig(
        signal_style="answer",
        temperature=0.0,
        signal_max_tokens=40,
        answer_max_tokens=12,
        forced_answer_max_tokens=10,
    ).model_copy(update=changes)


@pytest.fixture(scope="module")
def pair():
    """M reasons and boxes its result in one turn; m, given M's reasoning, ends its turn at
    once on SILENT and answers on ANSWERED, and answers SILENT when cued."""
    from qwen3 import qwen3_tokenizer, tiny_qwen3

    tokenizer = qwen3_tokenizer()
    cfg = config()
    capable = tiny_qwen3(seed=11)
    train_script(
        capable,
        tokenizer,
        [
            (
                render_chat(tokenizer, capable_request(Problem(q), cfg, 40)),
                f"{r} \\boxed{{{RESULT[q]}}}.<|im_end|>",
            )
            for q, r in REASONING.items()
        ],
    )
    light = tiny_qwen3(seed=12)
    turn = {q: render_chat(tokenizer, light_request(Problem(q), r, cfg, {})) for q, r in REASONING.items()}
    cued = render_chat(tokenizer, answer_again_request(Problem(SILENT), REASONING[SILENT], cfg))
    train_script(
        light,
        tokenizer,
        [
            (turn[SILENT], "<|im_end|>"),
            (turn[ANSWERED], " \\boxed{4}.<|im_end|>"),
            (cued, " \\boxed{14}.<|im_end|>"),
        ],
    )
    M = HFBackend(model=capable, tokenizer=tokenizer, spec="hf:answer-M")
    m = HFBackend(model=light, tokenizer=tokenizer, spec="hf:answer-m")
    return M, m


def test_an_empty_turn_is_asked_again_with_the_cue_and_both_requests_count(pair):
    silent, answered = Duet(*pair, config()).solve_batch([SILENT, ANSWERED])
    assert silent.signal == REASONING[SILENT], "the scripted M did not learn its reasoning"
    assert silent.answer == "14" and silent.handover == {"answer_retried": True}
    assert silent.usage.light.requests == 2
    assert answered.answer == "4" and answered.handover is None and answered.usage.light.requests == 1
    assert silent.usage.light.output_tokens > 1  # the empty turn's end token and the cued answer


def test_without_the_retry_the_empty_turn_is_no_answer(pair):
    silent, answered = Duet(*pair, config(answer_retry=False)).solve_batch([SILENT, ANSWERED])
    assert silent.answer is None and silent.text == "" and silent.usage.light.requests == 1
    assert answered.answer == "4"


def test_the_think_style_is_not_asked_again(pair):
    """Closing a think-style turn again gives the request m already answered, so the retry does
    nothing there and leaves the run folder's identity as it was."""
    assert "answer_retry" in config().identity()
    assert "answer_retry" not in config(signal_style="think").identity()
    assert "answer_retry" not in config(answer_retry=False).identity()


def unprobed() -> DuetConfig:
    """Settle with probes farther apart than M's reasoning is long: M runs to its own end, and m's
    final turn is the one duet gives it."""
    return config(settle=SettleConfig(probe_every=200))


def test_settles_final_turn_is_asked_again_as_duets_is(pair):
    silent, answered = Duet(*pair, unprobed()).solve_batch([SILENT, ANSWERED], "settle")
    assert silent.handover["probes"] == 0 and silent.signal == REASONING[SILENT]
    assert silent.answer == "14" and silent.handover["answer_retried"] is True
    assert silent.usage.light.requests == 2
    assert answered.answer == "4" and "answer_retried" not in answered.handover
    off = Duet(*pair, unprobed().model_copy(update={"answer_retry": False})).solve_batch([SILENT], "settle")
    assert off[0].answer is None and off[0].usage.light.requests == 1


@pytest.mark.parametrize("mode", ["duet", "settle"])
def test_streaming_asks_again_as_the_batch_does(pair, mode):
    duet = Duet(*pair, unprobed())

    async def events():
        return [event async for event in duet.astream(SILENT, mode)]

    got = asyncio.run(events())
    [finished] = [e for e in got if isinstance(e, Finished)]
    assert finished.result.answer == "14" and finished.result.handover["answer_retried"] is True
    assert "".join(e.text for e in got if isinstance(e, AnswerDelta)) == finished.result.text.strip()
