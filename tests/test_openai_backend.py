"""The openai backend against real servers on loopback.

The happy path runs against `transformers serve` (an OpenAI-compatible server that ships with
transformers) serving a tiny local model; failure paths against small stdlib HTTP servers
that answer 500, 401 or 404, or against a port where nothing listens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import QUESTIONS, SIGNAL, UNCLOSED_QUESTION, free_port
from duetlm.backends.base import GenerationRequest, SamplingParams
from duetlm.backends.openai import OpenAIBackend
from duetlm.config import DuetConfig
from duetlm.errors import BackendError
from duetlm.protocol import Duet, Problem, user_prompt


def transformers_serve(folder: Path):
    """`transformers serve` on loopback with a local model preloaded; yields (model, base URL)."""
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    model = str(folder.resolve())
    process = subprocess.Popen(
        [str(cli), "serve", model, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"transformers serve did not start: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    yield model, f"{url}/v1"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def served_capable(model_dirs):
    yield from transformers_serve(model_dirs["capable"])


@pytest.fixture(scope="module")
def served_qwen3(qwen3_dirs):
    """The scripted Qwen3 M (real tokenizer, template, generation config) behind the server."""
    yield from transformers_serve(qwen3_dirs["capable"])


def ask(question: str, max_tokens: int, stop=(), prefill: str = "") -> GenerationRequest:
    return GenerationRequest.chat(
        user_prompt(Problem(question), DuetConfig()),
        SamplingParams(max_tokens, stop=stop),
        prefill=prefill,
        chat_template_kwargs={"enable_thinking": True},
    )


def test_chat_usage_matches_local_backend(served_capable, capable_backend):
    model, url = served_capable
    request = ask(QUESTIONS[0], 80, stop=("</think>",))
    [remote] = OpenAIBackend(model, url).generate([request])
    [local] = capable_backend.generate([request])
    assert remote.text == local.text == f"<think>\n{SIGNAL}\n"
    assert remote.finish_reason == "stop"
    assert (remote.prompt_tokens, remote.output_tokens) == (local.prompt_tokens, local.output_tokens)
    assert remote.retries == 0


def test_prefilled_turn_goes_through_completions_with_local_tokenizer(
    served_capable, capable_backend, model_dirs
):
    model, url = served_capable
    request = ask(QUESTIONS[1], 30, prefill=f"<think>\n{SIGNAL}\n</think>\n\n")
    [remote] = OpenAIBackend(model, url, tokenizer=str(model_dirs["capable"])).generate([request])
    [local] = capable_backend.generate([request])
    assert remote.text == local.text
    assert remote.prompt_tokens == local.prompt_tokens
    # transformers serve counts the EOS token the same way; its finish reason does not say EOS.
    assert remote.output_tokens == local.output_tokens


def test_a_prefill_refused_as_chat_names_the_light_tokenizer_option(served_capable):
    # transformers serve has no continue_final_message: without a local tokenizer the
    # pre-filled turn is refused, and the error says what to pass instead.
    model, url = served_capable
    request = ask(QUESTIONS[1], 30, prefill=f"<think>\n{SIGNAL}\n</think>\n\n")
    with pytest.raises(BackendError, match=r"refused \(4\d\d\).*pass --light-tokenizer PATH_OR_ID"):
        OpenAIBackend(model, url).generate([request])


def test_concurrent_batch_keeps_order(served_capable):
    model, url = served_capable
    requests = [ask(q, 80, stop=("</think>",)) for q in QUESTIONS] + [ask(QUESTIONS[0], 4)]
    results = OpenAIBackend(model, url, concurrency=4).generate(requests)
    assert [r.text for r in results[:3]] == [f"<think>\n{SIGNAL}\n"] * 3
    assert results[3].finish_reason == "length" and results[3].output_tokens == 4


def test_remote_capable_with_local_light(served_capable, light_backend):
    model, url = served_capable
    duet = Duet(OpenAIBackend(model, url), light_backend)
    result = duet.solve(QUESTIONS[2])
    assert result.signal == SIGNAL
    assert result.answer == "14"
    assert result.usage.capable.output_tokens > 0 and result.usage.light.output_tokens > 0


def test_qwen3_over_transformers_serve_with_a_local_qwen3_light(served_qwen3, qwen3_dirs):
    from duetlm.backends.hf import HFBackend

    model, url = served_qwen3
    light = HFBackend(str(qwen3_dirs["light"]), device="cpu")
    duet = Duet(OpenAIBackend(model, url), light, DuetConfig(signal_max_tokens=60, answer_max_tokens=20))
    result = duet.solve(QUESTIONS[0])
    assert result.signal == SIGNAL and result.answer == "14"
    assert result.usage.capable.output_tokens > 0 and result.usage.light.output_tokens > 0
    # the same request over the server and locally: the same tokens, counted the same way; the
    # server parses Qwen3's thinking out of the content, and the signal is read from there
    capable = HFBackend(str(qwen3_dirs["capable"]), device="cpu")
    request = ask(QUESTIONS[1], 60, stop=("</think>",))
    [remote], [local] = OpenAIBackend(model, url).generate([request]), capable.generate([request])
    assert remote.extra["reasoning"] == SIGNAL and local.text == f"<think>\n{SIGNAL}\n"
    assert (remote.prompt_tokens, remote.output_tokens) == (local.prompt_tokens, local.output_tokens)


class _Status(BaseHTTPRequestHandler):
    status = 500
    hits = 0

    def do_POST(self):
        type(self).hits += 1
        body = json.dumps({"error": {"message": "boom", "type": "server_error", "code": None}}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def status_server():
    servers = []

    def start(status: int) -> tuple[str, type[_Status]]:
        handler = type("Handler", (_Status,), {"status": status, "hits": 0})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", handler

    yield start
    for server in servers:
        server.shutdown()


def test_server_errors_are_retried_then_reported(status_server):
    url, handler = status_server(500)
    backend = OpenAIBackend("m", url, max_retries=2, backoff_s=0.01)
    with pytest.raises(BackendError, match="gave up after 3 attempts"):
        backend.generate([ask("q", 4)])
    assert handler.hits == 3


def test_rate_limit_is_retried(status_server):
    url, handler = status_server(429)
    with pytest.raises(BackendError, match="gave up after 2 attempts"):
        OpenAIBackend("m", url, max_retries=1, backoff_s=0.01).generate([ask("q", 4)])
    assert handler.hits == 2


def test_server_down_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BackendError, match=r"gave up after 2 attempts \(APIConnectionError"):
        OpenAIBackend("m", url, max_retries=1, backoff_s=0.01).generate([ask("q", 4)])


@pytest.mark.parametrize(("status", "message"), [(401, "rejected the API key"), (404, "not found")])
def test_bad_key_and_unknown_model_are_not_retried(status_server, status, message):
    url, handler = status_server(status)
    with pytest.raises(BackendError, match=message):
        OpenAIBackend("m", url, max_retries=3, backoff_s=0.01).generate([ask("q", 4)])
    assert handler.hits == 1


def test_generate_works_inside_a_running_event_loop(status_server):
    import asyncio

    url, _ = status_server(401)

    async def call():
        return OpenAIBackend("m", url, max_retries=0).generate([ask("q", 4)])

    with pytest.raises(BackendError, match="API key"):
        asyncio.run(call())


def test_streamed_equals_called(served_capable, model_dirs):
    import asyncio

    from duetlm.backends.base import GenerationResult, cut_at_stop

    model, url = served_capable
    backend = OpenAIBackend(model, url, tokenizer=str(model_dirs["capable"]))

    async def streamed(request):
        items = [item async for item in backend.astream(request)]
        return items[:-1], items[-1]

    for request in (
        ask(QUESTIONS[0], 80, stop=("</think>",)),
        ask(QUESTIONS[1], 30, prefill=f"<think>\n{SIGNAL}\n</think>\n\n"),  # through completions
    ):
        deltas, result = asyncio.run(streamed(request))
        [called] = backend.generate([request])
        assert isinstance(result, GenerationResult) and len(deltas) > 1
        assert cut_at_stop("".join(deltas), request.sampling.stop)[0] == called.text  # as they came
        assert result.text == called.text
        assert (result.prompt_tokens, result.output_tokens) == (called.prompt_tokens, called.output_tokens)


def test_remote_capable_streams_through_the_protocol(served_qwen3, qwen3_dirs):
    import asyncio

    from duetlm.backends.hf import HFBackend
    from duetlm.streaming import AnswerDelta, SignalDelta

    model, url = served_qwen3
    light = HFBackend(str(qwen3_dirs["light"]), device="cpu")
    duet = Duet(OpenAIBackend(model, url), light, DuetConfig(signal_max_tokens=60, answer_max_tokens=20))

    async def events():
        return [e async for e in duet.astream(QUESTIONS[0])]

    stream = asyncio.run(events())
    signal = [e.text for e in stream if isinstance(e, SignalDelta)]
    assert "".join(signal).strip() == SIGNAL and len(signal) > 1  # the server's reasoning, as it came
    assert (
        "".join(e.text for e in stream if isinstance(e, AnswerDelta)).strip()
        == stream[-1].result.text.strip()
    )
    assert stream[-1].result.answer == "14"


def test_probe_over_transformers_serve_resumes_after_kill_9(served_qwen3, tmp_path):
    """`duet probe` with M and m both behind the server (m's pre-filled turns as completions,
    rendered by the local tokenizer), killed with SIGKILL part way and run again: every
    question once, counts exact with M's tokenizer."""
    model, url = served_qwen3
    questions = [*QUESTIONS * 2, UNCLOSED_QUESTION]
    data = tmp_path / "questions.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": q, "answer": "14"}) + "\n" for i, q in enumerate(questions)
        )
    )
    config = tmp_path / "duet.toml"
    config.write_text("alone_max_tokens = 48\nanswer_max_tokens = 16\n")
    out = tmp_path / "probe"
    spec = f"openai:{model}@{url}"
    command = [
        str(Path(sys.executable).with_name("duet")),
        "probe",
        "--task",
        f"jsonl:{data}",
        "--capable",
        spec,
        "--light",
        spec,
        "--capable-tokenizer",
        model,
        "--light-tokenizer",
        model,
        "--config",
        str(config),
        "--batch-size",
        "1",
        "--out",
        str(out),
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if results.is_file() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the probe finished before it could be killed"
    process.kill()
    process.wait()
    partial = [json.loads(line) for line in results.read_text().splitlines() if line.endswith("}")]
    assert 2 <= len(partial) < len(questions)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(len(questions)))
    assert [r["id"] for r in rows[: len(partial)]] == [r["id"] for r in partial]  # kept, not redone
    scripted = [r for r in rows if r["question"] in QUESTIONS]
    assert all(r["thinking_lines"] == len(SIGNAL.splitlines()) and r["capable_correct"] for r in scripted)
    assert all(r["oracle_lines"] is not None and not r["tokens_estimated"] for r in scripted)
    unclosed = next(r for r in rows if r["question"] == UNCLOSED_QUESTION)
    # the server parses the thinking out of the content, so the row cannot tell that the turn ended
    # inside it (its reasoning field even keeps the end-of-turn token); M wrote no answer
    assert unclosed["thinking"].startswith("first 3+4=7") and not unclosed["capable_correct"]
    assert "oracle" in done.stdout and "M-alone accuracy" in done.stdout


def test_settle_with_a_remote_capable_resumes_from_its_text_as_on_hf(
    served_capable, capable_backend, light_backend, model_dirs
):
    # M over the server: each step continues M's turn from its text (completions, with M's
    # tokenizer here), each stream closed at its line end; probes and stop as with M in-process
    import asyncio

    from duetlm.config import SettleConfig
    from duetlm.streaming import Finished

    model, url = served_capable
    remote = OpenAIBackend(model, url, tokenizer=str(model_dirs["capable"]))
    for agree in (1, 50):
        config = DuetConfig(
            temperature=0.0,
            signal_max_tokens=60,
            answer_max_tokens=20,
            settle=SettleConfig(probe_every=3, agree=agree, probe_max_tokens=12),
        )
        ours = Duet(remote, light_backend, config).solve_batch(QUESTIONS, "settle")
        theirs = Duet(capable_backend, light_backend, config).solve_batch(QUESTIONS, "settle")
        for a, b in zip(ours, theirs, strict=True):
            assert a.handover["probe_answers"] == b.handover["probe_answers"] != []
            assert (a.signal, a.text, a.capable_finish) == (b.signal, b.text, b.capable_finish)
            assert a.usage.capable.output_tokens == b.usage.capable.output_tokens
        first = ours[0]
        assert first.handover["probe_answers"] == [None, "14"]  # m has no answer from one line
        if agree == 1:  # the second probe settles: M's close tag is never asked for
            assert first.capable_finish == "settled" and first.signal == SIGNAL
            assert first.usage.capable.output_tokens == first.handover["probe_at_tokens"][-1]
        else:
            assert first.capable_finish == "stop" and first.signal == SIGNAL

        async def streamed(duet):
            return [e async for e in duet.astream(QUESTIONS[0], "settle")]

        [finished] = [
            e for e in asyncio.run(streamed(Duet(remote, light_backend, config))) if isinstance(e, Finished)
        ]
        assert (finished.result.signal, finished.result.text) == (ours[0].signal, ours[0].text)
