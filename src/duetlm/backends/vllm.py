"""vLLM offline engine backend (`vllm:PATH_OR_ID`), for GPU boxes.

An optional extra (`pip install 'duetlm[vllm]'`), imported only when a `vllm:` spec is used.
It cannot run on the project's CPU-only CI machines, so it is exercised there only through
the shared code it is built from (chat rendering, stop cutting, result type); its own lines are
kept small for that reason. Prompts are rendered with the model's chat template exactly as the
hf backend renders them and passed as token ids, so both backends see identical prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from duetlm.backends.base import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    cut_at_stop,
    render_chat,
)
from duetlm.errors import BackendError


def require_vllm():
    """The vllm module, or the error that says how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise BackendError(
            "the vllm backend needs the vllm package and a CUDA GPU: pip install 'duetlm[vllm]'"
        ) from exc
    return vllm


def vllm_sampling(vllm, sampling: SamplingParams, **extra):
    """Our sampling settings as vLLM's (special tokens kept: the protocol reads the tags)."""
    return vllm.SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k or -1,  # -1: no top-k, in every vLLM version
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        skip_special_tokens=False,
        **extra,
    )


def finish_of(text: str, finish: str | None, stop_reason, stops: tuple[str, ...]):
    """vLLM's finish and stop reasons as ours: (text cut at a stop, reason, stop string)."""
    text, stop_string = cut_at_stop(text, stops)
    reason: FinishReason
    if finish == "length":
        reason = "length"
    elif isinstance(stop_reason, str):
        reason, stop_string = "stop", stop_reason
    else:
        reason = "eos"
    return text, reason, stop_string


class VLLMBackend:
    """A model served in-process by `vllm.LLM` (continuous batching, paged KV cache)."""

    def __init__(
        self,
        path_or_id: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        spec: str | None = None,
        **engine_options,
    ) -> None:
        """`engine_options` go to `vllm.LLM` as they are (the trainer's rollout engine passes
        `worker_extension_cls`, `enable_sleep_mode` and `logprobs_mode`)."""
        vllm = require_vllm()
        from duetlm.backends.hf import resolve_model_location

        location, _ = resolve_model_location(path_or_id)
        self._vllm = vllm
        self.spec = spec or f"vllm:{path_or_id}"
        self.llm = vllm.LLM(
            model=location,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,
            **engine_options,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        started = time.perf_counter()
        prompts = [
            {
                "prompt_token_ids": self.tokenizer(render_chat(self.tokenizer, r), add_special_tokens=False)[
                    "input_ids"
                ]
            }
            for r in requests
        ]
        params = [
            vllm_sampling(
                self._vllm, r.sampling, logprobs=0 if r.sampling.logprobs else None
            )  # sampled token's
            for r in requests
        ]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        share = (time.perf_counter() - started) / max(len(requests), 1)
        results = []
        for request, output in zip(requests, outputs):
            completion = output.outputs[0]
            text, reason, stop_string = finish_of(
                completion.text, completion.finish_reason, completion.stop_reason, request.sampling.stop
            )
            results.append(
                GenerationResult(
                    text=text,
                    prompt_tokens=len(output.prompt_token_ids),
                    output_tokens=len(completion.token_ids),
                    finish_reason=reason,
                    wall_s=share,
                    stop_string=stop_string,
                    token_ids=list(completion.token_ids),
                    logprobs=(
                        [
                            step[token].logprob
                            for step, token in zip(completion.logprobs, completion.token_ids)
                        ]
                        if completion.logprobs
                        else None
                    ),
                )
            )
        return results

    def close(self) -> None:
        del self.llm
