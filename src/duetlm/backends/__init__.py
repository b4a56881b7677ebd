"""Backends and the model spec strings that pick them.

hf:PATH_OR_ID          transformers, local folder or hub id (CPU, CUDA, MPS)
openai:MODEL@URL       any OpenAI-compatible server, e.g. openai:Qwen/Qwen3-8B@http://gpu:8000/v1
vllm:PATH_OR_ID        vLLM (GPU, or x86-64 CPU with vLLM's CPU build; optional extra)
llamacpp:FILE.gguf     llama.cpp, a server started for the model (optional extra)
NAME                   an embedded model of the package (see `duetlm.models.EMBEDDED`)

After hf:, vllm: and llamacpp:, the name of an installed model (`duet models install`) stands
for its local copy: its Hugging Face folder, or its GGUF file for llamacpp:.
"""

from __future__ import annotations

from dataclasses import dataclass

from duetlm.backends.base import (
    Backend,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from duetlm.errors import ConfigError

__all__ = [
    "Backend",
    "BackendOptions",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "ModelSpec",
    "SamplingParams",
    "load_backend",
    "parse_spec",
]

PREFIXES = ("hf", "openai", "vllm", "llamacpp")


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    model: str
    url: str | None = None


@dataclass
class BackendOptions:
    """Backend settings a spec string does not carry. Each applies only to its backend."""

    device: str = "auto"  # hf: auto picks cuda, then mps, then cpu
    dtype: str = "auto"  # hf: bf16 on GPUs that support it, fp32 on CPU; vllm: see backends/vllm/start.py
    batch_size: int = 32  # hf: rows per generate() call; llamacpp: slots (see default_parallel)
    api_key: str | None = None  # openai: else $OPENAI_API_KEY, else "EMPTY" (local servers)
    tokenizer: str | None = None  # openai: tokenizer to render pre-filled turns locally
    concurrency: int = 16  # openai: requests in flight
    max_retries: int = 4  # openai: on 429/5xx/timeouts, exponential backoff
    tensor_parallel_size: int = 1  # vllm
    gpu_memory_utilization: float | None = None  # vllm: None = auto (backends/vllm/start.py)
    enforce_eager: bool | None = None  # vllm: None = eager on a CPU, CUDA graphs on a GPU
    max_model_len: int | None = (
        None  # vllm: None = the model's context length; llamacpp: context per slot (4096)
    )
    streaming: bool = False  # vllm: the async engine (`duet serve`), else the offline one
    decode_step: str = "auto"  # hf engine: auto = own step (Llama/Qwen2/Qwen3), transformers = forward
    engine: str = "thread"  # hf streaming engine: a thread here, or a process per model (`duet serve`)
    engine_threads: int | None = 1  # hf engine process: torch CPU threads (None: torch's default)
    threads: int | None = None  # llamacpp: CPU threads of the server (None: all cores)


def parse_spec(spec: str) -> ModelSpec:
    """Split a model spec string; unknown prefixes get a message listing the known ones."""
    from duetlm.models import EMBEDDED

    spec = spec.strip()
    if spec in EMBEDDED:
        return ModelSpec("hf", str(EMBEDDED[spec]()))
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in PREFIXES:
        known = ", ".join(f"{p}:" for p in PREFIXES)
        names = ", ".join(EMBEDDED)
        raise ConfigError(
            f"unknown model spec {spec!r}: start it with one of {known} (e.g. hf:Qwen/Qwen3-0.6B) "
            f"or use an embedded model name ({names})"
        )
    if not rest:
        raise ConfigError(f"model spec {spec!r} names no model after {prefix}:")
    if prefix in ("hf", "vllm", "llamacpp"):
        from duetlm.models.store import resolve

        rest = resolve(rest, prefix) or rest
    if prefix == "openai":
        model, at, url = rest.rpartition("@")
        if not at:
            model, url = rest, None
        if not model:
            raise ConfigError(f"model spec {spec!r}: expected openai:MODEL@URL")
        return ModelSpec("openai", model, url)
    return ModelSpec(prefix, rest)


def load_backend(spec: str, options: BackendOptions | None = None) -> Backend:
    """The backend a spec string names, loaded once (model weights stay in memory)."""
    options = options or BackendOptions()
    parsed = parse_spec(spec)
    if parsed.kind == "hf":
        from duetlm.backends.hf import HFBackend

        return HFBackend(
            parsed.model,
            device=options.device,
            dtype=options.dtype,
            batch_size=options.batch_size,
            decode_step=options.decode_step,
            engine=options.engine,
            engine_threads=options.engine_threads,
            spec=spec,
        )
    if parsed.kind == "openai":
        from duetlm.backends.openai import OpenAIBackend

        return OpenAIBackend(
            parsed.model,
            parsed.url,
            api_key=options.api_key,
            tokenizer=options.tokenizer,
            concurrency=options.concurrency,
            max_retries=options.max_retries,
            spec=spec,
        )
    if parsed.kind == "llamacpp":
        from duetlm.backends.llamacpp import LlamaCppBackend, default_parallel

        return LlamaCppBackend(
            parsed.model,
            parallel=default_parallel(options.batch_size),
            ctx_per_slot=options.max_model_len or 4096,
            threads=options.threads,
            spec=spec,
        )
    from duetlm.backends.vllm.start import VLLMSettings

    settings = VLLMSettings(
        tensor_parallel_size=options.tensor_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization,
        dtype=options.dtype,
        max_model_len=options.max_model_len,
        enforce_eager=options.enforce_eager,
    )
    if options.streaming:
        from duetlm.backends.vllm.async_engine import VLLMAsyncBackend as engine
    else:
        from duetlm.backends.vllm.offline import VLLMBackend as engine
    return engine(parsed.model, settings=settings, spec=spec)
