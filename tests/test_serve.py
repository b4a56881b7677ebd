"""`duet serve` through the official openai client on loopback, with tiny real models."""

from __future__ import annotations

import json
import os
import signal as signals
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from conftest import QUESTIONS, SIGNAL, free_port
from duetlm.config import DuetConfig
from duetlm.errors import BackendError
from duetlm.protocol import Duet
from duetlm.serve import ServeConfig, create_app

KEY = "test-key"


def start_server(duet: Duet, config: ServeConfig):
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(duet, config), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def read_stream(chunks) -> dict:
    """A streamed chat completion read back: the reasoning and the content, the kind of each
    chunk in order (what a client that shows them apart sees), and duet's usage if sent."""
    kinds, reasoning, content, usage = [], "", "", None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.model_extra["duet"]
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if (delta.model_extra or {}).get("reasoning_content"):
            reasoning += delta.model_extra["reasoning_content"]
            kinds.append("reasoning")
        if delta.content:
            content += delta.content
            kinds.append("content")
    return {"kinds": kinds, "reasoning": reasoning, "content": content, "usage": usage}


@pytest.fixture(scope="module")
def scripted_server(capable_backend, light_backend):
    duet = Duet(capable_backend, light_backend, DuetConfig(signal_max_tokens=80, answer_max_tokens=40))
    # every delta its own chunk, so the tests below can see the stream token by token
    config = ServeConfig(api_key=KEY, max_body_bytes=4096, stream_interval_ms=0)
    server, thread, url = start_server(duet, config)
    yield duet, url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(scripted_server):
    return openai.OpenAI(base_url=f"{scripted_server[1]}/v1", api_key=KEY, max_retries=0)


def test_chat_completion_with_usage_breakdown(scripted_server, client):
    duet, _ = scripted_server
    response = client.chat.completions.create(
        model="duet", messages=[{"role": "user", "content": QUESTIONS[0]}]
    )
    direct = duet.solve(QUESTIONS[0])
    assert response.choices[0].message.content == direct.text == "So \\boxed{14}"
    assert response.choices[0].finish_reason == "stop"
    breakdown = response.usage.model_extra["duet"]
    assert breakdown["capable"] == {
        "prompt_tokens": direct.usage.capable.prompt_tokens,
        "output_tokens": direct.usage.capable.output_tokens,
    }
    assert breakdown["light"] == {
        "prompt_tokens": direct.usage.light.prompt_tokens,
        "output_tokens": direct.usage.light.output_tokens,
    }
    assert breakdown["signal_tokens"] == direct.signal_tokens
    assert (
        response.usage.completion_tokens
        == direct.usage.capable.output_tokens + direct.usage.light.output_tokens
    )
    assert (
        response.usage.prompt_tokens == direct.usage.capable.prompt_tokens + direct.usage.light.prompt_tokens
    )
    assert response.model_extra["duet"]["signal"] == SIGNAL  # returned by default, as reasoning servers do
    hidden = client.chat.completions.create(
        model="duet",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        extra_body={"duet": {"return_signal": False}},
    )
    assert "signal" not in hidden.model_extra["duet"]
    assert "reasoning_content" not in (hidden.choices[0].message.model_extra or {})


def test_signal_mode_and_budget_per_request(client):
    response = client.chat.completions.create(
        model="duet",
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        extra_body={"duet": {"return_signal": True, "mode": "duet"}},
    )
    assert response.model_extra["duet"]["signal"] == SIGNAL
    assert response.choices[0].message.model_extra["reasoning_content"] == SIGNAL
    cut = client.chat.completions.create(
        model="duet",
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        extra_body={"duet": {"return_signal": True, "signal_max_tokens": 5}},
    )
    assert cut.usage.model_extra["duet"]["capable"]["output_tokens"] == 5
    assert cut.model_extra["duet"]["truncated"] is True
    alone = client.chat.completions.create(
        model="duet",
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        extra_body={"duet": {"mode": "M-alone"}},
    )
    assert alone.usage.model_extra["duet"]["light"]["output_tokens"] == 0
    assert "\\boxed{14}" in alone.choices[0].message.content


def timed_chunks(client, **kwargs) -> list[tuple[float, object]]:
    started = time.perf_counter()
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    return [(time.perf_counter() - started, chunk) for chunk in stream]


def test_streaming_streams(client):
    chunks = timed_chunks(client, model="duet", messages=[{"role": "user", "content": QUESTIONS[2]}])
    reasoning = [
        (t, c)
        for t, c in chunks
        if c.choices and (c.choices[0].delta.model_extra or {}).get("reasoning_content")
    ]
    answer = [(t, c) for t, c in chunks if c.choices and c.choices[0].delta.content]
    assert (
        "".join(c.choices[0].delta.model_extra["reasoning_content"] for _, c in reasoning).strip() == SIGNAL
    )
    assert "".join(c.choices[0].delta.content for _, c in answer) == "So \\boxed{14}"
    assert len(reasoning) >= 5 and len(answer) >= 3  # token by token, not one block
    assert reasoning[-1][0] <= answer[0][0]  # the whole signal before the answer's first chunk
    assert answer[0][0] < chunks[-1][0]  # the answer's chunks before the response ends
    assert [c.choices[0].finish_reason for _, c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1][1].usage
    assert usage is not None and usage.model_extra["duet"]["light"]["output_tokens"] > 0


def test_fast_deltas_are_joined_into_fewer_chunks(capable_backend, light_backend):
    # With a 10 s interval, each kind's first delta goes out at once and the rest wait for
    # the next kind (or the end): two chunks each, the same texts.
    duet = Duet(capable_backend, light_backend, DuetConfig(signal_max_tokens=80, answer_max_tokens=40))
    server, thread, url = start_server(duet, ServeConfig(stream_interval_ms=10_000))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        chunks = [
            c
            for _, c in timed_chunks(
                client, model="duet", messages=[{"role": "user", "content": QUESTIONS[2]}]
            )
        ]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [
        d.model_extra["reasoning_content"] for d in deltas if (d.model_extra or {}).get("reasoning_content")
    ]
    answer = [d.content for d in deltas if d.content]
    assert "".join(reasoning).strip() == SIGNAL and len(reasoning) == 2
    assert "".join(answer) == "So \\boxed{14}" and len(answer) == 2


def test_models_health_metrics(scripted_server, client):
    assert [m.id for m in client.models.list()] == ["duet"]
    url = scripted_server[1]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'duet_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert 'duet_tokens_total{model="capable",kind="output"}' in metrics
    assert "duet_request_latency_seconds_bucket" in metrics


def _latency_sum_and_count(url: str) -> tuple[float, int]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    values = dict(line.split() for line in lines if line.startswith("duet_request_latency_seconds_"))
    return float(values["duet_request_latency_seconds_sum"]), int(
        values["duet_request_latency_seconds_count"]
    )


def test_a_streams_latency_is_counted_to_its_last_byte(scripted_server, client):
    # The server is inside the request from before the first chunk until after the last one;
    # a middleware that stops the clock at the headers records a few milliseconds. The client
    # reads the last chunk a little after the server let go of it, so on a loaded machine the
    # two spans differ by that delivery time: the check asks for most of the span, not all.
    url = scripted_server[1]
    total_before, count_before = _latency_sum_and_count(url)
    arrivals = []
    for _chunk in client.chat.completions.create(
        model="duet", messages=[{"role": "user", "content": QUESTIONS[0]}], stream=True
    ):
        arrivals.append(time.perf_counter())
    total, count = _latency_sum_and_count(url)
    assert count == count_before + 1
    assert len(arrivals) > 10 and total - total_before >= 0.5 * (arrivals[-1] - arrivals[0]) > 0


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        ("{not json", 400, "not valid JSON"),
        (json.dumps({"model": "duet"}), 400, "messages"),
        (json.dumps({"model": "duet", "messages": []}), 400, "messages"),
        (json.dumps({"model": "duet", "messages": [{"role": "user", "content": 5}]}), 400, "content"),
        (
            json.dumps({"model": "duet", "messages": [{"role": "user", "content": "q"}], "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": "duet", "messages": [{"role": "user", "content": "q"}], "temperature": 9}),
            400,
            "temperature",
        ),
        (
            json.dumps(
                {"model": "duet", "messages": [{"role": "user", "content": "q"}], "duet": {"mode": "fast"}}
            ),
            400,
            "unknown mode",
        ),
        (
            json.dumps({"model": "duet", "messages": [{"role": "system", "content": "only system"}]}),
            400,
            "user",
        ),
        (
            json.dumps({"model": "gpt-5", "messages": [{"role": "user", "content": "q"}]}),
            404,
            "does not exist",
        ),
        (json.dumps({"model": "duet", "messages": [{"role": "user", "content": "x" * 5000}]}), 413, "over"),
    ],
)
def test_bad_requests_get_openai_errors(scripted_server, content, status, fragment):
    response = httpx.post(
        f"{scripted_server[1]}/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == status
    assert fragment in _error(response)["message"]


def test_wrong_or_missing_key(scripted_server):
    url = f"{scripted_server[1]}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(
            model="duet", messages=[{"role": "user", "content": "q"}]
        )
    response = httpx.get(f"{url}/models")
    assert response.status_code == 401 and _error(response)["code"] == "invalid_api_key"


@pytest.mark.parametrize("scheduler", ["continuous", "batch"])
def test_concurrent_requests_share_batches_and_stay_independent(random_backend, scheduler):
    duet = Duet(random_backend, random_backend, DuetConfig(signal_max_tokens=12, answer_max_tokens=8))
    questions = [f"question number {i} " + "x" * (i % 7) for i in range(32)]
    expected = [duet.solve(q).text for q in questions]
    widest = []
    engine = random_backend.engine
    step = engine.step
    engine.step = lambda: (widest.append(len(engine.rows)), step())[1]
    server, thread, url = start_server(duet, ServeConfig(scheduler=scheduler, batch_window_ms=50))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def ask(q):
            return client.chat.completions.create(model="duet", messages=[{"role": "user", "content": q}])

        with ThreadPoolExecutor(32) as pool:
            answers = [r.choices[0].message.content for r in pool.map(ask, questions)]
        assert answers == expected
        if scheduler == "batch":
            metrics = httpx.get(f"{url}/metrics").text
            batches = int(
                next(
                    line.split()[-1] for line in metrics.splitlines() if line.startswith("duet_batches_total")
                )
            )
            assert batches < 32  # requests shared batches
        else:
            assert max(widest) > 4  # rows of several requests decoded in one step
    finally:
        engine.step = step
        server.should_exit = True
        thread.join(timeout=30)


class FailsOn:
    """Fault injection around a real backend: raises BackendError for one poisoned question."""

    def __init__(self, backend, poison: str):
        self.backend, self.poison, self.spec = backend, poison, backend.spec

    def generate(self, requests):
        if any(self.poison in r.messages[-1][1] for r in requests):
            raise BackendError("injected failure")
        return self.backend.generate(requests)

    def close(self):
        pass


@pytest.mark.parametrize("scheduler", ["continuous", "batch"])
def test_one_failing_request_does_not_fail_its_batch(random_backend, scheduler):
    duet = Duet(
        FailsOn(random_backend, "POISON"),
        random_backend,
        DuetConfig(signal_max_tokens=8, answer_max_tokens=4),
    )
    server, thread, url = start_server(duet, ServeConfig(scheduler=scheduler, batch_window_ms=100))
    try:

        def ask(q):
            return httpx.post(
                f"{url}/v1/chat/completions",
                timeout=60,
                json={"model": "duet", "messages": [{"role": "user", "content": q}]},
            )

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(ask, ["a", "b", "POISON", "c", "d", "e"]))
        assert [r.status_code for r in responses] == [200, 200, 502, 200, 200, 200]
        assert _error(responses[2])["type"] == "backend_error"
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- compatibility and hardening ------------------------------------------------------------


def post(url: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"} | headers,
        timeout=60,
    )


def test_content_as_a_list_of_text_parts(scripted_server):
    url = scripted_server[1]
    parts = [{"type": "text", "text": QUESTIONS[0]}]
    response = post(url, {"model": "duet", "messages": [{"role": "user", "content": parts}]})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "So \\boxed{14}"
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    refused = post(url, {"model": "duet", "messages": [{"role": "user", "content": image}]})
    assert refused.status_code == 400 and "only text content parts" in _error(refused)["message"]


def test_a_conversation_reaches_both_models(scripted_server):
    url = scripted_server[1]
    single = post(url, {"model": "duet", "messages": [{"role": "user", "content": QUESTIONS[0]}]}).json()
    turns = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": QUESTIONS[0]},
    ]
    chat = post(url, {"model": "duet", "messages": turns})
    assert chat.status_code == 200
    for model in ("capable", "light"):  # M and m both read the earlier turns
        assert (
            chat.json()["usage"]["duet"][model]["prompt_tokens"]
            > single["usage"]["duet"][model]["prompt_tokens"]
        )
    after = post(url, {"model": "duet", "messages": [*turns, {"role": "assistant", "content": "x"}]})
    assert after.status_code == 400 and "last user turn" in _error(after)["message"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            '{"model": "duet", "messages": [{"role": "user", "content": "q"}], "seed": 18446744073709551616}',
            "seed",
        ),
        (
            '{"model": "duet", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}',
            "lone surrogate",
        ),
    ],
    ids=["seed-beyond-64-bits", "lone-surrogate"],
)
def test_values_that_once_gave_500_get_400(scripted_server, body, fragment):
    response = post(scripted_server[1], body)
    assert response.status_code == 400 and fragment in _error(response)["message"]


def test_unknown_routes_and_methods_get_openai_errors(scripted_server):
    url = scripted_server[1]
    missing = httpx.get(f"{url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and "no route" in _error(missing)["message"]
    wrong = httpx.get(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert wrong.status_code == 405 and "GET is not allowed" in _error(wrong)["message"]


def test_a_prompt_beyond_the_context_is_refused_before_any_work(scripted_server):
    url = scripted_server[1]
    engine_rows_before = len(scripted_server[0].capable.engine.rows)
    started = time.perf_counter()
    response = post(url, {"model": "duet", "messages": [{"role": "user", "content": "x " * 1900}]})
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "context_length_exceeded" and "1024" in error["message"]
    assert (
        time.perf_counter() - started < 2
        and len(scripted_server[0].capable.engine.rows) == engine_rows_before
    )


def test_unseeded_samples_differ_and_seeded_ones_repeat(random_backend):
    duet = Duet(random_backend, random_backend, DuetConfig(signal_max_tokens=16, answer_max_tokens=8))
    server, thread, url = start_server(duet, ServeConfig())
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def signal(**extra):
            response = client.chat.completions.create(
                model="duet", messages=[{"role": "user", "content": "hello"}], temperature=1.5, **extra
            )
            return response.model_extra["duet"]["signal"]

        assert signal() != signal()
        assert signal(seed=12) == signal(seed=12)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_client_that_leaves_stops_its_generation(tmp_path):
    from qwen3 import qwen3_tokenizer, save, tiny_qwen3

    from duetlm.backends.hf import HFBackend

    # An untrained Qwen3 over the real ~150k-word vocabulary, wide enough that its 900 tokens
    # take seconds: the client must see M still generating when it leaves, even on a loaded
    # machine where the test's own thread reads the first chunk late.
    folder = save(tiny_qwen3(seed=0, hidden=256, layers=4), qwen3_tokenizer(), tmp_path / "rambler")
    rambler = HFBackend(str(folder), device="cpu")
    duet = Duet(rambler, rambler, DuetConfig(signal_max_tokens=900, answer_max_tokens=8))
    server, thread, url = start_server(duet, ServeConfig())
    engine = rambler.engine
    try:
        body = {
            "model": "duet",
            "stream": True,
            # greedy: the random model repeats its likeliest words and never ends (a sampled
            # run, seeded or not, could draw an end token early on another machine's floats)
            "temperature": 0.0,
            "messages": [{"role": "user", "content": "go"}],
        }
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if "reasoning_content" in line:
                    break
            assert engine.rows  # M is generating
        deadline = time.time() + 5  # the client left after the first reasoning chunk: the row must go
        while engine.rows and time.time() < deadline:
            time.sleep(0.02)
        assert engine.rows == []
        assert "duet_client_disconnects_total 1" in httpx.get(f"{url}/metrics").text
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_server_on_engine_processes(model_dirs, random_backend):
    # duet serve's default layout: each model's engine in a process of its own. Concurrent
    # requests get the answers the library gives in-process, unseeded samples differ and
    # seeded ones repeat, and a client that leaves frees its row in the engine process.
    from duetlm.backends.hf import HFBackend

    config = DuetConfig(signal_max_tokens=12, answer_max_tokens=8)
    capable = HFBackend(str(model_dirs["random"]), device="cpu", engine="process")
    light = HFBackend(str(model_dirs["light"]), device="cpu", engine="process")
    reference_light = HFBackend(str(model_dirs["light"]), device="cpu")
    questions = [f"question number {i} " + "x" * (i % 7) for i in range(16)]
    expected = [Duet(random_backend, reference_light, config).solve(q).text for q in questions]
    duet = Duet(capable, light, config)
    server, thread, url = start_server(duet, ServeConfig())
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def ask(q, **extra):
            return client.chat.completions.create(
                model="duet", messages=[{"role": "user", "content": q}], **extra
            )

        with ThreadPoolExecutor(16) as pool:
            assert [r.choices[0].message.content for r in pool.map(ask, questions)] == expected

        def signal(**extra):
            return ask("hello", temperature=1.5, **extra).model_extra["duet"]["signal"]

        assert signal() != signal()
        assert signal(seed=12) == signal(seed=12)
        body = {
            "model": "duet",
            "stream": True,
            "temperature": 0,  # greedy, the random M never ends: 900 tokens
            "max_tokens": 8,
            "duet": {"signal_max_tokens": 900},
            "messages": [{"role": "user", "content": "go"}],
        }
        engine, reasons = capable.engine, []
        finish = engine._finish
        engine._finish = lambda request_id, result: (
            reasons.append(result.finish_reason),
            finish(request_id, result),
        )
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60):
            assert wait_for(lambda: engine.in_flight == 1, poll=0.002)  # M is generating, in its process
            # Held still while the client leaves, so M cannot finish first on a busy machine.
            os.kill(engine.pid, signals.SIGSTOP)
        try:
            assert wait_for(lambda: "duet_client_disconnects_total 1" in httpx.get(f"{url}/metrics").text)
        finally:
            os.kill(engine.pid, signals.SIGCONT)
        # the client left: the row went (a minute, for a machine busy with other work; a row
        # that ran on instead would end "length", not "cancelled")
        assert wait_for(lambda: engine.in_flight == 0, seconds=60)
        assert reasons == ["cancelled"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        capable.close()
        light.close()


def test_every_status_is_counted_by_route(scripted_server):
    url = scripted_server[1]
    httpx.get(f"{url}/v1/models")  # 401 on /v1/models, not a chat request
    httpx.get(f"{url}/nowhere")
    chunked = httpx.post(
        f"{url}/v1/chat/completions", content=iter([b"{}"]), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert chunked.status_code == 411
    metrics = httpx.get(f"{url}/metrics").text
    for line in (
        'duet_requests_total{route="/v1/models",status="401"}',
        'duet_requests_total{route="other",status="404"}',
        'duet_requests_total{route="/v1/chat/completions",status="411"}',
    ):
        assert line in metrics, line


def test_failures_are_counted_as_5xx(random_backend):
    duet = Duet(
        FailsOn(random_backend, "POISON"),
        random_backend,
        DuetConfig(signal_max_tokens=8, answer_max_tokens=4),
    )
    server, thread, url = start_server(duet, ServeConfig())
    try:
        assert (
            httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "duet", "messages": [{"role": "user", "content": "POISON"}]},
            ).status_code
            == 502
        )
        assert (
            'duet_requests_total{route="/v1/chat/completions",status="502"} 1'
            in httpx.get(f"{url}/metrics").text
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def children(pid: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of each child of `pid`."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listed:
            pids = [int(c) for c in listed.read().split()]
    except OSError:
        return []
    found = []
    for child in pids:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                found.append((child, cmdline.read()))
        except OSError:
            pass
    return found


def engine_processes(pid: int) -> tuple[list[int], list[int]]:
    """The engine processes of `duet serve` (process `pid`), and the fork server they were forked
    from (none where they were spawned; the resource tracker is neither)."""
    engines, servers = [], []
    for child, cmdline in children(pid):
        if b"forkserver" in cmdline:
            servers.append(child)
            engines += [grandchild for grandchild, _ in children(child)]
        elif b"spawn_main" in cmdline:
            engines.append(child)
    return engines, servers


def test_duet_serve_from_the_command_line():
    # As a user starts it: the embedded pair, the key from the environment, each model's
    # engine in a process of its own (the default), a streamed answer equal to the library's.
    # Ctrl-C (SIGINT to the whole process group) lets a stream in flight finish, and no
    # engine process is left when the server stops.
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from duetlm.backends import load_backend

    port = free_port()
    env = os.environ | {"DUET_API_KEY": "from-env", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("duet")), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as in a terminal
    )
    url = f"http://127.0.0.1:{port}"
    question = "Start at 7, then +5, *3, -8 (mod 10). What is the result?"
    try:
        ready = process.stderr.readline().decode()
        while ready and "listening" not in ready:  # the models load first
            ready = process.stderr.readline().decode()
        assert f"listening on {url}/v1 as model 'duet'; playground at {url}/" in ready
        assert httpx.get(f"{url}/health").status_code == 200  # ready when it says so
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "duet"
        engines, servers = engine_processes(process.pid)
        if sys.platform.startswith("linux"):
            assert len(engines) == 2 and len(servers) == 1  # tiny-M's and tiny-m's, forked
        engines += servers
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="from-env", max_retries=0)

        def streamed(on_first_chunk=None):
            chunks = client.chat.completions.create(
                model="duet",
                messages=[{"role": "user", "content": question}],
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"duet": {"return_signal": True}},
            )
            reasoning, content, usage = "", "", None
            for chunk in chunks:
                if on_first_chunk is not None:
                    on_first_chunk, call = None, on_first_chunk
                    call()
                if chunk.choices:
                    reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                    content += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            return reasoning, content, usage

        capable, light = load_backend("tiny-M"), load_backend("tiny-m")
        expected = Duet(capable, light, DuetConfig(signal_max_tokens=384, answer_max_tokens=64)).solve(
            question
        )
        reasoning, content, usage = streamed()
        assert reasoning == expected.signal and content == expected.text
        assert usage.model_extra["duet"]["capable"]["output_tokens"] == expected.usage.capable.output_tokens
        # Ctrl-C while a stream is in flight: the server drains it, its engines still stepping
        reasoning, content, usage = streamed(lambda: os.killpg(process.pid, signal.SIGINT))
        assert content == expected.text and usage is not None
        assert process.wait(timeout=30) == 0
        assert "duet serve: stopped" in process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in engines))


def wait_for(condition, seconds: float = 10.0, poll: float = 0.05) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(poll)
    return condition()


def test_the_guard_refuses_what_it_cannot_read():
    # h11 refuses a malformed Content-Length before the app sees it; the guard must not raise
    # on one either, whatever server runs the app.
    from starlette.datastructures import Headers

    from duetlm.serve.guard import Guard

    def fail(status, message, kind, **_):
        return status, message

    guard = Guard(None, api_key=None, max_body_bytes=100, routes=(), observe=print, fail=fail)
    refuse = guard.refusal
    assert refuse("/v1/chat/completions", "POST", Headers({"content-length": "1e3"}))[0] == 400
    assert refuse("/v1/chat/completions", "POST", Headers({}))[0] == 411
    assert refuse("/v1/chat/completions", "POST", Headers({"content-length": "101"}))[0] == 413
    assert refuse("/v1/chat/completions", "POST", Headers({"content-length": "100"})) is None
    assert refuse("/metrics", "GET", Headers({})) is None
