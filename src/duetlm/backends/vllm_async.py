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

from duetlm.backends.base import GenerationRequest, GenerationResult, StreamItem, render_chat
from duetlm.backends.vllm import finish_of, require_vllm, vllm_sampling


class VLLMAsyncBackend:
    def __init__(self, path_or_id: str, *, spec: str | None = None, **engine_options) -> None:
        """`engine_options` are `vllm.AsyncEngineArgs` fields as they are (`load_backend`
        passes tensor_parallel_size, gpu_memory_utilization and dtype); prefix caching is on,
        since M's and m's prompts share their question."""
        vllm = require_vllm()
        from transformers import AutoTokenizer
        from vllm.sampling_params import RequestOutputKind

        from duetlm.backends.hf import resolve_model_location

        location, local = resolve_model_location(path_or_id)
        self._vllm, self._delta = vllm, RequestOutputKind.DELTA
        self.spec = spec or f"vllm:{path_or_id}"
        args = vllm.AsyncEngineArgs(model=location, enable_prefix_caching=True, **engine_options)
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)

    async def astream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        sampling = request.sampling
        ids = self.tokenizer(render_chat(self.tokenizer, request), add_special_tokens=False)["input_ids"]
        params = vllm_sampling(self._vllm, sampling, output_kind=self._delta)
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
        text, reason, stop_string = finish_of(text, finish, stop_reason, sampling.stop)
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
