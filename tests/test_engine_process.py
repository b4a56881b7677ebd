"""The streaming engine in a process of its own (`duet serve --engine process`): the same
tokens as in-process generation, the weights loaded only in the engine process, cancelling,
and an engine process that fails to start or dies while requests are in flight."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time

import pytest
from test_streaming import ask, collect, run

from conftest import CAPABLE_SCRIPT, QUESTIONS, SIGNAL
from duetlm.backends import BackendOptions, load_backend
from duetlm.backends.base import GenerationResult, SamplingParams
from duetlm.backends.hf import HFBackend
from duetlm.backends.hf.process import EngineProcess, EngineSpec
from duetlm.config import DuetConfig
from duetlm.errors import BackendError
from duetlm.protocol import Duet
from duetlm.streaming import SignalDelta


@pytest.fixture(scope="module")
def process_capable(model_dirs):
    backend = HFBackend(str(model_dirs["capable"]), device="cpu", engine="process")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def process_random(model_dirs):
    backend = HFBackend(str(model_dirs["random"]), device="cpu", engine="process", engine_threads=2)
    yield backend
    backend.close()


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def test_the_engine_process_gives_what_generate_gives(process_random, process_capable, model_dirs):
    # Requests join while others decode and end at different steps (EOS, stop string,
    # budget); greedy tokens, texts, counts and finish reasons equal a batched generate()
    # of the same model loaded in this process.
    requests = [ask(f"q{i} " * (1 + i % 4), SamplingParams(12 + 3 * i)) for i in range(6)]
    requests += [ask(q, SamplingParams(80, stop=("</think>",))) for q in QUESTIONS]
    for backend, batch, folder in (
        (process_random, requests[:6], "random"),
        (process_capable, requests[6:], "capable"),
    ):
        expected = HFBackend(str(model_dirs[folder]), device="cpu").generate(batch)
        streamed = run(*(collect(backend, r, delay=0.02 * i) for i, r in enumerate(batch)))
        for (deltas, result), reference in zip(streamed, expected, strict=True):
            assert "".join(deltas) == result.text == reference.text
            assert result.token_ids == reference.token_ids
            assert (result.prompt_tokens, result.output_tokens, result.finish_reason) == (
                reference.prompt_tokens,
                reference.output_tokens,
                reference.finish_reason,
            )
    [(deltas, result)] = run(collect(process_capable, ask(QUESTIONS[0], SamplingParams(120))))
    assert "".join(deltas) == CAPABLE_SCRIPT.removesuffix("<|im_end|>") and result.finish_reason == "eos"
    assert process_random.engine.threads == 2  # torch threads of the engine process, as asked


def test_the_weights_stay_in_the_engine_process(model_dirs):
    backend = HFBackend(str(model_dirs["capable"]), device="cpu", engine="process")
    try:
        assert backend._model is None  # tokenizer and configs only
        [(_, streamed)] = run(collect(backend, ask(QUESTIONS[1], SamplingParams(80, stop=("</think>",)))))
        assert backend._model is None and streamed.text == f"<think>\n{SIGNAL}\n"
        assert backend.engine.pid != os.getpid()
        # generate() needs the weights here: they load then, and give the same text
        [generated] = backend.generate([ask(QUESTIONS[1], SamplingParams(80, stop=("</think>",)))])
        assert backend._model is not None and generated.token_ids == streamed.token_ids
    finally:
        backend.close()


def test_seeded_sampling_repeats_across_processes(process_random, model_dirs):
    seeded = ask("a question", SamplingParams(16, temperature=1.5, seed=7))
    [(_, in_process)] = run(collect(HFBackend(str(model_dirs["random"]), device="cpu"), seeded))
    crowd = run(
        *[collect(process_random, seeded)]
        + [collect(process_random, ask(f"other {i}", seeded.sampling)) for i in range(3)]
    )
    assert crowd[0][1].token_ids == in_process.token_ids
    unseeded = ask("a question", SamplingParams(16, temperature=1.5))
    first, second = run(collect(process_random, unseeded), collect(process_random, unseeded))
    assert first[1].token_ids != second[1].token_ids


def test_a_request_cancelled_before_its_prefill_still_ends(process_random):
    # the process is held still, so the request is submitted and cancelled before the engine
    # admits it: it must still come back (cancelled), or the caller counts it in flight forever
    engine = process_random.engine
    results: list = []
    prompt = process_random.prompt_ids(ask("long", SamplingParams(400)))
    os.kill(engine.pid, signal.SIGSTOP)
    try:
        handle = engine.submit(
            prompt, SamplingParams(400), lambda e: isinstance(e, GenerationResult) and results.append(e)
        )
        handle.cancel()
        assert engine.in_flight == 1
    finally:
        os.kill(engine.pid, signal.SIGCONT)
    assert wait_until(lambda: engine.in_flight == 0)
    assert [r.finish_reason for r in results] == ["cancelled"] and results[0].output_tokens == 0


def test_a_cancelled_request_leaves_the_engine_process(process_random):
    events: list = []
    done = threading.Event()

    def listener(event) -> None:
        events.append(event)
        if isinstance(event, GenerationResult):
            done.set()

    engine = process_random.engine
    prompt = process_random.prompt_ids(ask("long", SamplingParams(400)))
    handle = engine.submit(prompt, SamplingParams(400), listener)
    assert wait_until(lambda: len(events) >= 2)  # deltas are coming
    handle.cancel()
    assert done.wait(10)
    assert events[-1].finish_reason == "cancelled" and events[-1].output_tokens < 400
    assert engine.in_flight == 0
    # and closing a stream cancels its request the same way
    [(deltas, result)] = run(collect(process_random, ask("long", SamplingParams(400)), cancel_after=2))
    assert len(deltas) == 2 and result is None
    assert wait_until(lambda: engine.in_flight == 0)


def test_an_engine_process_that_dies_fails_its_requests(model_dirs):
    backend = HFBackend(str(model_dirs["random"]), device="cpu", engine="process")
    try:
        pid = backend.engine.pid

        async def killed_midway():
            stream = backend.astream(ask("long", SamplingParams(2000)))
            async for _ in stream:
                os.kill(pid, signal.SIGKILL)  # as the OOM killer would
                break
            async for _ in stream:
                pass

        started = time.perf_counter()
        with pytest.raises(BackendError, match="engine process died"):
            asyncio.run(killed_midway())
        assert time.perf_counter() - started < 10  # failed, not left waiting
        with pytest.raises(BackendError, match="engine process"):  # and later requests too, at once
            run(collect(backend, ask("again", SamplingParams(4))))
    finally:
        backend.close()


def test_an_engine_process_that_cannot_load_says_why(model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["random"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    backend = HFBackend(str(broken), device="cpu", engine="process")  # tokenizer and config load here
    with pytest.raises(BackendError, match=r"could not start: .*could not load model"):
        backend.start_engine()
    with pytest.raises(BackendError, match="could not start"):
        EngineProcess(EngineSpec(location=str(tmp_path / "nowhere"), spec="hf:nowhere"))
    (broken / "generation_config.json").write_text("{not json")
    with pytest.raises(BackendError, match="could not load model"):
        HFBackend(str(broken), device="cpu", engine="process")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"engine": "fork"}, "unknown engine 'fork'"),
        ({"engine": "process", "engine_threads": 0}, "engine_threads must be >= 1"),
    ],
)
def test_bad_engine_options_are_refused_before_loading(options, message):
    with pytest.raises(BackendError, match=message):
        load_backend("tiny-m", BackendOptions(device="cpu", **options))


def test_a_model_in_memory_cannot_move_to_a_process(capable_backend):
    with pytest.raises(BackendError, match="cannot wrap one in memory"):
        HFBackend(model=capable_backend.model, tokenizer=capable_backend.tokenizer, engine="process")


def test_duet_streams_through_engine_processes_on_the_qwen3_template(qwen3_dirs):
    capable = HFBackend(str(qwen3_dirs["capable"]), device="cpu", engine="process")
    light = HFBackend(str(qwen3_dirs["light"]), device="cpu", engine="process")
    try:
        duet = Duet(capable, light, DuetConfig(signal_max_tokens=60, answer_max_tokens=20))

        async def events():
            return [e async for e in duet.astream(QUESTIONS[0])]

        stream = asyncio.run(events())
        assert "".join(e.text for e in stream if isinstance(e, SignalDelta)).strip() == SIGNAL
        result = stream[-1].result
        assert result.answer == "14" and result.usage.capable.output_tokens > 0
        assert capable._model is None and light._model is None
        # what the server process read without the weights is what a full load reads
        loaded = HFBackend(str(qwen3_dirs["capable"]), device="cpu")
        assert capable.eos_token_ids == loaded.eos_token_ids and len(capable.eos_token_ids) == 2
        assert capable.context_length == loaded.context_length
    finally:
        capable.close()
        light.close()


def test_a_folder_without_a_generation_config_reads_as_a_full_load_does(model_dirs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model_dirs["capable"], bare)
    (bare / "generation_config.json").unlink()
    light, full = HFBackend(str(bare), device="cpu", engine="process"), HFBackend(str(bare), device="cpu")
    assert light.eos_token_ids == full.eos_token_ids and light.context_length == full.context_length
