"""`duet serve` through the official openai client on loopback, with tiny real models."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from conftest import QUESTIONS, SIGNAL
from duetlm.config import DuetConfig
from duetlm.errors import BackendError
from duetlm.protocol import Duet
from duetlm.serve import ServeConfig, create_app

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="module")
def scripted_server(capable_backend, light_backend):
    duet = Duet(capable_backend, light_backend, DuetConfig(signal_max_tokens=80, answer_max_tokens=40))
    server, thread, url = start_server(duet, ServeConfig(api_key=KEY, max_body_bytes=4096))
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
    assert "signal" not in response.model_extra["duet"]


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


def test_streaming(client):
    stream = client.chat.completions.create(
        model="duet",
        messages=[{"role": "user", "content": QUESTIONS[2]}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "So \\boxed{14}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.model_extra["duet"]["light"]["output_tokens"] > 0


def test_models_health_metrics(scripted_server, client):
    assert [m.id for m in client.models.list()] == ["duet"]
    url = scripted_server[1]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'duet_requests_total{status="200"}' in metrics
    assert 'duet_tokens_total{model="capable",kind="output"}' in metrics
    assert "duet_request_latency_seconds_bucket" in metrics


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


def test_concurrent_requests_are_batched_and_independent(random_backend):
    duet = Duet(random_backend, random_backend, DuetConfig(signal_max_tokens=12, answer_max_tokens=8))
    server, thread, url = start_server(duet, ServeConfig(batch_window_ms=50))
    try:
        questions = [f"question number {i} " + "x" * (i % 7) for i in range(32)]
        expected = [duet.solve(q).text for q in questions]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def ask(q):
            return client.chat.completions.create(model="duet", messages=[{"role": "user", "content": q}])

        with ThreadPoolExecutor(32) as pool:
            answers = [r.choices[0].message.content for r in pool.map(ask, questions)]
        assert answers == expected
        metrics = httpx.get(f"{url}/metrics").text
        batches = int(
            next(line.split()[-1] for line in metrics.splitlines() if line.startswith("duet_batches_total"))
        )
        assert batches < 32  # requests shared batches
    finally:
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


def test_one_failing_request_does_not_fail_its_batch(random_backend):
    duet = Duet(
        FailsOn(random_backend, "POISON"),
        random_backend,
        DuetConfig(signal_max_tokens=8, answer_max_tokens=4),
    )
    server, thread, url = start_server(duet, ServeConfig(batch_window_ms=100))
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
