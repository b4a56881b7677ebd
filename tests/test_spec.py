"""Model spec strings: which backend, which model, and clear errors for the rest."""

from __future__ import annotations

import pytest

from duetlm.backends import BackendOptions, ModelSpec, load_backend, parse_spec
from duetlm.errors import BackendError, ConfigError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:Qwen/Qwen3-0.6B", ModelSpec("hf", "Qwen/Qwen3-0.6B")),
        ("hf:/abs/folder", ModelSpec("hf", "/abs/folder")),
        ("vllm:Qwen/Qwen3-8B", ModelSpec("vllm", "Qwen/Qwen3-8B")),
        (
            "openai:Qwen/Qwen3-8B@http://127.0.0.1:8000/v1",
            ModelSpec("openai", "Qwen/Qwen3-8B", "http://127.0.0.1:8000/v1"),
        ),
        ("openai:gpt-4o-mini", ModelSpec("openai", "gpt-4o-mini", None)),
        ("openai:user@org/model@http://h:1/v1", ModelSpec("openai", "user@org/model", "http://h:1/v1")),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["Qwen/Qwen3-8B", "torch:model", "hf:", "openai:@http://x/v1", ""])
def test_bad_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        parse_spec(spec)


def test_unknown_prefix_lists_known_ones():
    with pytest.raises(ConfigError, match="hf:, openai:, vllm:"):
        parse_spec("llama:foo")


def test_hf_spec_loads_a_local_folder(model_dirs):
    backend = load_backend(f"hf:{model_dirs['random']}")
    assert backend.spec == f"hf:{model_dirs['random']}"
    assert backend.model is not None


def test_missing_local_model(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        load_backend(f"hf:{tmp_path}/nothing-here")


def test_vllm_without_package_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"requirements-gpu.txt -e .\.\[vllm\]."):
            load_backend("vllm:Qwen/Qwen3-0.6B")
        with pytest.raises(BackendError, match=r"requirements-gpu.txt -e .\.\[vllm\]."):
            load_backend("vllm:Qwen/Qwen3-0.6B", BackendOptions(streaming=True))  # the async engine
    else:
        pytest.skip("vllm is installed here")


@pytest.mark.parametrize(
    ("text", "finish", "stop_reason", "expected"),
    [
        ("first", "stop", "</think>", ("first", "stop", "</think>")),  # vLLM names the stop string
        ("first x", "stop", 151645, ("first x", "eos", None)),  # a stop token id: the turn ended
        ("first x", "stop", None, ("first x", "eos", None)),
        ("first x", "length", None, ("first x", "length", None)),
        ("first</think>x", "length", None, ("first", "length", "</think>")),  # a stop kept in the text
    ],
)
def test_vllm_finish_reasons_read_as_ours(text, finish, stop_reason, expected):
    from duetlm.backends.vllm.offline import finish_of

    assert finish_of(text, finish, stop_reason, ("</think>",)) == expected
