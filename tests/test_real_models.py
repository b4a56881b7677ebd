"""Real pretrained weights: Qwen2.5-Coder-0.5B-Instruct from the package registry, through the
llama.cpp server duetlm starts and through transformers (docs/real-pair.md).

These run wherever the model is installed (`duet models install qwen2.5-coder-0.5b`; the test
scripts install it first, and CI sets DUETLM_REAL_MODELS=required so that a missing model
fails instead of skipping). Questions are easy and budgets short: the tests check what the code
does with a real model's output (stops, turns, echoes, counts, grading), not the model."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duetlm.backends import BackendOptions, load_backend
from duetlm.backends.base import GenerationRequest, SamplingParams, render_chat
from duetlm.backends.openai import OpenAIBackend
from duetlm.config import DuetConfig
from duetlm.evaluate.summary import results_rows
from duetlm.grading import extract_answer
from duetlm.methods.registry import parse_mode
from duetlm.methods.two_stage import TwoStage
from duetlm.models import config_defaults
from duetlm.models.store import find
from duetlm.protocol import Duet, Problem
from duetlm.requests import asks_again, light_request

NAME = "qwen2.5-coder-0.5b"
ROOT = Path(__file__).resolve().parents[1]
EASY = "Tom has 3 apples and buys 4 more. How many apples does he have now?"


@pytest.fixture(scope="module")
def installed():
    model = find(NAME)
    if model is None:
        if os.environ.get("DUETLM_REAL_MODELS") == "required":
            pytest.fail(f"{NAME} is not installed: run `duet models install {NAME}`")
        pytest.skip(f"{NAME} is not installed (duet models install {NAME})")
    return model


@pytest.fixture(scope="module")
def llama(installed):
    # one thread: CI runs this suite beside the vLLM one, and llama.cpp's threads meet at a
    # barrier after every operation, so two threads on a shared pair of cores wait on each other
    backend = load_backend(f"llamacpp:{NAME}", BackendOptions(batch_size=4, max_model_len=2048, threads=1))
    yield backend
    backend.close()


def chat(text: str, max_tokens: int = 32, **sampling) -> GenerationRequest:
    return GenerationRequest.chat(text, SamplingParams(max_tokens, **sampling))


def test_llamacpp_stops_ends_and_counts_as_asked(llama):
    stopped, cut, ended = llama.generate(
        [
            chat("Count from 1 to 20, separated by commas. Write only the numbers.", stop=(", 5",)),
            chat("Count from 1 to 20, separated by commas. Write only the numbers.", max_tokens=3),
            chat("Reply with the single word yes and nothing else."),
        ]
    )
    assert stopped.finish_reason == "stop" and stopped.stop_string == ", 5"
    assert stopped.text.replace(" ", "").endswith("1,2,3,4") and ", 5" not in stopped.text
    assert cut.finish_reason == "length" and cut.output_tokens == 3
    assert ended.finish_reason == "eos" and "yes" in ended.text.lower()
    for result in (stopped, cut, ended):
        assert result.output_tokens == len(result.token_ids) and result.prompt_tokens > 20


def test_llamacpp_samples_by_seed_and_gives_logprobs(llama):
    """A seed fixes the sample of a request run alone (requests decoded in one batch do not
    reproduce each other: llama.cpp's batched kernels sum in another order, and sampling at
    temperature 1 from the whole vocabulary turns those last digits into other tokens)."""

    def poem(seed: int) -> GenerationRequest:
        return chat("Write a short poem about the sea.", 24, temperature=1.0, seed=seed, logprobs=True)

    [first], [again], [other] = (llama.generate([poem(seed)]) for seed in (1, 1, 2))
    assert first.text == again.text and first.text != other.text
    assert len(first.logprobs) == first.output_tokens and all(lp <= 0 for lp in first.logprobs)


def test_llamacpp_continues_a_prefilled_turn_and_resumed_ids_exactly(llama):
    [capital] = llama.generate(
        [
            GenerationRequest.chat(
                "What is the capital of France?", SamplingParams(8), prefill="The capital of France is"
            )
        ]
    )
    assert capital.text.lstrip().startswith("Paris") and "capital of France is" not in capital.text
    # a resumed turn sends M's own ids as they are; on text this sure of itself (no near-ties,
    # whose argmax a cached and an uncached prompt may break differently) it goes on exactly
    question = "Count from 1 to 40, separated by commas. Write only the numbers."
    [whole] = llama.generate([chat(question, 24)])
    [head] = llama.generate([chat(question, 12)])
    resumed = dataclasses.replace(chat(question, 12), continue_ids=tuple(head.token_ids))
    [tail] = llama.generate([resumed])
    assert tail.prompt_tokens == head.prompt_tokens + len(head.token_ids)
    assert head.token_ids + tail.token_ids == whole.token_ids


def test_llamacpp_counts_a_text_s_tokens_as_the_model_s_own_tokenizer(llama, installed):
    """The probe's cut lengths on llama.cpp come from the server's tokenizer: exact, not the
    per-character estimate an OpenAI-compatible server without a tokenizer gets."""
    from transformers import AutoTokenizer

    from duetlm.evaluate.probe import SignalTokens

    tokenizer = AutoTokenizer.from_pretrained(installed.folder / "hf")
    text = "Step 1: 16 − 3 = 13 eggs.\n\n\\[\n13 \\times \\$2 = \\$26\n\\]\nSo Janet makes 26 dollars. 🥚"
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert llama.count_tokens(text) == expected
    counter = SignalTokens(llama, config_defaults(f"llamacpp:{NAME}", f"llamacpp:{NAME}"))
    assert counter.exact and counter.count(text, None) == expected  # type: ignore[arg-type]
    assert llama.count_tokens("") == 0


def test_an_echoed_prefill_is_never_graded_as_m_answer(llama, caplog):
    """llama.cpp's chat endpoint returns a continued assistant turn with the prefill in front.
    An M without think tags (this Coder model) run in the think style hands over its whole
    answer, box included; m, asked through that endpoint for 2 tokens, writes no box of its own.
    The prefill must not come back as m's text, where its box was graded as m's answer."""
    light = OpenAIBackend(NAME, f"{llama.base_url}/v1", spec=f"openai:{NAME}@llama.cpp")
    config = DuetConfig(signal_style="think", signal_max_tokens=160, answer_max_tokens=2)
    duet = Duet(llama, light, config)
    with caplog.at_level(logging.WARNING, logger="duetlm.protocol"):
        result = duet.solve(EASY + " Put the final answer within \\boxed{}.")
    assert result.open_signal and "\\boxed" in result.signal  # M never closed a thinking
    assert "without closing its thinking" in caplog.text
    assert "\\boxed" not in result.text and result.answer is None
    assert result.usage.light.output_tokens <= 2
    [direct] = light.generate(
        [GenerationRequest.chat(EASY, SamplingParams(2), prefill="He has 3 + 4 = 7, so \\boxed{7}")]
    )
    assert direct.extra.get("echoed_prefill") and "\\boxed" not in direct.text


def test_an_echoed_prefill_is_cut_from_a_stream_too(llama):
    import asyncio

    light = OpenAIBackend(NAME, f"{llama.base_url}/v1")
    request = GenerationRequest.chat(
        EASY, SamplingParams(6), prefill="He has 3 + 4 = 7 apples, so the answer is"
    )

    async def collect():
        return [item async for item in light.astream(request)]

    items = asyncio.run(collect())
    text = "".join(i for i in items if isinstance(i, str))
    assert "answer is" not in text and items[-1].text == text


def test_the_two_stage_protocol_on_the_real_chat_template(installed):
    """transformers on the converted folder: M (answer style, the family's defaults) stops at
    its answer marker, m finishes from its reasoning, and the grade is read off m's text."""
    backend = load_backend(f"hf:{NAME}", BackendOptions(device="cpu"))
    config = config_defaults(f"hf:{NAME}", f"hf:{NAME}").model_copy(update={"signal_max_tokens": 200})
    rendered = render_chat(backend.tokenizer, chat(EASY))
    assert rendered.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    duet = Duet(backend, backend, config)
    result = duet.solve(Problem(EASY))
    assert config.signal_style == "answer" and not result.open_signal
    assert result.capable_finish == "stop" and "\\boxed" not in result.signal
    assert result.answer == "7" and extract_answer(result.text) == "7"
    prompt = backend.tokenizer(
        render_chat(backend.tokenizer, chat(config.prompts.math_instruction.replace("{question}", EASY))),
        add_special_tokens=False,
    )
    assert result.usage.capable.prompt_tokens == len(prompt["input_ids"])


def test_settle_on_llamacpp_probes_and_stops_m(llama):
    config = config_defaults(f"llamacpp:{NAME}", f"llamacpp:{NAME}").model_copy(
        update={"signal_max_tokens": 300}
    )
    duet = Duet(llama, llama, config)
    [settle, alone] = [duet.solve(EASY, "settle"), duet.solve(EASY, "M-alone")]
    handover = settle.handover
    assert handover["probes"] >= 1 and len(handover["probe_answers"]) == handover["probes"]
    assert settle.usage.capable.output_tokens == settle.signal_tokens  # every step counted once
    if handover["settled"]:  # M was not resumed after the probe that settled
        assert settle.capable_finish == "settled"
        assert settle.signal_tokens == handover["probe_at_tokens"][-1]
    else:
        assert settle.capable_finish in ("stop", "eos", "length")
    assert alone.answer == "7"


def silent_rows(count: int) -> list[dict]:
    """The shipped GSM8K duet rows where m ended its turn at once, shortest signals first."""
    rows = results_rows(ROOT / "bench" / "results" / "real-pair" / "gsm8k" / "main")
    silent = [
        r
        for r in rows
        if r["method"] == "duet"
        and r["no_answer"]
        and not r["text"].strip()
        and r["light_finish"] in ("eos", "stop")
    ]
    assert len(silent) >= count, "the shipped rows changed: pick other questions"
    return sorted(silent, key=lambda r: len(r["signal"]))[:count]


def test_an_empty_turn_on_the_real_server_is_asked_again(llama):
    """The real 0.5B, handed the real 1.5B's reasoning on GSM8K questions where it ended its
    turn at once in the shipped bench rows (docs/real-pair.md), does so here too: the empty
    turn must be seen through llama.cpp's echoed prefill, and the cued second request answers."""
    rows = silent_rows(3)
    problems = [Problem(row["question"]) for row in rows]
    signals = [row["signal"] for row in rows]
    config = config_defaults(f"llamacpp:{NAME}", f"llamacpp:{NAME}")
    assert config.answer_retry and config.signal_style == "answer"
    duet = Duet(llama, llama, config)
    turns = llama.generate(
        [light_request(p, s, config, config.light_template_kwargs) for p, s in zip(problems, signals)]
    )
    empty = [asks_again(config, turn) for turn in turns]
    assert any(empty), [turn.text for turn in turns]
    answers = TwoStage(parse_mode("duet")).answer_all(duet, problems, signals, [None] * len(rows))
    for was_empty, answer in zip(empty, answers, strict=True):
        assert bool(answer.extra.get("answer_retried")) == was_empty
        if was_empty:
            assert answer.text.strip() and answer.extra["requests"] == 2
            assert "So the final answer is" not in answer.text  # the echoed prefill is cut


def test_duet_solve_on_llamacpp_specs_and_its_servers_go_with_it(installed):
    before = server_processes()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "duetlm.cli",
            "solve",
            EASY,
            "--capable",
            f"llamacpp:{NAME}",
            "--light",
            f"llamacpp:{NAME}",
            "--json",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert '"answer": "7"' in done.stdout
    assert server_processes() <= before


def test_the_server_ends_when_its_owner_is_killed(installed):
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from duetlm.backends import load_backend; "
            "from duetlm.backends import BackendOptions; "
            f"b = load_backend('llamacpp:{NAME}', BackendOptions(threads=1)); "
            "print(b.server.process.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server = int(owner.stdout.readline())
        assert server in server_processes()
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 30
        while server in server_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server not in server_processes()
    finally:
        owner.kill()


def server_processes() -> set[int]:
    """Pids of llama.cpp server processes this user runs for duetlm."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read().decode(errors="replace")
            except OSError:
                continue
            if "duetlm.backends.llamacpp.process" in command:
                try:
                    state = Path(f"/proc/{entry}/stat").read_text().split()[2]
                except OSError:
                    continue
                if state != "Z":
                    found.add(int(entry))
    return found
