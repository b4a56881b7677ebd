"""The settle modes on the Qwen3 test bed: M's thinking is scripted line by line and m is
scripted to answer each cut of it, so every probe's answer, the stop and M's token count are
known in advance and the real hf generation path must produce exactly them."""

from __future__ import annotations

import asyncio
import math

import pytest

from conftest import counting_forwards, train_script
from duetlm.backends.base import GenerationResult, render_chat
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig, SettleConfig
from duetlm.methods.settle import Probe, Settler, Watch, answer_probability, settled
from duetlm.protocol import Duet, Problem, parse_mode
from duetlm.streaming import Finished, Probing, SignalDelta

# question -> (M's thinking lines, m's answer after each cut of them)
SCRIPTS = {
    "Start at 3, then +4, *2. Result?": (
        ["step 3+4=7", "step 7*2=14", "check 14", "check 14 again", "so far 14"],
        ["7", "14", "14", "14", "14"],
    ),
    "Start at 2, then +2. Result?": (["step 2+2=4", "check 4", "so far 4"], ["4", "4", "4"]),
}
LONG, SHORT = list(SCRIPTS)


def thinking_text(lines: list[str]) -> str:
    return "<think>\n" + "".join(line + "\n" for line in lines)


def capable_script(lines: list[str], answer: str) -> str:
    return thinking_text(lines) + f"</think>\n\nThe result is \\boxed{{{answer}}}.<|im_end|>"


def config(**settle) -> DuetConfig:
    return DuetConfig(
        temperature=0.0,
        signal_max_tokens=80,
        answer_max_tokens=12,
        settle=SettleConfig(**({"probe_every": 3, "probe_max_tokens": 12} | settle)),
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """M thinks the scripted lines; m answers every cut of them (and the whole) as scripted."""
    from qwen3 import qwen3_tokenizer, save, tiny_qwen3

    from duetlm.protocol import capable_request

    tokenizer = qwen3_tokenizer()
    root = tmp_path_factory.mktemp("settle")
    cfg = config()
    capable = tiny_qwen3(seed=3)
    scripts = [
        (render_chat(tokenizer, capable_request(Problem(q), cfg, 80)), capable_script(lines, answers[-1]))
        for q, (lines, answers) in SCRIPTS.items()
    ]
    train_script(capable, tokenizer, scripts, steps=150)
    light = tiny_qwen3(seed=4)
    settler = Settler(Duet(None, None, cfg), parse_mode("settle"))  # type: ignore[arg-type]
    cuts = []
    for q, (lines, answers) in SCRIPTS.items():
        for k, answer in enumerate(answers, start=1):
            watch = Watch(Problem(q), 80, text=thinking_text(lines[:k]))
            prompt = render_chat(tokenizer, settler.probe_request(watch))
            cuts.append((prompt, f"So \\boxed{{{answer}}}<|im_end|>"))
    train_script(light, tokenizer, cuts, steps=150)
    capable_dir, light_dir = save(capable, tokenizer, root / "M"), save(light, tokenizer, root / "m")
    M, m = HFBackend(str(capable_dir), device="cpu"), HFBackend(str(light_dir), device="cpu")
    plain = Duet(M, m, cfg).solve_batch(list(SCRIPTS))
    for result, (lines, answers) in zip(plain, SCRIPTS.values(), strict=True):
        assert result.signal == "\n".join(lines), "the scripted M did not learn its thinking"
        assert result.answer == answers[-1], "the scripted m did not learn its answer"
    return M, m


def solve(pair, questions, mode="settle", **settle):
    M, m = pair
    return Duet(M, m, config(**settle)).solve_batch(questions, mode)


def m_tokens(pair, text: str) -> int:
    return len(pair[0].tokenizer(text, add_special_tokens=False)["input_ids"])


def test_m_stops_M_at_the_first_probe_where_the_rule_holds(pair):
    lines, _ = SCRIPTS[LONG]
    for agree, kept in ((2, 3), (3, 4)):  # answers 7, 14, 14, 14: settled after line 3, or 4
        [result] = solve(pair, [LONG], agree=agree)
        handover = result.handover
        assert handover["settled"] and result.capable_finish == "settled"
        assert handover["probe_answers"] == ["7", "14", "14", "14"][:kept]
        assert result.answer == "14" and result.text.startswith("So")
        assert result.signal == "\n".join(lines[:kept])
        assert result.capable_text == thinking_text(lines[:kept])


@pytest.fixture(scope="module")
def answer_style_m(pair):
    """An m for the answer signal style (M reasons and answers in one turn), scripted on each
    cut of LONG's reasoning both ways: closed with the answer cue it says the last number M
    wrote (7, then 14), as a small model cut mid-solution does; given its own turn it finishes
    the reasoning and reaches 14 from the first cut."""
    from qwen3 import tiny_qwen3

    M = pair[0]
    lines, answers = SCRIPTS[LONG]
    scripts = []
    for probe, reply in (("answer", "So \\boxed{{{}}}"), ("continue", "Then \\boxed{{{}}}")):
        settler = Settler(Duet(M, None, answer_config(probe=probe)), parse_mode("settle"))  # type: ignore[arg-type]
        for k, answer in enumerate(answers, start=1):
            watch = Watch(Problem(LONG), 80, text=thinking_text(lines[:k]))
            said = answer if probe == "answer" else answers[-1]
            scripts.append(
                (render_chat(M.tokenizer, settler.probe_request(watch)), reply.format(said) + "<|im_end|>")
            )
    light = tiny_qwen3(seed=5)
    train_script(light, M.tokenizer, scripts, steps=150)
    return HFBackend(model=light, tokenizer=M.tokenizer, spec="hf:answer-style-m")


def answer_config(**settle) -> DuetConfig:
    return config(**settle).model_copy(update={"signal_style": "answer"})


def test_continue_probes_let_m_finish_the_reasoning_and_settle_where_it_gets(pair, answer_style_m):
    M, lines = pair[0], SCRIPTS[LONG][0]
    [cued] = Duet(M, answer_style_m, answer_config(agree=2)).solve_batch([LONG], "settle")
    [own_turn] = Duet(M, answer_style_m, answer_config(agree=2, probe="continue")).solve_batch(
        [LONG], "settle"
    )
    # cued to answer now, m agrees only once M's last number is the result
    assert cued.handover["probe_answers"] == ["7", "14", "14"] and cued.text.startswith("So")
    # on its own turn m finishes the reasoning: settled a line earlier, on its own write-up
    assert own_turn.handover["probe_answers"] == ["14", "14"] and own_turn.handover["settled"]
    assert own_turn.answer == "14" and own_turn.text.startswith("Then")
    assert own_turn.signal == "<think>\n" + "\n".join(lines[:2])
    assert own_turn.usage.capable.output_tokens < cued.usage.capable.output_tokens


def test_M_tokens_after_the_stop_are_neither_generated_nor_counted(pair):
    M, _ = pair
    lines, _ = SCRIPTS[LONG]
    with counting_forwards(M.model) as forwards:
        [result] = solve(pair, [LONG], agree=2)
    thought = m_tokens(pair, thinking_text(lines[:3]))
    assert result.usage.capable.output_tokens == thought == result.signal_tokens
    assert result.handover["probe_at_tokens"][-1] == thought
    # one forward per token M wrote (the first of each step is its prefill), none beyond
    assert len(forwards) == thought
    [whole] = Duet(*pair, config()).solve_batch([LONG])
    assert whole.usage.capable.output_tokens > thought + 8
    # the probes' m tokens are counted as m's, beside the write-up's
    assert result.usage.light.output_tokens == result.handover["probe_output_tokens"] > 0
    assert result.handover["probe_wall_s"] > 0


def test_rows_settle_independently_in_one_batch(pair):
    together = solve(pair, [LONG, SHORT], agree=2)
    alone = [solve(pair, [q], agree=2)[0] for q in (LONG, SHORT)]
    assert [r.to_dict() | {"usage": None, "handover": None} for r in together] == [
        r.to_dict() | {"usage": None, "handover": None} for r in alone
    ]
    assert together[1].handover["probe_answers"] == ["4", "4"]
    assert together[1].signal == "step 2+2=4\ncheck 4"
    assert [r.usage.capable.output_tokens for r in together] == [r.usage.capable.output_tokens for r in alone]


def test_an_m_that_never_settles_runs_to_M_s_own_end_as_duet(pair):
    duet = Duet(*pair, config()).solve_batch([LONG, SHORT])
    watched = solve(pair, [LONG, SHORT], agree=50)
    for plain, result in zip(duet, watched, strict=True):
        assert not result.handover["settled"] and result.capable_finish == "stop"
        assert (result.signal, result.text, result.answer) == (plain.signal, plain.text, plain.answer)
        assert result.usage.capable.output_tokens == plain.usage.capable.output_tokens
        assert result.signal_tokens == plain.signal_tokens
        # what the probes cost comes on top of duet's m tokens
        probes = result.handover["probe_output_tokens"]
        assert result.usage.light.output_tokens == plain.usage.light.output_tokens + probes


def test_the_self_probe_baseline_counts_its_probes_as_M_tokens(pair):
    [result] = solve(pair, [LONG], mode="M-settle", agree=50)
    assert result.handover["prober"] == "M" and result.usage.light.output_tokens == 0
    probes = result.handover["probe_output_tokens"]
    assert probes > 0 and result.usage.capable.output_tokens > result.signal_tokens + probes


def test_streaming_gives_solve_s_result_with_a_probing_event_per_probe(pair):
    duet = Duet(*pair, config(agree=2))

    async def events():
        return [event async for event in duet.astream(LONG, "settle")]

    got = asyncio.run(events())
    [finished] = [e for e in got if isinstance(e, Finished)]
    expected = duet.solve(LONG, "settle")
    assert finished.result.text == expected.text and finished.result.signal == expected.signal
    assert [e.index for e in got if isinstance(e, Probing)] == [1, 2, 3]
    assert "".join(e.text for e in got if isinstance(e, SignalDelta)).strip() == expected.signal


def test_a_client_that_leaves_mid_probe_cancels_both_models(pair):
    from qwen3 import tiny_qwen3

    M = pair[0]
    # an untrained m never ends its answer: each probe runs to its budget, long enough to leave
    m = HFBackend(model=tiny_qwen3(seed=0), tokenizer=pair[1].tokenizer, spec="hf:untrained-m")
    duet = Duet(M, m, config(agree=50, probe_max_tokens=400))

    async def leave_during_the_second_probe():
        events = duet.astream(LONG, "settle")
        probes = 0
        async for event in events:
            if isinstance(event, Probing):
                probes += 1
                if probes == 2:
                    break
        # the next step of the iterator runs the probe on m; leave while it is in flight
        pending = asyncio.ensure_future(events.__anext__())
        for _ in range(500):
            if m.engine.rows:
                break
            await asyncio.sleep(0.005)
        assert m.engine.rows, "the probe never reached m's engine"
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await events.aclose()
        for _ in range(200):  # each engine drops a cancelled row at its next step
            if not m.engine.rows and not M.engine.rows:
                break
            await asyncio.sleep(0.02)

    asyncio.run(leave_during_the_second_probe())
    assert m.engine.rows == [] and M.engine.rows == [] and not M.engine.has_work


def test_the_rule_needs_agree_answers_in_a_row_and_each_sure_enough():
    def probes(*answers, prob=0.9):
        return [Probe(10 * i, a, prob, 3) for i, a in enumerate(answers)]

    assert settled(probes("7", "14", "14"), agree=2, min_prob=None)
    assert not settled(probes("14", "7", "14"), agree=2, min_prob=None)
    assert not settled(probes("14"), agree=2, min_prob=None)
    assert not settled(probes(None, None), agree=2, min_prob=None)  # no answer breaks a run
    assert settled(probes("1 4", "14"), agree=2, min_prob=None)  # whitespace aside
    assert settled(probes("14", "14", prob=0.9), agree=2, min_prob=0.8)
    assert not settled(probes("14", "14", prob=0.5), agree=2, min_prob=0.8)


def test_the_answer_probability_is_that_of_the_answer_s_tokens(pair):
    tokenizer = pair[1].tokenizer
    text = "So \\boxed{14}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    logprobs = [-0.1 * (i + 1) for i in range(len(ids))]
    result = GenerationResult(text, 3, len(ids), "stop", 0.0, token_ids=ids, logprobs=logprobs)
    start = text.rfind("14")
    inside = [
        lp
        for i, lp in enumerate(logprobs)
        if len(pieces[i]) > start and (len(pieces[i - 1]) if i else 0) < start + 2
    ]
    assert 0 < len(inside) < len(ids)
    assert answer_probability(result, "14", tokenizer) == pytest.approx(math.exp(sum(inside)))
    assert answer_probability(result, "99", tokenizer) == pytest.approx(math.exp(sum(logprobs)))
    assert answer_probability(GenerationResult(text, 3, 4, "stop", 0.0), "14", tokenizer) is None


def test_duet_serve_streams_the_thinking_until_m_settles_then_its_answer(pair):
    import openai
    from test_serve import read_stream, start_server

    from duetlm.serve import ServeConfig

    duet = Duet(*pair, config(agree=2))
    expected = duet.solve(LONG, "settle")
    server, thread, url = start_server(duet, ServeConfig(stream_interval_ms=0))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        chunks = client.chat.completions.create(
            model="duet",
            messages=[{"role": "user", "content": LONG}],
            stream=True,
            extra_body={"duet": {"mode": "settle"}},
        )
        streamed = read_stream(chunks)
        kinds, reasoning, content = streamed["kinds"], streamed["reasoning"], streamed["content"]
        assert reasoning.strip() == expected.signal == "\n".join(SCRIPTS[LONG][0][:3])
        assert content == expected.text and kinds[0] == "reasoning"
        assert "reasoning" not in kinds[kinds.index("content") :]
        whole = client.chat.completions.create(
            model="duet",
            messages=[{"role": "user", "content": LONG}],
            extra_body={"duet": {"mode": "settle"}},
        )
        assert whole.choices[0].message.content == expected.text
        assert whole.model_extra["duet"]["handover"]["probe_answers"] == ["7", "14", "14"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
