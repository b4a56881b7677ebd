"""Streaming generation: the continuous-batching engine of the hf backend and `Duet.astream`."""

from __future__ import annotations

import asyncio

import pytest

from conftest import CAPABLE_SCRIPT, QUESTIONS, SIGNAL
from duetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.protocol import Duet, Problem, capable_request, user_prompt
from duetlm.streaming import AnswerDelta, Finished, SignalDelta, ThinkingSplitter


def ask(question: str, sampling: SamplingParams, prefill: str = "") -> GenerationRequest:
    return GenerationRequest.chat(
        user_prompt(Problem(question), DuetConfig()),
        sampling,
        prefill=prefill,
        chat_template_kwargs={"enable_thinking": True},
    )


async def collect(backend, request, delay: float = 0.0, cancel_after: int | None = None):
    await asyncio.sleep(delay)
    deltas, result = [], None
    stream = backend.astream(request)
    async for item in stream:
        if isinstance(item, GenerationResult):
            result = item
        else:
            deltas.append(item)
            if cancel_after is not None and len(deltas) >= cancel_after:
                await stream.aclose()
                break
    return deltas, result


def run(*coroutines):
    async def main():
        return await asyncio.gather(*coroutines)

    return asyncio.run(main())


def test_joining_and_leaving_rows_give_what_generate_gives(random_backend, capable_backend):
    # Requests arrive while others are decoding; rows end at different steps (EOS, stop string,
    # budget). Greedy tokens, texts, counts and finish reasons equal one batched generate().
    requests = [ask(f"q{i} " * (1 + i % 4), SamplingParams(12 + 3 * i)) for i in range(6)]
    requests += [ask(q, SamplingParams(80, stop=("</think>",))) for q in QUESTIONS]
    requests += [ask(QUESTIONS[0], SamplingParams(120))]
    for backend, batch in ((random_backend, requests[:6]), (capable_backend, requests[6:])):
        assert backend.engine.fast_step is not None  # the engine's own decode step, not the forward
        expected = backend.generate(batch)
        streamed = run(*(collect(backend, r, delay=0.02 * i) for i, r in enumerate(batch)))
        for (deltas, result), reference in zip(streamed, expected, strict=True):
            assert "".join(deltas) == result.text == reference.text
            assert result.token_ids == reference.token_ids
            assert (result.prompt_tokens, result.output_tokens) == (
                reference.prompt_tokens,
                reference.output_tokens,
            )
            assert result.finish_reason == reference.finish_reason
    # the stop string is never handed out, not even in part
    [(deltas, result)] = run(
        collect(capable_backend, ask(QUESTIONS[0], SamplingParams(80, stop=("</think>",))))
    )
    assert "".join(deltas) == f"<think>\n{SIGNAL}\n" and result.stop_string == "</think>"
    [(deltas, result)] = run(collect(capable_backend, ask(QUESTIONS[0], SamplingParams(120))))
    assert "".join(deltas) == CAPABLE_SCRIPT.removesuffix("<|im_end|>") and result.finish_reason == "eos"


def test_seeded_sampling_repeats_whatever_shares_the_batch(random_backend):
    seeded = ask("a question", SamplingParams(16, temperature=1.5, seed=7))
    alone = run(collect(random_backend, seeded))[0][1].token_ids
    crowd = run(
        *[collect(random_backend, seeded)]
        + [collect(random_backend, ask(f"other {i}", seeded.sampling)) for i in range(3)]
    )
    assert crowd[0][1].token_ids == alone
    unseeded = ask("a question", SamplingParams(16, temperature=1.5))
    first, second = run(collect(random_backend, unseeded), collect(random_backend, unseeded))
    assert first[1].token_ids != second[1].token_ids


def test_closing_the_stream_cancels_the_row(random_backend):
    request = ask("long", SamplingParams(200))
    [(deltas, result)] = run(collect(random_backend, request, cancel_after=2))
    assert len(deltas) == 2 and result is None
    engine = random_backend.engine
    for _ in range(100):  # the engine drops the row at its next step
        if not engine.rows:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert engine.rows == []


def test_a_prompt_longer_than_the_context_ends_at_once(tokenizer):
    from duetlm.models.pretrain import ModelShape, new_model

    model = new_model(tokenizer, ModelShape(32, 1, intermediate=64), max_positions=40).eval()
    backend = HFBackend(model=model, tokenizer=tokenizer, spec="hf:tiny-40")
    [(deltas, result)] = run(collect(backend, ask("too long " * 20, SamplingParams(8))))
    assert deltas == [] and result.extra["error"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("chunks", "untagged", "thinking", "answer"),
    [
        (["<think>\nab", "c\n</thi", "nk>\n\nThe an", "swer"], "wait", "abc", "The answer"),
        (["<think>\na \n", "\nb\n", "\n", "</think>x"], "wait", "a \n\nb", "x"),
        (["<th", "ink>", "x</think>", "y"], "wait", "x", "y"),
        (["no tags ", "at all"], "wait", "", "no tags at all"),
        (["opened in ", "the prompt</think>", "ok"], "wait", "opened in the prompt", "ok"),
        (["<think>\ncut by the budget"], "wait", "cut by the budget", ""),
        (["\n\n<think>", "\n\n", "a", "</think>", "\n", "\n", "b"], "wait", "a", "b"),
        (["a signal without ", "the opening tag"], "thinking", "a signal without the opening tag", ""),
        (["an answer"], "answer", "", "an answer"),
    ],
)
def test_thinking_splitter_at_any_chunk_boundary(chunks, untagged, thinking, answer):
    split = ThinkingSplitter("<think>", "</think>", untagged)
    events = [e for chunk in chunks for e in split.feed(chunk)] + split.close()
    assert "".join(e.text for e in events if isinstance(e, SignalDelta)) == thinking
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == answer


class GenerateOnly:
    """A backend with only `generate`, as a user-written one may be."""

    def __init__(self, backend) -> None:
        self.backend, self.spec = backend, backend.spec

    def generate(self, requests):
        return self.backend.generate(requests)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["duet", "M-alone", "m-alone", "duet@6", "M@6"])
@pytest.mark.parametrize("streaming", [True, False], ids=["astream", "generate-only"])
def test_astream_gives_what_solve_gives(capable_backend, light_backend, mode, streaming):
    capable = capable_backend if streaming else GenerateOnly(capable_backend)
    light = light_backend if streaming else GenerateOnly(light_backend)
    duet = Duet(capable, light, DuetConfig(signal_max_tokens=80, answer_max_tokens=40))

    async def events():
        return [e async for e in duet.astream(QUESTIONS[1], mode)]

    stream = asyncio.run(events())
    expected = duet.solve(QUESTIONS[1], mode)
    assert isinstance(stream[-1], Finished) and not any(isinstance(e, Finished) for e in stream[:-1])
    result = stream[-1].result
    assert (result.text, result.answer, result.signal) == (expected.text, expected.answer, expected.signal)
    assert result.usage.capable.output_tokens == expected.usage.capable.output_tokens
    assert result.usage.light.output_tokens == expected.usage.light.output_tokens
    answer = "".join(e.text for e in stream if isinstance(e, AnswerDelta))
    assert answer == expected.text.strip()
    signal = "".join(e.text for e in stream if isinstance(e, SignalDelta))
    assert signal == (expected.signal or "")  # as the whole one reads: no trailing newline
    if mode == "duet":  # the signal arrives before the answer
        kinds = [type(e).__name__ for e in stream]
        assert kinds.index("AnswerDelta") > kinds.index("SignalDelta")


def test_astream_on_the_qwen3_template(qwen3_dirs):
    capable = HFBackend(str(qwen3_dirs["capable"]), device="cpu")
    light = HFBackend(str(qwen3_dirs["light"]), device="cpu")
    duet = Duet(capable, light, DuetConfig(signal_max_tokens=60, answer_max_tokens=20))

    async def events():
        return [e async for e in duet.astream(QUESTIONS[0])]

    stream = asyncio.run(events())
    assert "".join(e.text for e in stream if isinstance(e, SignalDelta)).strip() == SIGNAL
    assert stream[-1].result.answer == "14"
    assert not any("<|im_end|>" in getattr(e, "text", "") for e in stream)


def test_capable_request_keeps_the_conversation():
    problem = Problem("And times 2?", history=(("system", "Be brief."), ("user", "3+4?"), ("assistant", "7")))
    request = capable_request(problem, DuetConfig(), 10)
    assert [role for role, _ in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[-1][1].startswith("And times 2?")


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(random_backend):
    from duetlm.errors import BackendError

    engine = random_backend.engine
    forward = engine.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: out of memory")
        return forward(*args, **kwargs)

    engine.model.forward = flaky
    try:
        with pytest.raises(BackendError, match=r"generation failed .*injected"):
            run(collect(random_backend, ask("first", SamplingParams(8))))
        [(_deltas, result)] = run(collect(random_backend, ask("second", SamplingParams(8))))
        assert result.output_tokens == 8
    finally:
        engine.model.forward = forward


def test_a_request_moves_on_without_waiting_for_the_others(random_backend, light_backend):
    # A long request starts (a random M writing 200 tokens, greedy); a short one (M cut after
    # 3 tokens) joins while M writes, and gets its whole answer from m before the long
    # request's signal ends (its m stage, which begins only then, has not begun): a request
    # joins a batch in flight, and moves on to m without waiting for the slowest signal.
    # (Joining at once keeps the test about order, not timing.)
    duet = Duet(random_backend, light_backend, DuetConfig(signal_max_tokens=200, answer_max_tokens=20))
    engines = (random_backend.engine, light_backend.engine)
    waits = [e.admit_wait_s for e in engines]
    for engine in engines:
        engine.admit_wait_s = 0.0

    async def main():
        timeline, results = [], {}

        async def follow(name: str, mode: str) -> None:
            if name == "short":
                while not random_backend.engine.rows:  # the long request is being decoded
                    await asyncio.sleep(0.001)
            async for event in duet.astream(QUESTIONS[0], mode):
                timeline.append((name, type(event).__name__))
                if isinstance(event, Finished):
                    results[name] = event.result

        await asyncio.gather(follow("long", "duet"), follow("short", "duet@3"))
        return timeline, results

    try:
        timeline, results = run(main())[0]
    finally:
        for engine, wait in zip(engines, waits):
            engine.admit_wait_s = wait
    assert results["long"].usage.capable.output_tokens == 200
    assert results["short"].usage.capable.output_tokens == 3
    assert timeline.index(("short", "Finished")) < timeline.index(("long", "AnswerDelta"))


def test_a_prefill_computes_the_last_position_logits_only(qwen3_dirs):
    # Over Qwen3's 152k vocabulary, logits for every prompt position would cost gigabytes
    # (32 prompts of 110 tokens: 2.6 GB peak RSS against 0.7 GB, bench/engine_prefill.py).
    backend = HFBackend(str(qwen3_dirs["capable"]), device="cpu")
    widths = []
    hook = backend.model.lm_head.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    try:
        run(*(collect(backend, ask(f"{q} {q}", SamplingParams(3))) for q in QUESTIONS))
    finally:
        hook.remove()
    assert widths and set(widths) == {1}


def test_the_engine_thread_ends_when_idle_and_comes_back_with_work(random_backend):
    # A live engine thread that has run torch's parallel kernels slows every other thread's
    # (each keeps its own OpenMP team), so an idle engine lets its thread go.
    import threading
    import time

    engine = random_backend.engine
    idle_exit = engine.loop.idle_exit_s
    engine.loop.idle_exit_s = 0.1
    try:
        [(_, first)] = run(collect(random_backend, ask("first", SamplingParams(6))))
        for _ in range(100):
            if not engine.loop.running:
                break
            time.sleep(0.02)
        assert not engine.loop.running
        assert "duetlm-engine" not in [t.name for t in threading.enumerate()]
        [(_, second)] = run(collect(random_backend, ask("second", SamplingParams(6))))
        assert first.output_tokens == second.output_tokens == 6
    finally:
        engine.loop.idle_exit_s = idle_exit
