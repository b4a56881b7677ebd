"""Time and peak memory of the streaming engine prefilling prompts with Qwen3's vocabulary.

    python bench/engine_prefill.py               # 32 prompts of about 110 tokens, 4 new tokens each

Runs on the tiny random Qwen3ForCausalLM of the test suite (the real Qwen3 tokenizer and its
152k vocabulary, width 32; needs requirements-dev.txt), so the figures show what the
vocabulary costs, not a real model's compute. Each run is a fresh process, so the peak
resident memory is this workload's own.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from qwen3 import qwen3_tokenizer, save, tiny_qwen3

from duetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams
from duetlm.backends.hf import HFBackend


async def prefill_all(backend: HFBackend, requests: list[GenerationRequest]) -> list[GenerationResult]:
    async def one(request: GenerationRequest) -> GenerationResult:
        async for item in backend.astream(request):
            if isinstance(item, GenerationResult):
                return item
        raise RuntimeError("the stream ended without a result")

    return list(await asyncio.gather(*(one(r) for r in requests)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--words", type=int, default=100)
    args = parser.parse_args()
    tokenizer = qwen3_tokenizer()
    folder = save(tiny_qwen3(), tokenizer, Path(tempfile.mkdtemp()) / "qwen3-tiny")
    backend = HFBackend(str(folder), device="cpu")
    requests = [
        GenerationRequest.chat("word " * args.words + str(i), SamplingParams(4)) for i in range(args.prompts)
    ]
    started = time.perf_counter()
    results = asyncio.run(prefill_all(backend, requests))
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{len(results)} prompts of {results[0].prompt_tokens} tokens through the engine: "
        f"{elapsed:.2f} s, peak RSS {peak:,.0f} MB"
    )


if __name__ == "__main__":
    main()
