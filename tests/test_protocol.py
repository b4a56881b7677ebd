"""The two-stage protocol end to end on tiny real models."""

from __future__ import annotations

import pytest

from conftest import CAPABLE_SCRIPT, QUESTIONS, SIGNAL, _prompt
from duetlm.backends.base import render_chat
from duetlm.config import DuetConfig
from duetlm.errors import ConfigError, InputError
from duetlm.protocol import Duet, Mode, Problem, parse_mode, user_prompt
from duetlm.signals import signal_from_stage1, split_thinking
from duetlm.usage import Price


class Recording:
    """Wraps a real backend and keeps the requests it was sent (and their rendered prompts)."""

    def __init__(self, backend):
        self.backend, self.spec, self.requests = backend, backend.spec, []

    def generate(self, requests):
        self.requests.extend(requests)
        return self.backend.generate(requests)

    def rendered(self):
        return [render_chat(self.backend.tokenizer, r) for r in self.requests]

    def close(self):
        pass


@pytest.fixture
def pair(capable_backend, light_backend):
    return Recording(capable_backend), Recording(light_backend)


def test_duet_hands_exactly_the_thinking_to_m(pair, tokenizer):
    capable, light = pair
    result = Duet(capable, light, DuetConfig(signal_max_tokens=80, answer_max_tokens=40)).solve(QUESTIONS[0])
    assert result.signal == SIGNAL
    assert not result.truncated
    assert result.capable_finish == "stop"
    assert result.light_finish == "eos"
    assert capable.requests[0].sampling.stop == ("</think>",)
    assert light.rendered() == [_prompt(tokenizer, QUESTIONS[0], f"<think>\n{SIGNAL}\n</think>\n\n")]
    assert result.text == "So \\boxed{14}"
    assert result.answer == "14"


def test_usage_is_exact_and_priced_per_model(pair, tokenizer):
    capable, light = pair
    config = DuetConfig(
        capable_price=Price(input_per_mtok=1.0, output_per_mtok=10.0),
        light_price=Price(input_per_mtok=0.1, output_per_mtok=0.5),
    )
    result = Duet(capable, light, config).solve(QUESTIONS[1])
    usage = result.usage
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert usage.capable.output_tokens == count(f"<think>\n{SIGNAL}\n</think>") == result.signal_tokens
    assert usage.capable.prompt_tokens == count(capable.rendered()[0])
    assert usage.light.prompt_tokens == count(light.rendered()[0])
    assert usage.light.output_tokens == count("So \\boxed{14}<|im_end|>")
    expected = (usage.capable.prompt_tokens * 1.0 + usage.capable.output_tokens * 10.0) / 1e6 + (
        usage.light.prompt_tokens * 0.1 + usage.light.output_tokens * 0.5
    ) / 1e6
    assert usage.cost == pytest.approx(expected)
    assert usage.capable.requests == usage.light.requests == 1


def test_batch_equals_single(pair):
    duet = Duet(*pair)
    batch = duet.solve_batch(QUESTIONS)
    assert [r.to_dict() | {"usage": None} for r in batch] == [
        duet.solve(q).to_dict() | {"usage": None} for q in QUESTIONS
    ]


def test_budget_cut_signal_is_still_passed_and_flagged(pair):
    capable, light = pair
    result = Duet(capable, light).solve(QUESTIONS[0], mode="duet@6")
    assert result.truncated
    assert result.capable_finish == "length"
    assert result.signal_tokens == 6
    assert result.usage.light.requests == 1
    assert f"<think>\n{result.signal}\n</think>" in light.rendered()[0]


def test_m_alone_and_capable_alone(pair, tokenizer):
    duet = Duet(*pair)
    alone = duet.solve(QUESTIONS[2], mode="M-alone")
    assert alone.signal == SIGNAL
    assert alone.answer == "14"
    assert alone.usage.light.requests == 0
    assert alone.usage.capable.output_tokens == len(
        tokenizer(CAPABLE_SCRIPT, add_special_tokens=False)["input_ids"]
    )
    light_alone = duet.solve(QUESTIONS[2], mode="m-alone")
    assert light_alone.usage.capable.requests == 0
    assert light_alone.usage.light.requests == 1


def test_capable_at_budget_answers_itself(pair):
    capable, light = pair
    result = Duet(capable, light).solve(QUESTIONS[0], mode="M@100")
    assert light.requests == []
    assert result.usage.capable.requests == 2
    assert result.signal == SIGNAL


def test_capable_at_budget_forces_a_short_answer_after_a_cut(pair):
    # M@6 cuts the scripted thinking: M is closed with the instruction to answer now and gets
    # only forced_answer_max_tokens more, so its M tokens are bounded by B plus that budget.
    capable, light = pair
    config = DuetConfig(forced_answer_max_tokens=3)
    result = Duet(capable, light, config).solve(QUESTIONS[0], mode="M@6")
    forced = capable.requests[-1]
    assert forced.prefill.startswith("<think>\n") and "answer now" in forced.prefill
    assert forced.prefill.endswith("</think>\n\n") and forced.sampling.max_tokens == 3
    assert result.truncated and result.signal_tokens == 6
    assert result.usage.capable.output_tokens <= 6 + 3
    assert result.usage.light.output_tokens == 0 and result.light_finish is None
    assert result.capable_finish in ("length", "eos")  # M's own last finish, never m's


def test_capable_at_budget_that_closes_by_itself_answers_as_usual(pair):
    capable, light = pair
    result = Duet(capable, light, DuetConfig(forced_answer_max_tokens=3)).solve(QUESTIONS[0], mode="M@100")
    assert capable.requests[-1].prefill == f"<think>\n{SIGNAL}\n</think>\n\n"
    assert result.answer == "14" and result.capable_finish == "eos" and result.light_finish is None


def test_m_that_never_closes_thinking_gives_no_answer(pair):
    # An unseen question: the scripted M rambles without closing its thinking.
    capable, light = pair
    duet = Duet(capable, light, DuetConfig(alone_max_tokens=30))
    result = duet.solve("something else entirely", mode="M-alone")
    assert result.answer is None
    assert result.truncated
    assert result.capable_finish == "length"


def test_savings_against_capable_alone(pair):
    duet = Duet(*pair)
    together = duet.solve(QUESTIONS[0])
    alone = duet.solve(QUESTIONS[0], mode="M-alone")
    assert together.usage.capable.output_tokens < alone.usage.capable.output_tokens


def test_multiple_choice_prompt_and_extraction():
    problem = Problem("Which is prime?", ("4", "6", "7"))
    prompt = user_prompt(problem, DuetConfig())
    assert "A) 4\nB) 6\nC) 7" in prompt
    assert "one of ABC" in prompt


def test_sketch_style_uses_whole_output(pair):
    capable, light = pair
    result = Duet(capable, light, DuetConfig(signal_style="sketch", signal_max_tokens=30)).solve(QUESTIONS[0])
    assert capable.requests[0].sampling.stop == ()
    assert "solution sketch" in capable.requests[0].messages[-1][1]
    assert result.signal == capable.backend.generate(capable.requests[:1])[0].text.strip()


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_question_is_rejected(pair, text):
    with pytest.raises(InputError, match="empty"):
        Duet(*pair).solve(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("duet", Mode("duet")),
        ("M-alone", Mode("M-alone")),
        ("m-alone", Mode("m-alone")),
        ("duet@256", Mode("duet", 256)),
        ("M@64", Mode("M", 64)),
    ],
)
def test_parse_mode(text, expected):
    assert parse_mode(text) == expected
    assert str(parse_mode(text)) == text


@pytest.mark.parametrize("text", ["Duet", "duet@0", "duet@-3", "m@5", "M-alone@3", ""])
def test_bad_modes_are_rejected(text):
    with pytest.raises(InputError, match="unknown mode"):
        parse_mode(text)


@pytest.mark.parametrize(
    ("text", "thinking", "rest"),
    [
        ("<think>\nabc\n</think>\n\nfinal", "abc", "final"),
        ("abc</think>final", "abc", "final"),  # open tag written by the chat template
        ("<think>\nnever closed", None, "<think>\nnever closed"),
        ("no tags at all", None, "no tags at all"),
    ],
)
def test_split_thinking(text, thinking, rest):
    assert split_thinking(text, "<think>", "</think>") == (thinking, rest)


@pytest.mark.parametrize(
    ("text", "signal"),
    [("<think>\n a b \n", "a b"), ("a b", "a b"), ("\n<think>x", "x")],
)
def test_signal_from_stage1(text, signal):
    assert signal_from_stage1(text, "<think>") == signal


@pytest.mark.parametrize(
    "data",
    [{"signal_max_tokens": 0}, {"temperature": -1}, {"unknown_knob": 1}, {"prompts": {"light_prefill": "x"}}],
)
def test_bad_config_is_rejected(data):
    from duetlm.config import validate_config

    with pytest.raises(ConfigError):
        validate_config(DuetConfig, data)


def test_an_m_that_ends_at_once_is_said_once_and_recorded(tokenizer, light_backend, caplog):
    # A base model served as M (or one whose server ends the turn at once) writes no thinking:
    # m then answers alone. The run says so once and each result and eval row records it.
    import logging

    from conftest import tiny_model, train_script
    from duetlm.backends.hf import HFBackend
    from duetlm.evaluate.runner import result_row
    from duetlm.tasks import Example

    mute = tiny_model(tokenizer, seed=5)
    train_script(mute, tokenizer, [(_prompt(tokenizer, q), "<|im_end|>") for q in QUESTIONS], steps=60)
    capable = HFBackend(model=mute, tokenizer=tokenizer, spec="hf:mute")
    duet = Duet(capable, light_backend, DuetConfig(signal_max_tokens=16, answer_max_tokens=8))
    with caplog.at_level(logging.WARNING, logger="duetlm.protocol"):
        results = duet.solve_batch(QUESTIONS)
        again = duet.solve(QUESTIONS[0])
    assert [r.signal for r in results] == ["", "", ""] and all(r.empty_signal for r in [*results, again])
    told = [r.getMessage() for r in caplog.records if "without thinking" in r.getMessage()]
    assert len(told) == 1 and told[0].startswith("hf:mute ended its turn without thinking on 3 of 3")
    row = result_row("t", "duet", 0, Example("q0", QUESTIONS[0], "14"), again, "h")
    assert row["empty_signal"] is True
    thinking = Duet(light_backend, light_backend, DuetConfig(signal_max_tokens=16, answer_max_tokens=8))
    assert not thinking.solve(QUESTIONS[0], "M-alone").empty_signal
