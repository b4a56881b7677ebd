"""Batched vs one-by-one generation throughput of the hf backend (same model, one run).

    python bench/hf_throughput.py                 # the embedded M (tiny-M), 32 questions
    python bench/hf_throughput.py --model hf:Qwen/Qwen3-0.6B --max-tokens 256

Prints output tokens per second at each batch size and the speedup over batch 1, then the
same requests all at once through the streaming engine that `duet serve` uses (continuous
batching: a row that ends leaves the batch at once instead of idling until the longest row
ends). Greedy decoding, so every row produces the same tokens; only the wall time differs.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from duetlm.backends import BackendOptions, load_backend
from duetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams
from duetlm.tasks import builtin


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-M")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,16,32")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [p.question for p in builtin.generate(args.questions, split="test", seed=1)]
    requests = [
        GenerationRequest.chat(
            q, SamplingParams(args.max_tokens), chat_template_kwargs={"enable_thinking": True}
        )
        for q in prompts
    ]
    rows = []
    texts = None
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        backend = load_backend(args.model, BackendOptions(device="cpu", batch_size=batch_size))
        backend.generate(requests[:2])  # warm-up
        started = time.perf_counter()
        results = backend.generate(requests)
        elapsed = time.perf_counter() - started
        tokens = sum(r.output_tokens for r in results)
        same = texts is None or [r.text for r in results] == texts
        texts = texts or [r.text for r in results]
        rows.append((str(batch_size), tokens, elapsed, tokens / elapsed, same))
    results, elapsed = asyncio.run(streamed(backend, requests))
    tokens = sum(r.output_tokens for r in results)
    rows.append(("engine", tokens, elapsed, tokens / elapsed, [r.text for r in results] == texts))
    print(
        f"model {args.model}, {args.questions} requests, greedy, max {args.max_tokens} tokens, {args.threads} threads"
    )
    print(f"{'batch':>6} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'speedup':>8} {'same text':>9}")
    for batch_size, tokens, elapsed, rate, same in rows:
        print(
            f"{batch_size:>6} {tokens:>7} {elapsed:>8.2f} {rate:>8.1f} {rate / rows[0][3]:>7.2f}x {same!s:>9}"
        )


async def streamed(backend, requests: list[GenerationRequest]) -> tuple[list[GenerationResult], float]:
    """Every request at once through `astream` (the engine admits them together)."""

    async def one(request: GenerationRequest) -> GenerationResult:
        async for item in backend.astream(request):
            if isinstance(item, GenerationResult):
                return item
        raise RuntimeError("the stream ended without a result")

    await one(requests[0])  # warm-up: the engine thread starts
    started = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    return list(results), time.perf_counter() - started


if __name__ == "__main__":
    main()
