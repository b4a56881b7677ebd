"""Where a signal ends, per signal style (duetlm.signals): the one place that decides it for
inference, evaluation, the probe, settle and training."""

from __future__ import annotations

import pytest

from duetlm.backends.base import GenerationResult
from duetlm.config import DuetConfig
from duetlm.signals import first_marker, style_of

THINK, ANSWER, SKETCH = (DuetConfig(signal_style=s) for s in ("think", "answer", "sketch"))


def result(text: str, finish: str = "stop", stop: str | None = None) -> GenerationResult:
    return GenerationResult(text, 10, 20, finish, stop_string=stop)


@pytest.mark.parametrize(
    ("config", "output", "signal", "closed", "open_signal"),
    [
        # think: stopped at the close tag; the open tag may be in the prompt or the output
        (THINK, result("<think>\nfirst 3+4=7\n", stop="</think>"), "first 3+4=7", True, False),
        (THINK, result("3+4=7\n", stop="</think>"), "3+4=7", True, False),
        # a model without think tags in the think style: it ended its turn, its whole answer went over
        (THINK, result("3+4=7, so \\boxed{7}.", "eos"), "3+4=7, so \\boxed{7}.", False, True),
        (THINK, result("<think>\n3+4=7, 7*2=", "length"), "3+4=7, 7*2=", False, False),  # cut: truncated
        # answer: stopped at a marker; the reasoning before it is the signal
        (ANSWER, result("3+4=7, so Tom has \\(", stop="\\boxed"), "3+4=7, so Tom has \\(", True, False),
        (ANSWER, result("3+4=7. Therefore, ", stop="the final answer is"), "3+4=7. Therefore,", True, False),
        (ANSWER, result("Tom has 7 apples.", "eos"), "Tom has 7 apples.", False, True),  # no marker written
        (ANSWER, result("3+4=", "length"), "3+4=", False, False),
        # sketch: the whole output, which ends with the turn
        (SKETCH, result("Add 3 and 4.", "eos"), "Add 3 and 4.", True, False),
    ],
)
def test_each_style_reads_its_signal_and_says_whether_m_got_one(config, output, signal, closed, open_signal):
    style = style_of(config)
    assert style.signal(output) == signal
    assert style.closed(output) is closed
    assert style.open_signal(output) is open_signal


def test_what_m_is_handed_and_where_m_must_answer_at_once():
    think, answer = style_of(THINK), style_of(ANSWER)
    assert think.stops() == ("</think>",) and style_of(SKETCH).stops() == ()
    assert answer.stops() == tuple(ANSWER.prompts.answer_markers)
    assert think.prefill("3+4=7") == "<think>\n3+4=7\n</think>\n\n" == think.close("3+4=7")
    assert answer.prefill("3+4=7, so") == "3+4=7, so"  # m continues M's own sentence
    assert answer.close("3+4=7") == "3+4=7\n\nSo the final answer is"
    assert think.budget_close("x").startswith("<think>\nx\n\nMy thinking budget is used up")
    assert answer.budget_close("x") == answer.close("x")
    assert think.as_written("x") == "<think>\nx\n</think>" and answer.as_written("x") == "x"


@pytest.mark.parametrize(
    ("config", "text", "reasoning"),
    [
        (THINK, "<think>\nA\nB\n</think>\n\nSo \\boxed{1}.", "A\nB"),
        (THINK, "A\nB\nSo \\boxed{1}.", None),  # never closed: no hand-over point
        (ANSWER, "A\nB\nThe final answer is \\boxed{1}.", "A\nB"),
        (ANSWER, "A\nB\nSo \\boxed{1}; the final answer is 1.", "A\nB\nSo"),  # the earliest marker
        (ANSWER, "A\nB\nSo it is 1.", None),
    ],
)
def test_the_reasoning_inside_a_whole_answer(config, text, reasoning):
    assert style_of(config).reasoning_in(text) == reasoning


def test_first_marker_is_the_earliest_of_any():
    assert first_marker("x Answer: 3 \\boxed{3}", ("\\boxed", "Answer:")) == 2
    assert first_marker("nothing here", ("\\boxed",)) is None
