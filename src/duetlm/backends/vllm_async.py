"""vLLM's async engine as a streaming backend, for `duet serve --capable vllm:...` (GPU only).

vLLM schedules every request in flight itself (continuous batching, paged KV cache), so the
server hands each request over as it comes and streams what vLLM returns: `generate()` of
`vllm.AsyncLLMEngine` with `RequestOutputKind.DELTA` yields the new tokens of each step, and
`abort(request_id)` stops a request whose client left. Prompts are rendered and tokenized
as the hf backend does. Like the offline backend, it cannot run on the project's CPU-only
machines; it is kept to this module.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from duetlm.backends.base import GenerationRequest, GenerationResult, StreamItem, cut_at_stop, render_chat
from duetlm.errors import BackendError


class VLLMAsyncBackend:
    def __init__(
        self,
        path_or_id: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        seed: int = 0,
        spec: str | None = None,
    ) -> None:
        try:
            import vllm
            from vllm.sampling_params import RequestOutputKind
        except ImportError as exc:
            raise BackendError(
                "the vllm backend needs the vllm package and a CUDA GPU: pip install 'duetlm[vllm]'"
            ) from exc
        from transformers import AutoTokenizer

        from duetlm.backends.hf import resolve_model_location

        location, local = resolve_model_location(path_or_id)
        self._vllm, self._delta = vllm, RequestOutputKind.DELTA
        self.spec = spec or f"vllm:{path_or_id}"
        args = vllm.AsyncEngineArgs(
            model=location,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,
        )
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        sampling = request.sampling
        ids = self.tokenizer(render_chat(self.tokenizer, request), add_special_tokens=False)["input_ids"]
        params = self._vllm.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or -1,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            skip_special_tokens=False,
            output_kind=self._delta,
        )
        request_id, started, text, tokens, finish, stop_reason = (
            uuid.uuid4().hex,
            time.perf_counter(),
            "",
            [],
            None,
            None,
        )
        try:
            async for output in self.engine.generate({"prompt_token_ids": ids}, params, request_id):
                step = output.outputs[0]
                tokens += list(step.token_ids)
                finish, stop_reason = step.finish_reason or finish, step.stop_reason
                if step.text:
                    text += step.text
                    yield step.text
        finally:
            if finish is None:
                await self.engine.abort(request_id)  # the caller left before the end
        text, stop_string = cut_at_stop(text, sampling.stop)
        if finish == "length":
            reason = "length"
        elif isinstance(stop_reason, str):
            reason, stop_string = "stop", stop_reason
        else:
            reason = "eos"
        yield GenerationResult(
            text=text,
            prompt_tokens=len(ids),
            output_tokens=len(tokens),
            finish_reason=reason,
            wall_s=time.perf_counter() - started,
            stop_string=stop_string,
            token_ids=tokens,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        async def one(request: GenerationRequest) -> GenerationResult:
            return [item async for item in self.astream(request)][-1]

        async def every() -> list[GenerationResult]:
            return list(await asyncio.gather(*(one(r) for r in requests)))

        return asyncio.run(every())

    def close(self) -> None:
        self.engine.shutdown()
