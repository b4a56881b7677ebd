"""What a real model needs by default: its family's protocol settings, a dead hub said at
once, bf16 on a CPU that computes it."""

from __future__ import annotations

import time

import pytest
import torch

from duetlm.backends.hf import loading
from duetlm.config import DuetConfig
from duetlm.errors import BackendError, InputError
from duetlm.models import EMBEDDED_BUDGETS, config_defaults, family_of
from duetlm.tasks import load_task


def test_a_catalog_model_brings_its_family_settings_and_others_keep_the_defaults():
    for spec in ("llamacpp:qwen2.5-coder-1.5b", "hf:qwen2.5-coder-1.5b", "vllm:qwen2.5-coder-0.5b"):
        assert family_of(spec) == "qwen2.5-instruct"
    qwen = config_defaults("llamacpp:qwen2.5-coder-1.5b", "llamacpp:qwen2.5-coder-0.5b")
    assert qwen.signal_style == "answer" and "no code" in qwen.prompts.math_instruction
    assert qwen.capable_template_kwargs == {} and qwen.signal_max_tokens == 1024
    embedded = config_defaults("tiny-M", "tiny-m")
    assert embedded.signal_max_tokens == EMBEDDED_BUDGETS["signal_max_tokens"]
    assert config_defaults("hf:Qwen/Qwen3-8B", "hf:Qwen/Qwen3-0.6B") == DuetConfig()


def test_a_hub_that_cannot_be_reached_is_said_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(InputError, match=r"not reachable.*--data gsm8k=PATH"):
        load_task("gsm8k")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("asked", "stored", "native", "chosen"),
    [
        ("auto", torch.bfloat16, True, torch.bfloat16),  # a bf16 checkpoint on a bf16 CPU
        ("auto", torch.bfloat16, False, torch.float32),
        ("auto", torch.float32, True, torch.float32),  # the embedded pair keeps its precision
        ("auto", None, True, torch.float32),
        ("bfloat16", torch.float32, False, torch.bfloat16),
        ("float32", torch.bfloat16, True, torch.float32),
    ],
)
def test_the_cpu_dtype(monkeypatch, asked, stored, native, chosen):
    monkeypatch.setattr(loading, "cpu_computes_bf16", lambda: native)
    assert loading.pick_dtype(asked, torch.device("cpu"), stored) == chosen


def test_an_unknown_dtype_is_refused():
    with pytest.raises(BackendError, match="unknown dtype 'float8'"):
        loading.pick_dtype("float8", torch.device("cpu"))
    with pytest.raises(BackendError, match="unknown dtype 'Tensor'"):
        loading.pick_dtype("Tensor", torch.device("cpu"))


def test_each_role_has_its_own_engine_settings():
    from duetlm.cli.options import backend_options
    from duetlm.errors import InputError

    capable, light = backend_options(
        gpu_memory_utilization=0.5,
        capable_engine=["tensor_parallel_size=4", "max_model_len=32768"],
        light_engine=["gpu_memory_utilization=0.2", "threads=1"],
        light_tokenizer="/models/m",
    )
    assert (capable.tensor_parallel_size, capable.max_model_len, capable.gpu_memory_utilization) == (
        4,
        32768,
        0.5,
    )
    assert (light.tensor_parallel_size, light.gpu_memory_utilization, light.threads) == (1, 0.2, 1)
    assert light.tokenizer == "/models/m" and capable.tokenizer is None
    with pytest.raises(InputError, match="use one of"):
        backend_options(capable_engine=["batch=4"])
    with pytest.raises(InputError, match="expected a int"):
        backend_options(light_engine=["tensor_parallel_size=two"])
