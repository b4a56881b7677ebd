"""`duet serve` with M on vLLM's async engine (`--capable vllm:...`), through the openai client
on loopback; vLLM's CPU build and the Qwen3 test bed. Skipped without vLLM (see test_vllm.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_serve import read_stream, start_server

from conftest import QUESTIONS, SIGNAL
from duetlm.backends import BackendOptions, load_backend
from duetlm.backends.hf import HFBackend
from duetlm.config import DuetConfig
from duetlm.protocol import Duet
from duetlm.serve import ServeConfig

pytest.importorskip("vllm", reason="vLLM is not installed here: scripts/install-vllm-cpu.sh VENV --tests")
pytestmark = pytest.mark.slow

BUDGET = {"signal_max_tokens": 48, "answer_max_tokens": 16}


@pytest.fixture(scope="module")
def served(qwen3_vllm_dirs):
    """M: the scripted Qwen3 on vLLM's async engine, loaded as `duet serve` loads it; m: the
    scripted light model on hf. (Greedy on random weights is no test of equality: a repetition
    loop of near-tied logits turns on numerics that batch composition and the prefix cache
    change.)"""
    capable = load_backend(f"vllm:{qwen3_vllm_dirs['capable']}", BackendOptions(streaming=True))
    light = HFBackend(str(qwen3_vllm_dirs["light"]), device="cpu")
    duet = Duet(capable, light, DuetConfig(**BUDGET))
    server, thread, url = start_server(duet, ServeConfig(stream_interval_ms=0))
    yield duet, url
    server.should_exit = True
    thread.join(timeout=30)
    capable.close()


def stream(url: str, question: str) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    chunks = client.chat.completions.create(
        model="duet",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    return read_stream(chunks)


def test_sixteen_concurrent_streams_each_equal_duet_solve(served):
    duet, url = served
    questions = [*QUESTIONS, *(f"What is {i} plus {i + 3}?" for i in range(13))]
    with ThreadPoolExecutor(16) as pool:
        streams = list(pool.map(lambda q: stream(url, q), questions))
    for question, got in zip(questions, streams, strict=True):
        direct = duet.solve(question)
        assert got["reasoning"].strip() == direct.signal.strip() != ""
        assert got["content"] == direct.text != ""
        assert got["usage"]["capable"]["output_tokens"] == direct.usage.capable.output_tokens
        assert got["usage"]["light"]["output_tokens"] == direct.usage.light.output_tokens
        if question in QUESTIONS:  # what the scripted pair was taught
            assert (direct.signal, direct.text) == (SIGNAL, "So \\boxed{14}")
        kinds = got["kinds"]
        assert kinds[0] == "reasoning" and "reasoning" not in kinds[kinds.index("content") :]
    alone = stream(url, QUESTIONS[0])  # with no other stream to wait for: step by step, not one block
    assert alone["kinds"].count("reasoning") >= 3 and alone["reasoning"].strip() == SIGNAL


def leave_after_the_first_reasoning_chunk(url: str, engine, seed: int) -> tuple[list[str], int]:
    """The lines read until M's first reasoning chunk, and M's running requests when the client
    leaves there."""
    body = {
        "model": "duet",
        "stream": True,
        "temperature": 2.0,  # M rambles through the vocabulary instead of following its script
        "seed": seed,  # (samples of 900 tokens)
        "messages": [{"role": "user", "content": "go on"}],
        "duet": {"signal_max_tokens": 900},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        seen = []
        for line in response.iter_lines():
            seen.append(line)
            if "reasoning_content" in line:
                break
        return seen, engine.running_requests


def test_a_client_that_leaves_aborts_its_vllm_request(served):
    duet, url = served
    engine = duet.capable
    # The abort can only be seen while M is generating. On a machine busy with other work the
    # engine process may write all 900 tokens before this process serves the first chunk; that
    # attempt shows nothing either way, and the next seed tries again.
    for seed in (1, 2, 3):
        seen, running = leave_after_the_first_reasoning_chunk(url, engine, seed)
        if running == 1:
            break
    else:
        pytest.fail(f"M was never still generating at the first chunk (three seeds): {seen[-1:]}")
    deadline = time.time() + 10  # the client left after the first reasoning chunk
    while engine.running_requests and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running_requests == 0
    metrics = httpx.get(f"{url}/metrics").text
    [disconnects] = [
        line for line in metrics.splitlines() if line.startswith("duet_client_disconnects_total")
    ]
    assert float(disconnects.split()[-1]) >= 1


def test_a_client_that_leaves_mid_probe_leaves_both_models_idle(served, qwen3_vllm_dirs):
    # settle with M on vLLM's async engine: M is paused while m probes; leaving then cancels the
    # probe on m, and M holds no request in vLLM
    import asyncio

    from duetlm.config import SettleConfig
    from duetlm.streaming import Probing

    duet, _ = served
    # the untrained model never ends its answer: the probe runs long enough to leave during it
    light = HFBackend(str(qwen3_vllm_dirs["random"]), device="cpu")
    config = DuetConfig(
        **BUDGET, temperature=0.0, settle=SettleConfig(probe_every=3, agree=50, probe_max_tokens=400)
    )
    watcher = Duet(duet.capable, light, config)

    async def leave():
        events = watcher.astream(QUESTIONS[0], "settle")
        async for event in events:
            if isinstance(event, Probing):
                break
        pending = asyncio.ensure_future(events.__anext__())  # the probe, on m
        for _ in range(1000):
            if light.engine.rows:
                break
            await asyncio.sleep(0.005)
        assert light.engine.rows, "the probe never reached m's engine"
        assert duet.capable.running_requests == 0  # M waits, holding nothing in vLLM
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await events.aclose()

    asyncio.run(leave())
    deadline = time.time() + 10
    while (light.engine.rows or duet.capable.running_requests) and time.time() < deadline:
        time.sleep(0.05)
    assert light.engine.rows == [] and duet.capable.running_requests == 0
